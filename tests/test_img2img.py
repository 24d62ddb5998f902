"""Image inputs on the tiny model: Stage C img2img, Stage B img2img and 2x upscale, image prompts, missing parts,
bad images, and the ComfyUI definitions the image paths follow (resize/crop, CLIP preprocessing, noising)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade import images, tiny
from cascade.errors import InvalidRequestError, MissingComponentError
from cascade.image_inputs import PriorImageInputs
from cascade.pipeline import CascadePipeline
from cascade.request import GenerationRequest, StageSettings, build_request

PRIOR = StageSettings(steps=6, cfg=4.0, sampler="ddpm", scheduler="sgm_uniform", shift=2.0)
DECODER = StageSettings(steps=3, cfg=1.0, sampler="euler_ancestral", scheduler="karras", shift=1.0)


def picture(seed: int, size=(300, 220)) -> Image.Image:
    """A smooth random picture (a real photo's statistics matter less than being different per seed)."""
    gen = np.random.RandomState(seed)
    small = (gen.rand(6, 5, 3) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red house", negative_prompt="", width=256, height=256, seed=3, prior=PRIOR, decoder=DECODER)
    return GenerationRequest(**{**base, **kw})


def with_denoise(settings: StageSettings, denoise: float) -> StageSettings:
    return replace(settings, denoise=denoise)


@pytest.fixture(scope="module")
def encoded(tiny_pipeline):
    """Text conditioning and each test picture's Stage C encoding, computed once."""
    pipe = tiny_pipeline
    cond, uncond = pipe.encode(["a red house"]), pipe.encode([""])
    inputs = {seed: pipe.encode_image_inputs(request(image=picture(seed))) for seed in (1, 2)}
    return cond, uncond, inputs


def prior_out(pipe, cond, uncond, **kw) -> torch.Tensor:
    req = request(**kw)
    inputs = pipe.encode_image_inputs(req) if (req.image is not None or req.image_prompts) else PriorImageInputs()
    return pipe.run_prior(req, cond, uncond, images=inputs)


# --- Stage C img2img ----------------------------------------------------------------------------------------------


def test_init_latent_has_the_prior_latent_shape_and_depends_on_the_image(tiny_pipeline, encoded):
    _, _, inputs = encoded
    a, b = inputs[1].init, inputs[2].init
    assert a.shape == (1, 16, 256 // 42, 256 // 42) == b.shape
    assert torch.isfinite(a).all() and (a - b).abs().mean() > 1e-3


def test_img2img_is_deterministic_per_seed_and_changes_with_image_and_strength(tiny_pipeline, encoded):
    cond, uncond, _ = encoded
    base = dict(image=picture(1), prior=with_denoise(PRIOR, 0.6))
    one = prior_out(tiny_pipeline, cond, uncond, **base)
    again = prior_out(tiny_pipeline, cond, uncond, **base)
    other_seed = prior_out(tiny_pipeline, cond, uncond, **{**base, "seed": 4})
    other_image = prior_out(tiny_pipeline, cond, uncond, **{**base, "image": picture(2)})
    other_strength = prior_out(tiny_pipeline, cond, uncond, **{**base, "prior": with_denoise(PRIOR, 0.9)})
    assert torch.equal(one, again)
    for different in (other_seed, other_image, other_strength):
        assert (one - different).abs().mean() > 1e-4


def test_low_denoise_stays_closer_to_the_encoded_input(tiny_pipeline, encoded):
    cond, uncond, inputs = encoded
    target = inputs[1].init
    low = prior_out(tiny_pipeline, cond, uncond, image=picture(1), prior=with_denoise(PRIOR, 0.3))
    full = prior_out(tiny_pipeline, cond, uncond, image=picture(1), prior=with_denoise(PRIOR, 1.0))
    assert (low - full).abs().mean() > 1e-3
    assert (low - target).norm() < 0.5 * (full - target).norm()


def test_noising_follows_comfyui_noise_scaling(tiny_pipeline, encoded, monkeypatch):
    """The sampler starts from latent + noise * sigma0 (EPS.noise_scaling) on KSampler's denoise sigmas."""
    from cascade import sampling

    cond, uncond, inputs = encoded
    seen = {}
    real = sampling.sample

    def spy(sampler, denoiser, x, sigmas, generator=None, **kw):
        seen["x"], seen["sigmas"] = x.clone(), sigmas.clone()
        return real(sampler, denoiser, x, sigmas, generator, **kw)

    monkeypatch.setattr(sampling, "sample", spy)
    req = request(image=picture(1), prior=with_denoise(PRIOR, 0.5))
    tiny_pipeline.run_prior(req, cond, uncond, images=inputs[1])
    expected_sigmas = sampling.get_sigmas("sgm_uniform", int(6 / 0.5), 2.0)[-(6 + 1):]
    assert torch.allclose(seen["sigmas"], expected_sigmas)
    noise = torch.randn(req.prior_latent_shape()[1:], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(seen["x"][0], noise * expected_sigmas[0] + inputs[1].init[0], atol=1e-6)


def test_one_init_image_serves_the_whole_batch(tiny_pipeline):
    req = request(image=picture(1), prior=with_denoise(PRIOR, 0.5), batch_size=2, seed=10)
    batch = tiny_pipeline.generate(req).images
    second = tiny_pipeline.generate(replace(req, batch_size=1, seed=11)).images
    assert batch.shape[0] == 2
    assert torch.allclose(batch[1], second[0], atol=1e-5)


# --- Stage B img2img and upscale -------------------------------------------------------------------------------


def test_upscale_two_doubles_the_output_size(tiny_pipeline):
    result = tiny_pipeline.generate(request(upscale=2, width=256, height=384))
    assert result.images.shape == (1, 3, 768, 512)


def test_decoder_img2img_is_deterministic_and_starts_from_the_stage_a_encoding(tiny_pipeline):
    from cascade.image_inputs import stage_b_init_latent

    pipe = tiny_pipeline
    target = stage_b_init_latent(pipe.stage_a, picture(5), 256, 256, 0.43, overlap=8)
    assert target.shape == (1, 4, 64, 64)
    cond, uncond = pipe.encode(["a red house"]), pipe.encode([""])
    prior = torch.zeros(1, 16, 6, 6)

    def decoder_out(denoise: float, image=picture(5)) -> torch.Tensor:
        req = request(decoder_image=image, decoder=with_denoise(DECODER, denoise))
        return pipe.run_decoder(req, prior, cond, uncond)

    low, full = decoder_out(0.3), decoder_out(1.0)
    assert torch.equal(low, decoder_out(0.3))
    assert (low - decoder_out(0.3, picture(6))).abs().mean() > 1e-4
    assert (low - target).norm() < (full - target).norm()


def test_decoder_image_with_upscale_is_encoded_at_the_output_size(tiny_pipeline):
    req = request(decoder_image=picture(5), decoder=with_denoise(DECODER, 0.5), upscale=2)
    assert tiny_pipeline.generate(req).images.shape == (1, 3, 512, 512)


def test_stage_a_strip_encoding_is_exact(tiny_models):
    from cascade import image_inputs

    pixels = torch.rand(1, 3, 512, 384)
    whole = tiny_models.stage_a.encode(pixels)
    strips = image_inputs.encode_in_strips(tiny_models.stage_a, pixels, overlap=8)
    assert image_inputs.ENCODE_STRIP_PIXELS < 512 * 384  # the test really splits
    assert torch.allclose(whole, strips, atol=1e-6)


# --- image prompts ---------------------------------------------------------------------------------------------


def test_image_prompts_change_stage_c_and_zero_strength_equals_none(tiny_pipeline, encoded):
    cond, uncond, _ = encoded
    plain = prior_out(tiny_pipeline, cond, uncond)
    prompted = prior_out(tiny_pipeline, cond, uncond, image_prompts=(picture(7),))
    other = prior_out(tiny_pipeline, cond, uncond, image_prompts=(picture(8),))
    two = prior_out(tiny_pipeline, cond, uncond, image_prompts=(picture(7), picture(8)))
    zero = prior_out(tiny_pipeline, cond, uncond, image_prompts=(picture(7), picture(8)), image_prompt_strength=0.0)
    assert (plain - prompted).abs().mean() > 1e-4
    assert (prompted - other).abs().mean() > 1e-4
    assert (two - prompted).abs().mean() > 1e-4
    assert torch.equal(zero, plain)


def test_clip_img_is_stacked_embeddings_times_strength(tiny_pipeline):
    from cascade.image_inputs import clip_image_embeddings
    from cascade.side_parts import CLIP_VISION

    vision = tiny_pipeline.side.module(CLIP_VISION)
    one = clip_image_embeddings(vision, [picture(7)], 1.0)
    both = clip_image_embeddings(vision, [picture(7), picture(8)], 0.5)
    assert one.shape == (1, 1, tiny.TINY_CLIP_VISION["projection_dim"])
    assert both.shape == (1, 2, one.shape[-1])
    assert torch.allclose(both[:, :1], 0.5 * one, atol=1e-6)
    assert clip_image_embeddings(vision, [picture(7)], 0.0) is None


def test_clip_preprocess_follows_comfyui():
    """Short side to the model size, centre crop, 8-bit quantisation, OpenAI normalisation."""
    from cascade.models.clip_vision import CLIP_MEAN, CLIP_STD

    grey = torch.full((1, 3, 90, 60), 0.5)
    out = images.clip_vision_input(grey, 56)
    assert out.shape == (1, 3, 56, 56)
    expected = (torch.tensor(128 / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 28, 28], expected, atol=1e-5)


# --- ComfyUI resize/crop and the encoder input --------------------------------------------------------------------


def test_common_upscale_crops_the_centre_like_comfyui():
    # A 300x200 image to a square: ComfyUI crops x = round((300 - 300 * (1 / 1.5)) / 2) = 50 columns each side.
    ramp = torch.arange(300, dtype=torch.float32).repeat(1, 3, 200, 1)
    out = images.common_upscale(ramp, 200, 200, "bicubic", "center")
    assert out.shape == (1, 3, 200, 200)
    assert torch.allclose(out[0, 0, 0], torch.arange(50, 250, dtype=torch.float32), atol=1e-3)
    tall = images.common_upscale(torch.rand(1, 3, 400, 100), 128, 256, "bicubic", "center")
    assert tall.shape == (1, 3, 256, 128)


def test_stage_c_encoder_input_is_comfyui_vae_encode():
    pixels = torch.rand(1, 3, 256, 384)
    x = images.stage_c_encoder_input(pixels, 42.0)
    assert x.shape == (1, 3, 256 // 42 * 32, 384 // 42 * 32)
    resized = images.common_upscale(pixels, 384 // 42 * 32, 256 // 42 * 32, "bicubic", "center")
    assert torch.allclose(x, resized * 2 - 1)


def test_encoder_applies_imagenet_normalisation(tiny_models):
    from cascade.models.stage_c_coder import IMAGENET_MEAN, IMAGENET_STD

    encoder = tiny_models.side_models()["effnet"]
    pixels = torch.rand(1, 3, 64, 64)
    normalised = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(encoder(pixels * 2 - 1), encoder.mapper(encoder.backbone(normalised)), atol=1e-5)


# --- missing parts ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_pipeline(tmp_path_factory, tiny_models, tiny_pair, tiny_pipeline):
    """The tiny modules with Stability's bare stage_c.safetensors as the Stage C file (no encoder, no CLIP vision)."""
    from cascade.loader import resolve_sources

    folder = tmp_path_factory.mktemp("bare")
    bare = tiny.write_stability_unet(folder / "stage_c.safetensors", tiny_models, "prior")
    sources = resolve_sources(bare, tiny_pair[1])
    pipe = tiny_pipeline
    return folder, CascadePipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, prior=pipe.prior,
                                   decoder=pipe.decoder, stage_a=pipe.stage_a, device=pipe.device, sources=sources)


def test_missing_encoder_and_clip_vision_are_named_before_any_work(bare_pipeline):
    _, pipe = bare_pipeline
    events = []
    with pytest.raises(MissingComponentError, match="img2img needs the Stage C encoder: pass --stage-c-encoder "
                                                     "effnet_encoder.safetensors or use the ComfyUI main file"):
        pipe.generate(request(image=picture(1), prior=with_denoise(PRIOR, 0.5)), callback=events.append)
    with pytest.raises(MissingComponentError, match="image prompts need the CLIP-L vision encoder: pass --clip-vision"):
        pipe.generate(request(image_prompts=(picture(1),)), callback=events.append)
    assert events == []


def test_side_files_provide_the_missing_parts(bare_pipeline, tiny_models, tiny_pipeline, tmp_path):
    from cascade.side_parts import SideFiles

    _, bare = bare_pipeline
    effnet = tiny.write_side_part_file(tmp_path / "effnet_encoder.safetensors", tiny_models, "effnet")
    vision = tiny.write_side_part_file(tmp_path / "model.safetensors", tiny_models, "clip_vision")
    pipe = CascadePipeline(tokenizer=bare.tokenizer, text_encoder=bare.text_encoder, prior=bare.prior,
                           decoder=bare.decoder, stage_a=bare.stage_a, device=bare.device, sources=bare.sources,
                           side_files=SideFiles(stage_c_encoder=effnet, clip_vision=vision))
    req = request(image=picture(1), prior=with_denoise(PRIOR, 0.5), image_prompts=(picture(2),))
    from_side = pipe.encode_image_inputs(req)
    from_main = tiny_pipeline.encode_image_inputs(req)  # the main file stores fp16 weights (and mean/std)
    assert torch.allclose(from_side.init, from_main.init, atol=0.05, rtol=0.05)
    assert torch.allclose(from_side.clip_img, from_main.clip_img, atol=0.05, rtol=0.05)
    assert any("effnet_encoder.safetensors" in n for n in pipe.side.notes)


def test_encoder_next_to_a_bare_stage_c_is_found(bare_pipeline, tiny_models):
    from cascade.side_parts import EFFNET

    folder, pipe = bare_pipeline
    pipe = CascadePipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, prior=pipe.prior,
                           decoder=pipe.decoder, stage_a=pipe.stage_a, device=pipe.device, sources=pipe.sources)
    tiny.write_side_part_file(folder / "effnet_encoder.safetensors", tiny_models, "effnet")
    try:
        assert pipe.side.has(EFFNET)
        assert pipe.side.part(EFFNET).layout == "stability"
    finally:
        (folder / "effnet_encoder.safetensors").unlink()


def test_a_wrong_side_file_is_named(bare_pipeline, tiny_pair):
    from cascade.side_parts import SideFiles, SideParts

    _, pipe = bare_pipeline
    side = SideParts(pipe.sources.prior_checkpoint, SideFiles(stage_c_encoder=tiny_pair[1]))
    with pytest.raises(MissingComponentError, match=r"holds no Stage C EfficientNet encoder.*--stage-c-encoder needs"):
        side.check()


def test_main_file_lists_real_side_parts(tiny_pair):
    from cascade.checkpoints import scan
    from cascade.side_parts import KINDS, SideFiles, find_part

    ckpt = scan(tiny_pair[0])
    for kind in KINDS:
        part = find_part(kind, ckpt, SideFiles())
        assert part is not None and part.config == tiny.TINY_CONFIGS[kind]


# --- request rules and bad images --------------------------------------------------------------------------------


def test_denoise_without_an_image_says_what_is_missing():
    with pytest.raises(InvalidRequestError, match="prior denoise 0.6 needs an init image.*--image"):
        build_request(prompt="x", denoise=0.6)
    with pytest.raises(InvalidRequestError, match="decoder denoise 0.4 needs a decoder image.*--decoder-image"):
        build_request(prompt="x", decoder_denoise=0.4)
    assert build_request(prompt="x", image=picture(1), image_denoise=0.6).prior.denoise == 0.6


@pytest.mark.parametrize("kw, message", [
    (dict(upscale=0), "upscale 0 must be a whole number from 1 to 4"),
    (dict(upscale=2, width=4096), "larger than 4096"),
    (dict(image_prompt_strength=11.0), "image prompt strength 11.0 must be between -10 and 10"),
    (dict(image="in.png"), "init image must be a PIL image"),
    (dict(preview_every=-1), "preview every -1"),
])
def test_image_field_limits(kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        build_request(prompt="x", **kw)


def test_bad_image_files_get_clear_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    png = tmp_path / "ok.png"
    picture(1).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:200])
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    tiny_png = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny_png)
    cases = [(tmp_path / "missing.png", "no such file"), (tmp_path, "is not a file"),
             (text, "is not an image PIL can read"), (truncated, "cannot be read"),
             (gif, r"animated \(2 frames\)"), (tiny_png, "is 1x1; it needs at least 16x16")]
    for path, message in cases:
        with pytest.raises(images.ImageError, match=message):
            images.load_image(path, "init image")
    with pytest.raises(images.ImageError, match="floating-point pixels"):
        images.load_image(Image.new("F", (32, 32)))
    with pytest.raises(images.ImageError, match="'LAB' pixels"):
        images.load_image(Image.new("LAB", (32, 32)))
    assert images.load_image(png).size == (300, 220)


def test_documented_conversions(tmp_path):
    # Alpha is dropped, the stored colours kept (ComfyUI LoadImage's convert("RGB")).
    rgba = Image.new("RGBA", (20, 20), (200, 100, 50, 0))
    assert torch.allclose(images.to_tensor(rgba), images.to_tensor(rgba.convert("RGB")))
    # 16-bit greyscale keeps its full range: 65535 -> 1.0, 32768 -> 0.5.
    grey16 = tmp_path / "g16.png"
    values = np.full((20, 20), 32768, dtype=np.uint16)
    values[0, 0] = 65535
    Image.fromarray(values).save(grey16)
    pixels = images.to_tensor(images.load_image(grey16))
    assert pixels.shape == (1, 3, 20, 20)
    assert pixels[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert abs(float(pixels[0, 0, 5, 5]) - 32768 / 65535) < 1e-6
    # Greyscale and palette images become RGB; EXIF orientation is applied.
    assert images.to_tensor(Image.new("L", (20, 24), 128)).shape == (1, 3, 24, 20)
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    rotated.save(path, exif=exif)
    assert images.to_tensor(images.load_image(path)).shape == (1, 3, 40, 20)


# --- the command line, as a user runs it ---------------------------------------------------------------------------


def cli(tiny_pair, out, *flags: str, size=("256", "384")) -> int:
    from cascade.cli import main

    prior, decoder = tiny_pair
    return main(["generate", "a red house", "--prior", str(prior), "--decoder", str(decoder), "--out", str(out),
                 "--width", size[0], "--height", size[1], "--steps", "3", "--decoder-steps", "2", "--seed", "9",
                 "--device", "cpu", "--dtype", "fp32", "--quiet", *flags])


@pytest.fixture
def pictures(tmp_path):
    paths = {}
    for seed in (1, 2):
        paths[seed] = tmp_path / f"in{seed}.png"
        picture(seed).save(paths[seed])
    return paths


def test_cli_img2img_uses_the_image_and_records_the_strength(tiny_pair, pictures, tmp_path, capsys):
    from cascade.infotext import parse_infotext

    outs = [tmp_path / f"o{i}.png" for i in range(3)]
    assert cli(tiny_pair, outs[0], "--image", str(pictures[1]), "--denoise", "0.6") == 0
    assert cli(tiny_pair, outs[1], "--image", str(pictures[1]), "--denoise", "0.6") == 0
    assert cli(tiny_pair, outs[2], "--image", str(pictures[2]), "--denoise", "0.6") == 0
    pixels = [np.asarray(Image.open(p), dtype=np.float32) for p in outs]
    assert pixels[0].shape == (384, 256, 3)
    assert np.array_equal(pixels[0], pixels[1])  # the same seed and image: the same file
    assert np.abs(pixels[0] - pixels[2]).mean() > 0.5  # another init image: another result
    params = parse_infotext(Image.open(outs[0]).text["parameters"])
    assert params["Denoising strength"] == "0.6"


def test_cli_upscale_two_doubles_the_output_and_decoder_image_runs(tiny_pair, pictures, tmp_path):
    out = tmp_path / "up.png"
    assert cli(tiny_pair, out, "--upscale", "2", "--decoder-image", str(pictures[1]), "--decoder-denoise", "0.4") == 0
    assert Image.open(out).size == (512, 768)


def test_cli_bare_stage_c_names_the_missing_parts_and_side_files_provide_them(tiny_models, tiny_pair, pictures,
                                                                               tmp_path, capsys):
    """Stability's bare stage_c.safetensors: --image / --image-prompt fail with the flag to pass; with the side files
    (effnet_encoder.safetensors, a CLIPVisionModelWithProjection file) the same command runs."""
    from cascade.cli import main

    prior = tiny.write_stability_unet(tmp_path / "stage_c.safetensors", tiny_models, "prior")
    clip = tiny.write_text_encoder_side_file(tmp_path / "clip_g.safetensors", tiny_models)
    common = ["generate", "x", "--prior", str(prior), "--decoder", str(tiny_pair[1]), "--text-encoder", str(clip),
              "--width", "128", "--height", "128", "--steps", "2", "--decoder-steps", "1", "--device", "cpu",
              "--quiet", "--out"]
    assert main([*common, str(tmp_path / "a.png"), "--image", str(pictures[1]), "--denoise", "0.5"]) == 2
    assert "img2img needs the Stage C encoder: pass --stage-c-encoder" in capsys.readouterr().err
    assert main([*common, str(tmp_path / "b.png"), "--image-prompt", str(pictures[1])]) == 2
    assert "image prompts need the CLIP-L vision encoder: pass --clip-vision" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    effnet = tiny.write_side_part_file(tmp_path / "side" / "effnet_encoder.safetensors", tiny_models, "effnet")
    vision = tiny.write_side_part_file(tmp_path / "side" / "model.safetensors", tiny_models, "clip_vision")
    assert main([*common, str(tmp_path / "c.png"), "--image", str(pictures[1]), "--denoise", "0.5",
                 "--stage-c-encoder", str(effnet), "--image-prompt", str(pictures[2]), "--clip-vision",
                 str(vision)]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "c.png").size == (128, 128)


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the CLI gets as far as opening the pipeline: these mistakes are caught before any load."""
    import cascade.session

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was opened before the error was found")

    monkeypatch.setattr(cascade.session, "open_pipeline", refuse)


def bad_inputs(tmp_path: Path, tiny_pair) -> list[tuple[list[str], str]]:
    good = tmp_path / "good.png"
    picture(1).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    return [
        (["--image", str(tmp_path / "missing.png"), "--denoise", "0.5"], "init image missing.png: no such file"),
        (["--image", str(truncated), "--denoise", "0.5"], "init image truncated.png cannot be read"),
        (["--image", str(text), "--denoise", "0.5"], "init image notes.png is not an image PIL can read"),
        (["--image", str(dot), "--denoise", "0.5"], "init image dot.png is 1x1; it needs at least 16x16"),
        (["--decoder-image", str(gif)], r"decoder image anim.gif is animated \(2 frames\)"),
        (["--image-prompt", str(good), "--image-prompt", str(dot)], "image prompt 2 dot.png is 1x1"),
        (["--denoise", "0.5"], "prior denoise 0.5 needs an init image to start from: pass --image"),
        (["--decoder-denoise", "0.4"], "decoder denoise 0.4 needs a decoder image to start from: pass --decoder-image"),
        (["--image-prompt", str(good), "--clip-vision", str(tmp_path / "none.safetensors")],
         "--clip-vision .*none.safetensors: no such file; it needs a Hugging Face CLIPVisionModelWithProjection"),
        (["--image-prompt", str(good), "--clip-vision", str(good)], "--clip-vision: good.png: header length"),
        (["--image", str(good), "--stage-c-encoder", str(tiny_pair[1])],
         "holds no Stage C EfficientNet encoder.*--stage-c-encoder needs"),
        (["--upscale", "5"], "upscale 5 must be a whole number from 1 to 4"),
    ]


def test_cli_bad_image_inputs_are_one_line_exit_2_before_loading(tiny_pair, tmp_path, no_loading, capsys):
    import re

    for flags, message in bad_inputs(tmp_path, tiny_pair):
        out = tmp_path / "never.png"
        assert cli(tiny_pair, out, *flags) == 2, flags
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (flags, captured.err)
        assert re.search(message, lines[0]), (message, lines[0])
        assert "Traceback" not in captured.err and not out.exists()
