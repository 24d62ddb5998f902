"""Live previews: once per requested step for both stages, the right shapes, ComfyUI's latent-to-RGB mapping, the
previewer when the file has it, and no effect on the result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascade import previews, tiny
from cascade.pipeline import CascadePipeline, StepEvent
from cascade.request import GenerationRequest, StageSettings

PRIOR = StageSettings(steps=4, cfg=4.0, sampler="ddpm", scheduler="sgm_uniform", shift=2.0)
DECODER = StageSettings(steps=3, cfg=1.0, sampler="euler_ancestral", scheduler="karras", shift=1.0)


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a lighthouse", width=256, height=384, seed=5, prior=PRIOR, decoder=DECODER)
    return GenerationRequest(**{**base, **kw})


def run(pipe, **kw) -> tuple[torch.Tensor, list[StepEvent]]:
    events: list[StepEvent] = []
    result = pipe.generate(request(**kw), callback=events.append)
    return result.images, events


def test_previews_arrive_once_per_step_of_both_stages_with_the_right_shape(tiny_pipeline):
    _, events = run(tiny_pipeline, preview_every=1)
    prior = [e for e in events if e.stage == "prior"]
    decoder = [e for e in events if e.stage == "decoder"]
    assert [e.step for e in prior] == [1, 2, 3, 4] and [e.step for e in decoder] == [1, 2, 3]
    hc, wc = 384 // 42, 256 // 42
    for e in prior:  # the tiny main file has a previewer: 8x the Stage C latent
        assert e.preview is not None and e.preview.size == (8 * wc, 8 * hc) and e.preview.mode == "RGB"
    for e in decoder:  # Stage B: latent-to-RGB factors at the Stage B latent's size
        assert e.preview is not None and e.preview.size == (256 // 4, 384 // 4)


def test_preview_interval_and_last_step(tiny_pipeline):
    _, events = run(tiny_pipeline, preview_every=2)
    got = [(e.stage, e.step) for e in events if e.preview is not None]
    assert got == [("prior", 2), ("prior", 4), ("decoder", 2), ("decoder", 3)]
    _, events = run(tiny_pipeline)
    assert all(e.preview is None for e in events)


def test_previews_do_not_change_the_images(tiny_pipeline):
    with_previews, _ = run(tiny_pipeline, preview_every=1)
    without, _ = run(tiny_pipeline)
    assert torch.equal(with_previews, without)


def test_upscaled_decoder_previews_follow_the_output_size(tiny_pipeline):
    _, events = run(tiny_pipeline, preview_every=3, upscale=2)
    last = [e for e in events if e.stage == "decoder"][-1]
    assert last.preview.size == (512 // 4, 768 // 4)


def test_without_a_previewer_stage_c_uses_the_factors(tiny_models, tiny_pair, tiny_pipeline, tmp_path):
    from cascade.loader import resolve_sources

    bare = tiny.write_stability_unet(tmp_path / "stage_c.safetensors", tiny_models, "prior")
    p = tiny_pipeline
    pipe = CascadePipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, prior=p.prior, decoder=p.decoder,
                           stage_a=p.stage_a, device=p.device, sources=resolve_sources(bare, tiny_pair[1]))
    _, events = run(pipe, preview_every=4)
    prior = [e for e in events if e.stage == "prior" and e.preview is not None]
    assert len(prior) == 1 and prior[0].preview.size == (256 // 42, 384 // 42)


def test_latent_rgb_is_comfyuis_latent2rgb():
    """One channel set to 1: the pixel is that channel's factor row, mapped ((x + 1) / 2 * 255, truncated)."""
    latent = torch.zeros(2, 16, 3, 4)
    latent[0, 9] = 1.0  # SC_Prior row 9: 0.2412, 0.1577, 0.0928
    pixels = previews.preview_pixels(latent, "prior", method="rgb")
    assert pixels.shape == (3, 4, 3) and pixels.dtype == torch.uint8
    assert pixels[1, 2].tolist() == [int((1.2412 / 2) * 255), int((1.1577 / 2) * 255), int((1.0928 / 2) * 255)]
    b = torch.zeros(1, 4, 2, 2)
    b[0, 3] = 2.0  # SC_B row 3: 0.0290, -0.1574, -0.4078
    assert previews.preview_pixels(b, "decoder")[0, 0].tolist() == [
        int((1 + 0.058) / 2 * 255), int((1 - 0.3148) / 2 * 255), int((1 - 0.8156) / 2 * 255)]


def test_previewer_output_is_mapped_back_to_zero_one(tiny_models):
    previewer = tiny_models.side_models()["previewer"]
    latent = torch.randn(1, 16, 3, 5)
    pixels = previews.preview_pixels(latent, "prior", previewer)
    assert pixels.shape == (24, 40, 3)
    with torch.no_grad():
        raw = previewer.blocks(latent)[0].movedim(0, -1)  # the network's own [0, 1] output
    # (blocks - 0.5) * 2, then (x + 1) / 2: equal up to rounding, so at most one level after truncation
    assert (pixels.int() - (raw.clamp(0, 1) * 255).to(torch.uint8).int()).abs().max() <= 1
    assert pixels.float().std() > 1  # not a flat image


def test_host_previews_choose_the_method(tiny_pipeline):
    latents = torch.randn(1, 16, 6, 9)
    event = StepEvent("prior", 1, 4, 10.0, latents)
    assert tiny_pipeline.preview(event).size == (72, 48)
    assert tiny_pipeline.preview(event, method="rgb").size == (9, 6)
    with pytest.raises(ValueError, match="unknown preview method"):
        previews.preview_pixels(latents, "prior", method="taesd")


def test_cli_preview_file_is_a_valid_png_of_the_last_step(tiny_pair, tmp_path, capsys, monkeypatch):
    """`--preview FILE --preview-every N` rewrites FILE atomically on the due steps of both stages; it ends as the
    last Stage B step's preview (Stage B latent size, x2 with --upscale 2) and leaves no temporary files behind."""
    from PIL import Image

    from cascade import atomic
    from cascade.cli import main

    writes = []
    real = atomic.atomic_write

    def counting(path, *args, **kwargs):
        writes.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "atomic_write", counting)
    prior, decoder = tiny_pair
    out, preview = tmp_path / "out.png", tmp_path / "live" / "preview.png"
    preview.parent.mkdir()
    code = main(["generate", "x", "--prior", str(prior), "--decoder", str(decoder), "--out", str(out), "--width",
                 "256", "--height", "384", "--steps", "4", "--decoder-steps", "3", "--upscale", "2", "--preview",
                 str(preview), "--preview-every", "2", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert writes.count("preview.png") == 4  # prior steps 2 and 4, decoder steps 2 and 3 (the last)
    with Image.open(preview) as image:
        image.verify()
    with Image.open(preview) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (512 // 4, 768 // 4)
    assert sorted(p.name for p in preview.parent.iterdir()) == ["preview.png"]
    assert Image.open(out).size == (512, 768)


def test_cli_preview_dir_keeps_every_due_preview(tiny_pair, tmp_path, capsys):
    """`--preview-dir D --preview-every 3` writes the first image's previews as <stage>-<step>.png: steps 3, 6 and
    the last of Stage C (7), the last of Stage B (2) — Stage C previews at its latent size, Stage B's at its own."""
    from PIL import Image

    from cascade.cli import main

    prior, decoder = tiny_pair
    out, folder = tmp_path / "out.png", tmp_path / "previews" / "run1"
    code = main(["generate", "x", "--prior", str(prior), "--decoder", str(decoder), "--out", str(out), "--width",
                 "256", "--height", "256", "--steps", "7", "--decoder-steps", "2", "--preview-dir", str(folder),
                 "--preview-every", "3", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["decoder-0002.png", "prior-0003.png", "prior-0006.png",
                                                         "prior-0007.png"]
    assert Image.open(folder / "decoder-0002.png").size == (256 // 4, 256 // 4)


def test_cli_without_preview_flag_writes_no_preview(tiny_pair, tmp_path, capsys):
    from cascade.cli import main

    prior, decoder = tiny_pair
    code = main(["generate", "x", "--prior", str(prior), "--decoder", str(decoder), "--out", str(tmp_path / "o.png"),
                 "--width", "128", "--height", "128", "--steps", "2", "--decoder-steps", "1", "--preview-every", "1",
                 "--device", "cpu", "--quiet"])
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
