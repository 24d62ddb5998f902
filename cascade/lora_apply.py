"""Merging LoRAs into the loaded weights for one request, and putting the exact original weights back after it.

Why merge and not on-the-fly: a merged layer costs nothing per step (an on-the-fly LoRA adds two small matmuls to
every adapted layer on every step, and hooks that the streamed blocks of cascade.offload would have to carry), and
the engine's memory placements keep one host copy of each weight that every upload reads, so a weight edited in
place is what every later phase and streamed block sees. Exactness comes from keeping the originals, not from
subtracting the delta again (which would drift in fp16/bf16): `restore` copies the saved tensors back bit for bit.

Per layer: W' = (W.float() + sum_i w_i * (alpha_i / rank_i) * up_i @ down_i).to(W.dtype), the deltas in fp32 on
the device where the weight is, every copy of the weight (the one the module points at and, while it is on the
accelerator, the executor's host copy) edited in place with the same fp32 result. Linear [out, in] and Conv2d
[out, in, kh, kw] (LoCon: down is a kh x kw conv, up a 1x1 conv; Tucker LoCon: 1x1 down, kh x kw mid, 1x1 up).
alpha: the file's `.alpha` tensor, else PEFT's lora_alpha (/ sqrt(rank) with use_rslora), else the rank (scale 1),
as ComfyUI comfy/weight_adapter/lora.py and diffusers/PEFT read them. DoRA (dora_scale, lora_magnitude_vector) is
refused: trainers and loaders disagree about which weight norm it divides by (ComfyUI normalises the merged weight
on one axis and the original on the other), so any choice would be silently different from some trainer's.

Memory: the originals of the patched weights are kept in host memory at their dtype while the request runs (for a
LoRA over all of Stage C big that is its 7 GB bf16 in RAM; no accelerator memory), plus one fp32 delta of the
largest layer at a time on the weight's device (Stage C big: 2048 x 8192 x 4 B = 64 MiB) — the memory planner's
activation margin covers the latter; nothing here stays on the accelerator after the merge.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .lora import (COMPONENT_TITLES, TEXT_ENCODER, BoundLora, LoraError, Patch, UnsupportedLoraError, bind,
                   read_lora)
from .tensorfile import TensorReader, printable

log = logging.getLogger(__name__)

MAX_LORAS = 32


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a request: its file, the weight for the UNet layers and for the text-encoder layers."""

    path: str
    unet: float = 1.0
    text_encoder: float | None = None  # None: the same as `unet` (A1111/SD.Next's <lora:name:w> semantics)

    @property
    def te(self) -> float:
        return self.unet if self.text_encoder is None else self.text_encoder

    def weight_for(self, component: str) -> float:
        return self.te if component == TEXT_ENCODER else self.unet


def as_entry(value) -> LoraEntry:
    """A request's `loras` item (LoraEntry, (path, w[, te_w]), [path, ...] or a bare path) as a LoraEntry."""
    if isinstance(value, LoraEntry):
        return value
    if isinstance(value, (str, Path)):
        return LoraEntry(str(value))
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        path, unet, te = (list(value) + [None, None])[:3]  # missing weights: unet 1.0, text encoder = unet
        return LoraEntry(str(path), 1.0 if unet is None else unet, te)
    raise TypeError(f"a LoRA entry is (path, unet weight, text-encoder weight), got {value!r}")


@dataclass
class PreparedLora:
    """A LoRA read, bound onto the loaded models and checked; nothing changed yet."""

    entry: LoraEntry
    bound: BoundLora


def models_of(pipe) -> dict[str, nn.Module]:
    return {"prior": pipe.prior, "decoder": pipe.decoder, "text_encoder": pipe.text_encoder}


def prepare(pipe, entries: Sequence) -> list[PreparedLora]:
    """Read and bind every LoRA of a request (headers only); any LoRA that does not fit fails here, before any
    weight changes."""
    entries = [as_entry(e) for e in entries]
    if len(entries) > MAX_LORAS:
        raise LoraError(f"{len(entries)} LoRAs in one request: at most {MAX_LORAS}")
    models = models_of(pipe)
    plain = {c: _uncompiled(m) for c, m in models.items()}
    out = []
    for entry in entries:
        lora = read_lora(entry.path)
        bound = bind(lora, plain)
        _refuse_dora(bound)
        compiled = sorted(COMPONENT_TITLES[c] for c in bound.components() if plain[c] is not models[c])
        if compiled:
            raise LoraError(f"{printable(lora.path.name)}: the {' and '.join(compiled)} here is compiled for "
                            "OpenVINO with its weights built in, so a LoRA cannot be merged into it. Use LoRAs on "
                            "another device (--device cpu/cuda/xpu), or without this LoRA.")
        out.append(PreparedLora(entry, bound))
    return out


def _uncompiled(module: nn.Module) -> nn.Module:
    """The torch module under an OpenVINO wrapper (cascade_backends.openvino: OpenVINOModule.original, or
    torch.compile's _orig_mod); the module itself otherwise."""
    for attr in ("original", "_orig_mod"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def _refuse_dora(bound: BoundLora) -> None:
    dora = [p.layer.name for p in bound.patches if "dora" in p.layer.keys or "magnitude" in p.layer.keys]
    if dora:
        raise UnsupportedLoraError(
            f"{printable(bound.lora.path.name)} is a DoRA (its {len(dora)} layers carry dora_scale / "
            f"lora_magnitude_vector, e.g. {printable(dora[0])}); DoRA is not merged by this engine (loaders disagree "
            "on its weight norm). Use a plain LoRA, or ComfyUI for this file.")


# --- reading one patch -------------------------------------------------------------------------------------------


def _scalar(reader: TensorReader, key: str, what: str) -> float:
    value = reader.get(key, dtype=torch.float32).reshape(-1)
    if value.numel() != 1 or not math.isfinite(float(value[0])):
        raise LoraError(f"{what}: alpha {printable(key)} is not a finite scalar")
    return float(value[0])


def patch_scale(bound: BoundLora, patch: Patch, reader: TensorReader) -> float:
    """alpha / rank of one layer (alpha / sqrt(rank) for PEFT rsLoRA); 1 when the file has no alpha."""
    lora, layer = bound.lora, patch.layer
    rank = lora.header.tensors[layer.keys["down"]].shape[0]
    if "alpha" in layer.keys:
        alpha = _scalar(reader, layer.keys["alpha"], printable(lora.path.name))
    else:
        alpha = lora.alpha(layer, patch.prefix, patch.module)
        if alpha is None:
            return 1.0
    if lora.uses_rslora(patch.prefix):
        return alpha / math.sqrt(rank)
    return alpha / rank


def layer_delta(reader: TensorReader, patch: Patch, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """up @ (mid) @ down of one layer in fp32 on `device`, shaped like the weight (unscaled)."""
    keys = patch.layer.keys
    down = reader.get(keys["down"], dtype=torch.float32, device=device)
    up = reader.get(keys["up"], dtype=torch.float32, device=device)
    name = f"{printable(reader.header.path.name)}: layer {printable(patch.layer.name)}"
    for tensor in (down, up):
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{name} has NaN or infinite values; the file is damaged")
    up2 = up.reshape(up.shape[0], -1)
    if "mid" in keys:  # Tucker: W[o,i,h,w] = sum_ab up[o,a] mid[a,b,h,w] down[b,i]
        mid = reader.get(keys["mid"], dtype=torch.float32, device=device)
        if not torch.isfinite(mid).all():
            raise LoraError(f"{name} has NaN or infinite values; the file is damaged")
        delta = torch.einsum("oa,abhw,bi->oihw", up2, mid, down.reshape(down.shape[0], -1))
    else:
        delta = up2 @ down.reshape(down.shape[0], -1)
    return delta.reshape(shape)


# --- where a weight lives ----------------------------------------------------------------------------------------


def _resolve(model: nn.Module, param: str) -> tuple[nn.Module, str]:
    path, _, name = param.rpartition(".")
    return model.get_submodule(path), name


def _copies(placement, owner: nn.Module, name: str) -> list[torch.Tensor]:
    """Every tensor holding this weight: the one the module points at, and the placement's host copy when that
    is a different tensor (cascade.offload.Executor while the component is on the accelerator)."""
    current = owner._parameters[name].data
    out = [current]
    host_copies = getattr(placement, "host_copies", None)
    if host_copies is not None:
        host = host_copies().get((id(owner), name))
        if host is not None and (host.device != current.device or host.data_ptr() != current.data_ptr()):
            out.append(host)
    return out


@dataclass
class MergedLoras:
    """What `merge` changed: the original of every patched weight (host memory, its dtype) to put back."""

    pipe: object
    prepared: list[PreparedLora]
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (component, param) -> original
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [p.bound.lora.name for p in self.prepared]


def merge(pipe, prepared: list[PreparedLora]) -> MergedLoras:
    """Merge prepared LoRAs into the pipeline's weights (see module doc). On any error the weights already changed
    are restored before the error propagates."""
    t0 = time.perf_counter()
    state = MergedLoras(pipe, prepared)
    models = models_of(pipe)
    # (component, param) -> [(prepared, patch, weight)]: LoRAs on the same weight are summed, then merged once.
    targets: dict[tuple[str, str], list[tuple[PreparedLora, Patch, float]]] = {}
    for item in prepared:
        for patch in item.bound.patches:
            w = item.entry.weight_for(patch.component)
            if w != 0:
                targets.setdefault((patch.component, patch.param), []).append((item, patch, w))
    readers: dict[int, TensorReader] = {}
    try:
        with contextlib.ExitStack() as stack:
            for item in prepared:
                readers[id(item)] = stack.enter_context(TensorReader(item.bound.lora.header))
            with torch.inference_mode():  # device copies uploaded in a phase are inference tensors
                for (component, param), patches in targets.items():
                    _merge_one(state, models[component], component, param, patches, readers)
    except BaseException:
        restore(state)
        raise
    state.seconds = time.perf_counter() - t0
    log.info("LoRA: merged %s into %d weights in %.2f s", ", ".join(state.names), len(state.originals), state.seconds)
    return state


def _merge_one(state: MergedLoras, model: nn.Module, component: str, param: str, patches, readers) -> None:
    owner, name = _resolve(model, param)
    copies = _copies(state.pipe.placement, owner, name)
    compute = copies[0]
    if compute.device.type == "meta":
        raise LoraError(f"the {COMPONENT_TITLES[component]} weights are not materialised (meta device: a host's "
                        "sequential offload holds them); LoRAs cannot be merged in this offload mode")
    delta = None
    for item, patch, w in patches:
        reader = readers[id(item)]
        term = layer_delta(reader, patch, compute.shape, compute.device)
        term.mul_(w * patch_scale(item.bound, patch, reader))
        delta = term if delta is None else delta.add_(term)
    host = next((c for c in copies if c.device.type == "cpu"), None)
    state.originals[(component, param)] = (host if host is not None else compute).detach().to("cpu", copy=True)
    merged = delta.add_(compute)  # fp32: W + sum of deltas, rounded once to the weight's dtype by the copies below
    lo, hi = (float(v) for v in torch.aminmax(merged))
    limit = torch.finfo(compute.dtype).max
    if not (-limit <= lo and hi <= limit):  # also False for NaN
        raise LoraError(f"merging the LoRA(s) into {param} of {COMPONENT_TITLES[component]} overflows "
                        f"{str(compute.dtype).removeprefix('torch.')} (weight too high?)")
    for copy in copies:
        copy.copy_(merged if copy.device == merged.device else merged.to(copy.device))


def restore(state: MergedLoras) -> None:
    """Put every original weight back, bit for bit, into every copy the placement holds now (a NaN-guard recast
    during the request may have converted them: the original is converted the same way)."""
    models = models_of(state.pipe)
    with torch.inference_mode():  # device copies uploaded in a phase are inference tensors
        for (component, param), original in state.originals.items():
            owner, name = _resolve(models[component], param)
            for copy in _copies(state.pipe.placement, owner, name):
                copy.copy_(original.to(copy.device, copy.dtype))
    state.originals.clear()


@contextlib.contextmanager
def applied(pipe, entries: Sequence) -> Iterator[MergedLoras | None]:
    """The LoRAs of a request merged for the duration of the block, restored after it, also on error/interrupt."""
    if not entries:
        yield None
        return
    state = merge(pipe, prepare(pipe, entries))
    try:
        yield state
    finally:
        restore(state)
