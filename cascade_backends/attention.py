"""Attention that never materialises a score tensor larger than a byte budget (Arc Alchemist's 4 GiB cap).

Softmax rows are independent, so splitting over leading dims (batch, heads) and then over query rows gives the
same result as one F.scaled_dot_product_attention call.  The budget comes from the device's policy
(`attention_policy(backend)`, also `Backend.max_attention_bytes`); the kernels themselves do no device checks.
Not supported: is_causal, dropout, GQA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .types import AttentionPolicy, GiB

if TYPE_CHECKING:
    from .base import Backend

# When a device caps single allocations, attention scores are chunked to a quarter of the cap: softmax needs
# temporaries of the same size (and the math path may upcast), so 4 GiB Arc gets 1 GiB chunks - the size
# SD.Next's slicer uses too.
ATTENTION_FRACTION = 4

_KERNELS = {
    "cuda": "SDPA (flash / memory-efficient / cuDNN, chosen by torch)",
    "rocm": "SDPA (AOTriton flash/mem-efficient where built for the arch, else math)",
    "xpu": "SDPA (oneDNN fused on torch >= 2.7; FlashAttention only on Battlemage/PVC)",
    "mps": "SDPA (MPS fused kernel)",
    "cpu": "SDPA (CPU flash-attention kernel)",
    "openvino": "OpenVINO ScaledDotProductAttention (fused by the converter)",
}


def attention_policy(backend: "Backend") -> AttentionPolicy:
    """Plain SDPA, or chunked SDPA with a score budget of a quarter of the device's single-allocation cap."""
    limit = backend.capabilities.max_alloc_bytes
    kernel = _KERNELS[backend.name]
    if limit is None:
        return AttentionPolicy(kernel, None, "no single-allocation limit: plain SDPA")
    chunk = max(limit // ATTENTION_FRACTION, 64 * 1024**2)
    return AttentionPolicy(f"chunked {kernel}", chunk,
                           f"device caps one allocation at {limit / GiB:.1f} GiB: attention scores chunked to "
                           f"<= {chunk / GiB:.2f} GiB")


def score_bytes(q: torch.Tensor, k: torch.Tensor) -> int:
    """Size of the (…, Lq, Lk) score tensor a non-fused kernel would allocate, in q's element size."""
    lead = math.prod(q.shape[:-2])
    return lead * q.shape[-2] * k.shape[-2] * q.element_size()


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, max_bytes: int | None,
                                 attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, chunked only when the scores would exceed `max_bytes` (None = never)."""
    if max_bytes is None or score_bytes(q, k) <= max_bytes:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return chunked_sdpa(q, k, v, max_bytes=max_bytes, attn_mask=attn_mask, scale=scale)


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, max_bytes: int,
                 attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Split over leading dims, then query rows, so that no chunk's scores exceed `max_bytes`.

    q: (..., Lq, E), k: (..., Lk, E), v: (..., Lk, Ev) with equal (or size-1) leading dims; attn_mask broadcastable
    to (..., Lq, Lk).  If a single query row is already over budget, one row per chunk is the floor."""
    if q.dim() < 2:
        raise ValueError("q must be at least 2-D (..., L, E)")
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    return _run(q, k, v, attn_mask, scale, max_bytes)


def _take(t: torch.Tensor, dims: int, i: int, j: int, n: int) -> torch.Tensor:
    """Slice leading dim 0 of a tensor aligned right with a `dims`-D q; size-1/missing dims broadcast."""
    off = t.dim() - dims
    if off < 0 or t.shape[off] != n or n == 1:
        return t
    idx = (slice(None),) * off + (slice(i, j),)
    return t[idx]


def _drop(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Remove leading dim 0 (size 1 in q) from a tensor aligned right with a `dims`-D q."""
    off = t.dim() - dims
    if off < 0:
        return t
    idx = (slice(None),) * off + (0,)
    return t[idx]


def _run(q, k, v, mask, scale, max_bytes):
    total = score_bytes(q, k)
    if total <= max_bytes:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    n = q.shape[0]
    if q.dim() >= 3 and n > 1:
        step = max(1, max_bytes // math.ceil(total / n))
        outs = []
        for i in range(0, n, step):
            j = min(i + step, n)
            m = None if mask is None else _take(mask, q.dim(), i, j, n)
            outs.append(_run(q[i:j], _take(k, q.dim(), i, j, n), _take(v, q.dim(), i, j, n), m, scale, max_bytes))
        return torch.cat(outs, 0)
    if q.dim() > 3:  # leading dim of size 1: descend into the next one
        m = None if mask is None else _drop(mask, q.dim())
        return _run(q[0], _drop(k, q.dim()), _drop(v, q.dim()), m, scale, max_bytes).unsqueeze(0)
    # (1, Lq, E) or (Lq, E): split query rows
    lq = q.shape[-2]
    row_bytes = max(1, total // lq)
    rows = max(1, max_bytes // row_bytes)
    outs = []
    for r in range(0, lq, rows):
        s = min(r + rows, lq)
        m = mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == lq and lq > 1:
            m = mask[..., r:s, :]
        outs.append(F.scaled_dot_product_attention(q[..., r:s, :], k, v, attn_mask=m, scale=scale))
    return torch.cat(outs, -2)
