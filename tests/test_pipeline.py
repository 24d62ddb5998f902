"""End-to-end tiny generation: determinism, sizes, compression, CFG skipping, interrupts, batches, validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cascade.errors import GenerationInterrupted, InvalidRequestError
from cascade.request import GenerationRequest, StageSettings, validate

FAST_PRIOR = StageSettings(steps=6, cfg=7.0, sampler="ddpm", scheduler="sgm_uniform", shift=2.0)
FAST_DECODER = StageSettings(steps=3, cfg=1.0, sampler="euler_ancestral", scheduler="karras", shift=1.0)


def request(**kw) -> GenerationRequest:
    base = dict(prompt="1girl, solo, smile", negative_prompt="worst quality", width=256, height=384, seed=7,
                prior=FAST_PRIOR, decoder=FAST_DECODER)
    return GenerationRequest(**{**base, **kw})


class CallCounter:
    def __init__(self, module):
        self.calls, self.batches = 0, []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        self.batches.append(args[0].shape[0])

    def remove(self):
        self.handle.remove()


def test_same_seed_same_image_and_size(tiny_pipeline):
    a = tiny_pipeline.generate(request())
    b = tiny_pipeline.generate(request())
    assert a.images.shape == (1, 3, 384, 256)
    assert torch.equal(a.images, b.images)
    assert a.seeds == [7]


def test_generate_is_its_stages_composed(tiny_pipeline):
    """generate = encode -> run_prior -> run_decoder -> decode, with nothing dropped or re-seeded in between."""
    req = request(seed=5)
    cond, uncond = tiny_pipeline.encode([req.prompt]), tiny_pipeline.encode([req.negative_prompt])
    prior = tiny_pipeline.run_prior(req, cond, uncond)
    latents = tiny_pipeline.run_decoder(req, prior, cond, uncond)
    pixels = tiny_pipeline.decode(latents, req.stage_a_scale)
    assert torch.equal(tiny_pipeline.generate(req).images, pixels)
    assert pixels.std() > 0.01  # a picture, not a constant (black or grey) image


def test_different_seeds_differ(tiny_pipeline):
    a = tiny_pipeline.generate(request(seed=1))
    b = tiny_pipeline.generate(request(seed=2))
    assert (a.images - b.images).abs().mean() > 0.01


def test_random_seed_is_drawn_and_reported(tiny_pipeline):
    """-1 draws a seed, and the reported seed is the one used: running it again gives the same image."""
    first, second = tiny_pipeline.generate(request(seed=-1)), tiny_pipeline.generate(request(seed=-1))
    assert first.seeds != second.seeds and first.request.seed == first.seeds[0]
    again = tiny_pipeline.generate(request(seed=first.seeds[0]))
    assert torch.equal(first.images, again.images)


@pytest.mark.parametrize("compression,expected", [(42, (9, 6)), (32, (12, 8)), (64, (6, 4))])
def test_prior_latent_follows_compression(tiny_pipeline, compression, expected):
    shapes = {}
    tiny_pipeline.generate(request(compression=compression), callback=lambda e: shapes.setdefault(e.stage, e.latents.shape))
    assert shapes["prior"] == (1, 16, *expected)  # H//c x W//c for 384x256
    assert shapes["decoder"] == (1, 4, 96, 64)  # H/4 x W/4, independent of compression


def test_cfg_one_skips_unconditional_pass(tiny_pipeline):
    prior, decoder = CallCounter(tiny_pipeline.prior), CallCounter(tiny_pipeline.decoder)
    try:
        tiny_pipeline.generate(request(decoder=replace(FAST_DECODER, cfg=1.0)))
        assert prior.calls == FAST_PRIOR.steps and set(prior.batches) == {2}  # cond+uncond batched
        assert decoder.calls == FAST_DECODER.steps and set(decoder.batches) == {1}  # CFG 1.0: cond only
        decoder.calls, decoder.batches = 0, []
        tiny_pipeline.generate(request(decoder=replace(FAST_DECODER, cfg=1.2)))
        assert set(decoder.batches) == {2}
    finally:
        prior.remove()
        decoder.remove()


def test_progress_reports_every_step_of_both_stages(tiny_pipeline):
    events = []
    tiny_pipeline.generate(request(), callback=lambda e: events.append((e.stage, e.step, e.total)))
    assert events == [("prior", i, 6) for i in range(1, 7)] + [("decoder", i, 3) for i in range(1, 4)]


def test_interrupt_stops_between_steps(tiny_pipeline):
    seen = []

    def interrupt() -> bool:
        return len(seen) >= 2

    with pytest.raises(GenerationInterrupted, match="prior stage at step 2/6"):
        tiny_pipeline.generate(request(), callback=lambda e: seen.append(e.step), interrupt=interrupt)
    assert seen == [1, 2]
    # The pipeline is still usable afterwards.
    assert tiny_pipeline.generate(request()).images.shape == (1, 3, 384, 256)


def test_batch_image_equals_single_run_with_seed_plus_index(tiny_pipeline):
    batch = tiny_pipeline.generate(request(batch_size=2, seed=10))
    assert batch.seeds == [10, 11]
    for i, seed in enumerate(batch.seeds):
        single = tiny_pipeline.generate(request(seed=seed))
        assert torch.allclose(batch.images[i], single.images[0], atol=1e-4)


def test_long_and_short_prompts_together(tiny_pipeline):
    """A 2-chunk positive with a 1-chunk negative runs (tiled like ComfyUI) and differs from the short prompt."""
    long_prompt = ", ".join(["masterpiece", "1girl", "solo", "smile"] * 30)
    long = tiny_pipeline.generate(request(prompt=long_prompt))
    short = tiny_pipeline.generate(request())
    assert long.images.shape == short.images.shape
    assert not torch.equal(long.images, short.images)


def test_precomputed_conditioning_equals_prompt_path(tiny_pipeline):
    """Hosts (SD.Next) may pass their own embeddings; the same embeddings give the same image."""
    req = request()
    cond, uncond = tiny_pipeline.encode([req.prompt]), tiny_pipeline.encode([req.negative_prompt])
    a = tiny_pipeline.generate(req, cond=cond, uncond=uncond)
    b = tiny_pipeline.generate(req)
    assert torch.equal(a.images, b.images)


class _LinearEps(torch.nn.Module):
    """A stand-in UNet whose epsilon is known in closed form: eps = x * a + b, a and b from the conditioning."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, r, a, b, return_dict=False):
        return (x * a + b,)


@pytest.mark.parametrize("rho", [0.0, 0.7, 1.0])
def test_cfg_and_rescale_follow_the_original_formula(rho):
    """x0 = x - sigma * eps', eps = eps_u + w (eps_c - eps_u), eps' = rho * eps * std(eps_c) / std(eps) + (1 - rho) *
    eps, std over each image (the original gdf's cfg_rho; for one image its whole-tensor std)."""
    from cascade.pipeline import cfg_denoiser

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    cond = {"a": torch.full((2, 1, 1, 1), 0.5), "b": torch.randn(2, 3, 4, 4, generator=gen)}
    uncond = {"a": torch.full((2, 1, 1, 1), -0.2), "b": torch.zeros(2, 3, 4, 4)}
    sigma, w = torch.tensor([2.0]), 7.0
    x_in = x / torch.sqrt(sigma**2 + 1)
    eps_c, eps_u = x_in * 0.5 + cond["b"], x_in * -0.2
    eps = eps_u + w * (eps_c - eps_u)
    per_image = lambda t: t.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    expected = x - sigma * (rho * eps * per_image(eps_c) / per_image(eps) + (1 - rho) * eps)
    got = cfg_denoiser(_LinearEps(), cond, uncond, w, rescale=rho)(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(width=1000), r"width 1000 is not a multiple of 128 \(nearest valid: 896 or 1024\)"),
        (dict(height=100), r"height 100 .*nearest valid: 128"),
        (dict(compression=8), "compression 8 is outside"),
        (dict(batch_size=0), "batch size 0"),
        (dict(prior=replace(FAST_PRIOR, steps=0)), "prior steps 0"),
        (dict(decoder=replace(FAST_DECODER, denoise=0.0)), "decoder denoise"),
    ],
)
def test_invalid_requests_name_the_fix(kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        validate(request(**kw))


def test_stage_a_decodes_scale_times_the_latent(tiny_pipeline):
    """Stage A sees `stage_a_scale` x Stage B's latent (0.43 original/ComfyUI, 0.3764 diffusers), then clamps to
    [0, 1]: decoding with scale s equals decoding s/0.43 x the latent at 0.43, and the model's own decode."""
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 4, 32, 24, generator=gen)
    at_diffusers = tiny_pipeline.decode(latent, 0.3764)
    torch.testing.assert_close(at_diffusers, tiny_pipeline.decode(latent * (0.3764 / 0.43), 0.43), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        direct = tiny_pipeline.stage_a.decode(latent * 0.3764, return_dict=False)[0].float().clamp(0, 1)
    torch.testing.assert_close(at_diffusers, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(at_diffusers, tiny_pipeline.decode(latent, 0.43), atol=1e-3)


def test_stage_a_strip_decode_is_exact():
    """Decoding in strips gives the single-decode pixels (real Stage A depth, narrow width), and the overlap matters."""
    import cascade.activations as activations
    import cascade.pipeline as pipeline
    from cascade import configs
    from cascade.models import PaellaVQModel

    gen = torch.Generator().manual_seed(0)
    stage_a = PaellaVQModel.from_config({**configs.STAGE_A, "embed_dim": 32}).eval()
    with torch.no_grad():
        for name, p in stage_a.named_parameters():
            if name.endswith("gammas"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        latent = torch.randn(1, 4, 100, 40, generator=gen)
        whole = stage_a.decode(latent, return_dict=False)[0]
        strips = activations.stage_a_strips(100, 40, 16)
        assert len(strips) == 1  # small images decode in one go
        original = activations.STAGE_A_STRIP_PIXELS
        activations.STAGE_A_STRIP_PIXELS = 12 * 40  # force 9 strips of 12 rows
        try:
            tiled = pipeline.decode_in_strips(stage_a, latent, pipeline.stage_a_overlap(stage_a.config))
            too_little_context = pipeline.decode_in_strips(stage_a, latent, 2)
        finally:
            activations.STAGE_A_STRIP_PIXELS = original
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-5
    assert (too_little_context - whole).abs().max() > 1e-3
