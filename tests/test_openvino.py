"""OpenVINO for real on this machine's CPU: compiled output vs eager torch, first compile vs cached re-run.

Tolerance (fp32 on the OpenVINO CPU plugin, f32 inference precision): max |ov - eager| <= 1e-4 * max(1, max|eager|).
Measured here: about 2e-6 on outputs of magnitude ~3.  Timings are printed (pytest -s) and kept in
`TIMINGS` for the session summary.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cascade_backends
from cascade_backends import openvino as bov

pytestmark = pytest.mark.skipif(not bov.is_available(), reason="openvino not installed")

ATOL_REL = 1e-4
TIMINGS: dict[str, float] = {}


class TinyBlock(nn.Module):
    """conv + norm + attention + MLP: the op mix of the Cascade UNets, at toy size."""

    def __init__(self, c: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.heads = heads

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
        x = x + self.conv(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if cond is not None:
            t = t + cond[:, None, :]
        q, k, v = self.qkv(self.norm(t)).chunk(3, -1)
        q, k, v = (z.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        t = t + self.proj(a) * scale
        t = t + self.mlp(t)
        return t.transpose(1, 2).reshape(b, c, h, w)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TinyBlock()

    def forward(self, x, cond=None, return_dict: bool = True):
        y = self.block(x, cond)
        return {"sample": y, "mean": y.mean((2, 3))} if return_dict else (y,)


class TinyVQ(nn.Module):
    """Stage A-like: the pipeline calls .decode(), not forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.GELU(), nn.PixelShuffle(2), nn.Conv2d(4, 3, 1))

    def decode(self, latents, return_dict: bool = True):
        y = self.up(latents)
        return {"sample": y} if return_dict else (y,)

    def forward(self, x):
        raise AssertionError("forward is not what the pipeline calls")


class _Opaque:
    pass


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 32, 1), TinyBlock(), TinyBlock(), nn.Conv2d(32, 4, 1)).eval()


def _close(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out - ref).abs().max().item()
    assert diff <= ATOL_REL * max(1.0, ref.abs().max().item()), diff
    return diff


def test_openvino_backend_selected_on_cpu():
    b = cascade_backends.select_backend("openvino:CPU")
    assert b.name == "openvino" and b.ov_device == "CPU" and b.device.type == "cpu"
    assert "CPU" in bov.devices()
    with pytest.raises(cascade_backends.BackendUnavailable, match="available"):
        bov.compile_module(_model(), device="NPU.7")
    # precision: the caller's hint (cascade.precision: f32 for the prior on an OpenVINO GPU), else the device default
    assert "INFERENCE_PRECISION_HINT" not in bov.compile_module(_model()).ov_config
    assert bov.compile_module(_model(), precision="f32").ov_config["INFERENCE_PRECISION_HINT"] == "f32"
    with pytest.raises(ValueError):
        bov.compile_module(_model(), method="inductor")


def test_convert_matches_eager_and_cache_reruns_faster(tmp_path):
    m = _model()
    x = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        ref = m(x)
    cm = bov.compile_module(m, device="CPU", cache_dir=tmp_path, precision="f32")
    out, first = bov.timed_call(cm, x)
    diff = _close(out, ref)
    assert cm.events[-1].load == "converted"
    with torch.inference_mode():
        cm(x * 2)
    _close(out, ref)  # outputs are copies: the next inference must not overwrite them
    # a fresh wrapper (as in a new process): reads the IR and imports the compiled blob, no tracing
    cm2 = bov.compile_module(_model(), device="CPU", cache_dir=tmp_path, precision="f32")
    out2, cached = bov.timed_call(cm2, x)
    _close(out2, ref)
    assert cm2.events[-1].load == "cached"
    assert cached < first
    assert any((tmp_path / "blob").iterdir()) and any((tmp_path / "ir").glob("*.xml"))
    # steady state vs eager on the same input (informational; 2 shared cores are noisy)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(5):
            cm2(x)
        t1 = time.perf_counter()
        for _ in range(5):
            m(x)
        t2 = time.perf_counter()
    TIMINGS.update(convert_first_s=first, convert_cached_s=cached, max_abs_diff=diff,
                   ov_step_s=(t1 - t0) / 5, eager_step_s=(t2 - t1) / 5)
    print(f"\n[openvino] convert: first call {first:.2f}s, cached re-run {cached:.2f}s, max|diff| {diff:.2e}, "
          f"step ov {(t1 - t0) / 5 * 1e3:.1f} ms vs eager {(t2 - t1) / 5 * 1e3:.1f} ms")


def test_convert_kwargs_structures_shapes_and_attributes(tmp_path):
    torch.manual_seed(0)
    m = DictOut().eval()
    m.config = {"in_channels": 32}
    x, cond = torch.randn(2, 32, 8, 8), torch.randn(2, 32)
    cm = bov.compile_module(m, cache_dir=tmp_path, precision="f32")
    assert cm.config == {"in_channels": 32}  # attributes fall through to the wrapped module
    with torch.inference_mode():
        ref = m(x, cond=cond)
        out = cm(x, cond=cond)
        assert set(out) == {"sample", "mean"}
        _close(out["sample"], ref["sample"]), _close(out["mean"], ref["mean"])
        (y,) = cm(x, cond=cond, return_dict=False)  # non-tensor kwargs are part of the signature
        _close(y, ref["sample"])
        y2 = cm(x[:1], cond=None, return_dict=False)[0]  # new shape / None input: compiled again
        _close(y2, m(x[:1], return_dict=False)[0])
    assert [e.load for e in cm.events] == ["converted"] * 3
    cm2 = bov.compile_module(m, cache_dir=tmp_path, precision="f32")  # dict output structure restored from the cache
    with torch.inference_mode():
        assert set(cm2(x, cond=cond)) == {"sample", "mean"}
    assert cm2.events[-1].load == "cached"
    with pytest.raises(TypeError, match="bfloat16"):
        cm(x.to(torch.bfloat16), cond=cond.to(torch.bfloat16))


def test_convert_other_entry_point(tmp_path):
    torch.manual_seed(0)
    vq = TinyVQ().eval()
    z = torch.randn(1, 4, 8, 8)
    cm = bov.compile_module(vq, cache_dir=tmp_path, entry="decode", precision="f32")
    with torch.inference_mode():
        _close(cm.decode(z)["sample"], vq.decode(z)["sample"])
        _close(cm.decode(z, return_dict=False)[0], vq.decode(z)["sample"])
    assert len(cm.events) == 2
    again = bov.compile_module(vq, cache_dir=tmp_path, entry="decode", precision="f32")
    with torch.inference_mode():
        again.decode(z)
    assert again.events[-1].load == "cached"
    with torch.no_grad():  # new weights -> new key -> converted again (a stale IR is never reused)
        vq.up[0].weight.add_(0.01)
    changed = bov.compile_module(vq, cache_dir=tmp_path, entry="decode", precision="f32")
    with torch.inference_mode():
        _close(changed.decode(z)["sample"], vq.decode(z)["sample"])
    assert changed.events[-1].load == "converted"
    vq.decode = lambda latents: _Opaque()
    with pytest.raises(TypeError, match="non-tensor"):
        with torch.inference_mode():
            bov.compile_module(vq, entry="decode").decode(z)
    with pytest.raises(ValueError, match="convert"):
        bov.compile_module(TinyVQ(), entry="decode", method="torch.compile")


def test_torch_compile_backend_matches_eager(tmp_path):
    m = _model(seed=2)
    x = torch.randn(1, 4, 16, 16)
    with torch.inference_mode():
        ref = m(x)
    before = len(bov.fallback_events)
    cm = bov.compile_module(m, device="CPU", cache_dir=tmp_path, method="torch.compile", precision="f32")
    out, first = bov.timed_call(cm, x)
    _close(out, ref)
    out, second = bov.timed_call(cm, x)
    _close(out, ref)
    assert len(bov.fallback_events) == before, bov.fallback_events  # ran in OpenVINO, not torch
    TIMINGS.update(torch_compile_first_s=first)
    print(f"\n[openvino] torch.compile: first call {first:.2f}s, next call {second * 1e3:.1f} ms")
