"""The engine on the backend layer: bounded attention, the NaN guard, and OpenVINO end to end on the tiny model."""

from __future__ import annotations

import pytest
import torch

from cascade.request import GenerationRequest, StageSettings

FAST = dict(prior=StageSettings(3, 4.0, "dpmpp_2m", "sgm_uniform", 2.0),
            decoder=StageSettings(2, 1.0, "euler", "karras", 1.0))


def test_chunked_attention_processor_equals_sdpa(tiny_models):
    from cascade.attention import bound_attention
    from cascade.models import CascadeUNet
    from cascade.tiny import TINY_PRIOR

    unet = CascadeUNet.from_config(TINY_PRIOR).eval()
    unet.load_state_dict(tiny_models.prior.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 8, generator=g)
    kw = dict(clip_text=torch.randn(2, 77, 32, generator=g), clip_text_pooled=torch.randn(2, 1, 32, generator=g),
              clip_img=torch.zeros(2, 1, 768))
    r = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        reference = unet(x, r, **kw).sample
        bound_attention(unet, max_bytes=4096)  # far below one head's 48x(48+85) scores: forces query chunking
        chunked = unet(x, r, **kw).sample
    assert torch.allclose(reference, chunked, atol=1e-5)


def test_nan_in_bf16_retries_in_fp32_and_records_it(tiny_pair, nan_when_bf16):
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline

    pipe, _ = load_pipeline(*tiny_pair, backend=select_backend("cpu"), dtype=torch.bfloat16)
    assert next(pipe.prior.parameters()).dtype == torch.bfloat16

    handle = pipe.prior.register_forward_hook(nan_when_bf16)
    try:
        result = pipe.generate(GenerationRequest("a cat", width=128, height=128, seed=1, **FAST))
    finally:
        handle.remove()
    assert torch.isfinite(result.images).all()
    assert result.dtypes["prior"] == "float32" and result.dtypes["decoder"] == "bfloat16"
    assert any("prior produced NaN/inf in bf16" in w for w in result.warnings)


def test_nan_in_fp32_is_a_clear_error(tiny_pair):
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline
    from cascade.errors import CascadeError

    pipe, _ = load_pipeline(*tiny_pair, backend=select_backend("cpu"), dtype=torch.bfloat16)
    handle = pipe.decoder.register_forward_hook(lambda m, a, out: (torch.full_like(out[0], float("nan")),))
    try:
        with pytest.raises(CascadeError, match="decoder produced NaN/inf in bf16 and again in fp32.*damaged"):
            pipe.generate(GenerationRequest("a cat", width=128, height=128, seed=1, **FAST))
    finally:
        handle.remove()


@pytest.mark.slow
def test_openvino_generation_matches_eager(tiny_pair, tmp_path, monkeypatch):
    """Stage C, Stage B and Stage A compiled by OpenVINO (CPU) give the eager image within 2/255."""
    pytest.importorskip("openvino")
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline

    monkeypatch.setenv("CASCADE_CACHE_DIR", str(tmp_path))
    request = GenerationRequest("a cat", width=128, height=128, seed=5, **FAST)
    eager, _ = load_pipeline(*tiny_pair, backend=select_backend("cpu"), dtype=torch.float32)
    compiled, _ = load_pipeline(*tiny_pair, backend=select_backend("openvino"), dtype=torch.float32)
    assert type(compiled.prior).__name__ == "OpenVINOModule" and type(compiled.stage_a).__name__ == "OpenVINOModule"
    a = eager.generate(request).images
    b = compiled.generate(request).images
    assert (a - b).abs().max() <= 2 / 255
