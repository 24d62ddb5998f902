"""Key normalisation: from the names a file uses to the names our model classes use.

Three naming schemes exist for the same Stable Cascade UNet (reference §1.1-1.5):
- Stability's originals and kohya: attention as `attention.attn.in_proj_{weight,bias}` (q,k,v stacked on dim 0)
  and `attention.attn.out_proj.*`; Stage B's pooled mapper is `clip_mapper`.
- ComfyUI: the same, but q/k/v already split as `attention.attn.to_{q,k,v}.*`.
- diffusers: `attention.to_{q,k,v}.*`, `attention.to_out.0.*`, Stage B `clip_txt_pooled_mapper`.
The CLIP-G text model uses Hugging Face names everywhere, under `text_encoder.clip_g.transformer.` in ComfyUI files;
older ComfyUI files store the projection as a bare transposed matrix `clip_g.text_projection`. Stage A differs
between the original and diffusers only in `vquantizer.codebook` -> `vquantizer.embedding`.

A map is `model_key -> Source`: which file key to read and whether to take one third of it (in_proj split) or
transpose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Source:
    """Where a model tensor comes from in the file."""

    key: str
    chunk: int | None = None  # index into tensor.chunk(3, dim=0) for in_proj q/k/v
    transpose: bool = False


KeyMap = dict[str, Source]

_QKV = ("to_q", "to_k", "to_v")
_IGNORED_SUFFIXES = ("logit_scale", "embeddings.position_ids")


def unet_keymap(keys: Iterable[str], prefix: str, stage: str) -> KeyMap:
    """Map UNet keys of any naming scheme (prefix stripped) to diffusers' StableCascadeUNet names."""
    out: KeyMap = {}
    for key in keys:
        name = key[len(prefix) :]
        if ".attention.attn.in_proj_" in name:
            head, _, kind = name.partition(".attention.attn.in_proj_")  # file keys may hold the marker twice
            for i, qkv in enumerate(_QKV):
                out[f"{head}.attention.{qkv}.{kind}"] = Source(key, chunk=i)
            continue
        name = name.replace(".attention.attn.out_proj.", ".attention.to_out.0.")
        for qkv in _QKV:
            name = name.replace(f".attention.attn.{qkv}.", f".attention.{qkv}.")
        if stage == "decoder" and name.startswith("clip_mapper."):
            name = "clip_txt_pooled_mapper." + name[len("clip_mapper.") :]
        out[name] = Source(key)
    return out


def text_encoder_keymap(keys: Iterable[str], prefix: str) -> KeyMap:
    """Map CLIP-G keys to transformers' CLIPTextModelWithProjection names.

    `prefix` is `text_encoder.clip_g.transformer.` (ComfyUI) or '' (Hugging Face / kohya / OneTrainer side files).
    A ComfyUI `...clip_g.text_projection` matrix is stored transposed relative to a Linear weight.
    """
    out: KeyMap = {}
    bare_projection = prefix[: -len("transformer.")] + "text_projection" if prefix.endswith("transformer.") else None
    for key in keys:
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if bare_projection is not None and key == bare_projection:
            out.setdefault("text_projection.weight", Source(key, transpose=True))
            continue
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name == "text_projection.weight":
            out["text_projection.weight"] = Source(key)  # a Linear weight wins over the bare matrix
        else:
            out[name] = Source(key)
    return out


def stage_a_keymap(keys: Iterable[str], prefix: str) -> KeyMap:
    """Map Stage A (Paella VQGAN) keys of the original or diffusers naming to our PaellaVQModel names."""
    out: KeyMap = {}
    for key in keys:
        name = key[len(prefix) :]
        if name == "vquantizer.codebook.weight":
            name = "vquantizer.embedding.weight"
        out[name] = Source(key)
    return out


# Inverse maps, used by `cascade.tiny` to write test files in every real layout.
