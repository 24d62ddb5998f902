"""A diffusers attention processor that never builds an attention score tensor larger than the device allows.

Intel Arc Alchemist cannot allocate more than 4 GiB in one piece (cascade_backends.attention turns that into a
score budget); `cascade_backends.attention.scaled_dot_product_attention` splits over batch, heads and queries to stay
under it and is plain SDPA when no split is needed. The processor is installed on the UNets only when the backend has
such a limit.
"""

from __future__ import annotations

import torch
from torch import nn


class ChunkedSDPAProcessor:
    """diffusers `Attention` processor (same math as AttnProcessor2_0) with a bounded score tensor."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        from cascade_backends.attention import scaled_dot_product_attention

        residual = hidden_states
        image_like = hidden_states.ndim == 4
        if image_like:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = scaled_dot_product_attention(q, k, v, max_bytes=self.max_bytes, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_like:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def bound_attention(module: nn.Module, max_bytes: int | None) -> nn.Module:
    """Install the chunked processor on every diffusers Attention in `module` when the device has a limit."""
    if max_bytes is not None and hasattr(module, "set_attn_processor"):
        module.set_attn_processor(ChunkedSDPAProcessor(max_bytes))
    return module
