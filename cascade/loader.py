"""Build models from repo configs on the meta device, then assign tensors straight from the mapped file.

The flow is two-phase so nothing is loaded before we know it will work:
1. `resolve_sources(prior, decoder, ...)` reads headers only: which file provides each component (prior UNet,
   decoder UNet, CLIP-G, Stage A), in which layout, and whether the stages fit together. Wrong files fail here.
2. `load_part(part, dtype=..., device=...)` instantiates the model with its parameters on the meta device (no
   allocation, no random init), reads each tensor once from the memory map at the target dtype and device, and
   assigns it (`load_state_dict(assign=True)`). Peak RAM is the loaded weights plus one tensor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import configs
from .checkpoints import (
    DECODER,
    PART_TITLES,
    PRIOR,
    STAGE_A,
    TEXT_ENCODER,
    Checkpoint,
    Part,
    printable,
    require,
    scan,
    side_text_encoder_files,
)
from .errors import CheckpointError, IncompatibleStagesError, MissingComponentError
from .keymaps import KeyMap, Source, stage_a_keymap, text_encoder_keymap, unet_keymap
from .tensorfile import TensorReader

log = logging.getLogger(__name__)

# Buffers that exist in our models but are legitimately absent from some files.
_OPTIONAL_KEYS = ("num_batches_tracked",)


@dataclass
class Sources:
    """Which part of which checkpoint provides each component; decided from headers alone."""

    prior: Part
    decoder: Part
    text_encoder: Part
    stage_a: Part
    prior_checkpoint: Checkpoint
    decoder_checkpoint: Checkpoint
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, Part]:
        return {PRIOR: self.prior, DECODER: self.decoder, TEXT_ENCODER: self.text_encoder, STAGE_A: self.stage_a}


def _find_text_encoder(prior: Checkpoint, decoder: Checkpoint, explicit: Path | None, notes: list[str]) -> Part:
    if explicit is not None:
        ckpt = scan(explicit)
        if TEXT_ENCODER not in ckpt.parts:
            raise MissingComponentError(f"{printable(explicit.name)} holds no CLIP-G text encoder (it is a {ckpt.title}).")
        notes.append(f"text encoder from {printable(explicit.name)}")
        return ckpt.parts[TEXT_ENCODER]
    if TEXT_ENCODER in prior.parts:
        return prior.parts[TEXT_ENCODER]
    tried = []
    if prior.path.is_file():
        for side in side_text_encoder_files(prior.path):
            tried.append(side.name)
            if side.is_file():
                ckpt = scan(side)
                if TEXT_ENCODER in ckpt.parts:
                    notes.append(f"text encoder from side file {printable(side.name)}")
                    return ckpt.parts[TEXT_ENCODER]
    if TEXT_ENCODER in decoder.parts:
        notes.append(f"text encoder taken from the decoder file {printable(decoder.name)} (the prior file has none)")
        return decoder.parts[TEXT_ENCODER]
    side_hint = f" or a side file next to it ({' / '.join(tried)})" if tried else ""
    raise MissingComponentError(
        f"No CLIP-G text encoder found: {printable(prior.name)} is a bare Stage C file and {printable(decoder.name)} has none either. "
        f"Use the ComfyUI all-in-one 'main' file (it embeds CLIP-G){side_hint}, pass --text-encoder FILE "
        "(e.g. text_encoder/model.safetensors from stabilityai/stable-cascade-prior), or use a diffusers folder."
    )


def _find_stage_a(prior: Checkpoint, decoder: Checkpoint, explicit: Path | None, notes: list[str]) -> Part:
    if explicit is not None:
        ckpt = scan(explicit)
        if STAGE_A not in ckpt.parts:
            raise MissingComponentError(f"{printable(explicit.name)} holds no Stage A VQGAN (it is a {ckpt.title}).")
        notes.append(f"Stage A from {printable(explicit.name)}")
        return ckpt.parts[STAGE_A]
    for ckpt in (decoder, prior):
        if STAGE_A in ckpt.parts:
            return ckpt.parts[STAGE_A]
    looked = []
    for ckpt in (decoder, prior):
        folder = ckpt.path.parent if ckpt.path.is_file() else ckpt.path
        for candidate in sorted(folder.glob("stage_a*.safetensors")):
            looked.append(candidate.name)
            found = scan(candidate)
            if STAGE_A in found.parts:
                notes.append(f"Stage A from {printable(candidate.name)} next to the checkpoints")
                return found.parts[STAGE_A]
    raise MissingComponentError(
        f"No Stage A (VQGAN) found: {printable(decoder.name)} is a bare Stage B file. Use the ComfyUI all-in-one decoder file "
        "(it embeds Stage A), or put stage_a.safetensors (from stabilityai/stable-cascade) next to it, or pass "
        "--stage-a FILE."
    )


def check_compatible(sources: Sources) -> None:
    """The stages only need matching interfaces: any big/lite mix works, mismatched widths do not."""
    te, c, b = sources.text_encoder.config, sources.prior.config, sources.decoder.config
    checks = [
        ("CLIP-G hidden size", te["hidden_size"], "Stage C clip_text_in_channels", c["clip_text_in_channels"]),
        ("CLIP-G projection", te["projection_dim"], "Stage C pooled input", c["clip_text_pooled_in_channels"]),
        ("CLIP-G projection", te["projection_dim"], "Stage B pooled input", b["clip_text_pooled_in_channels"]),
        ("Stage C output channels", c["out_channels"], "Stage B effnet input", b["effnet_in_channels"]),
    ]
    for a_name, a, b_name, b_val in checks:
        if a != b_val:
            raise IncompatibleStagesError(
                f"{printable(sources.prior_checkpoint.name)} and {printable(sources.decoder_checkpoint.name)} cannot work together: "
                f"{a_name} is {a} but {b_name} is {b_val}. Use a Stage C and a Stage B from the Stable Cascade "
                "family (big and lite mix freely)."
            )


def resolve_sources(
    prior: str | Path,
    decoder: str | Path,
    *,
    text_encoder: str | Path | None = None,
    stage_a: str | Path | None = None,
) -> Sources:
    """Scan the given files/folders and decide where every component comes from. Reads headers only."""
    prior_ckpt, decoder_ckpt = scan(prior), scan(decoder)
    require(prior_ckpt, "stage_c", "--prior")
    require(decoder_ckpt, "stage_b", "--decoder")
    notes: list[str] = []
    te = _find_text_encoder(prior_ckpt, decoder_ckpt, Path(text_encoder) if text_encoder else None, notes)
    sa = _find_stage_a(prior_ckpt, decoder_ckpt, Path(stage_a) if stage_a else None, notes)
    sources = Sources(prior_ckpt.parts[PRIOR], decoder_ckpt.parts[DECODER], te, sa, prior_ckpt, decoder_ckpt, notes)
    check_compatible(sources)
    return sources


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while keeping buffers real, for modules built in this thread.

    Buffers such as CLIP's non-persistent `position_ids` are computed in __init__ and are not in any file, so they
    must be materialised; parameters come from the file and would only waste time and RAM if initialised. The patch
    is scoped to this block and to the calling thread: a module another thread builds meanwhile (a host UI, another
    extension) gets ordinary parameters.

    Why not a library's: `with torch.device("meta")` puts the buffers on meta too (CLIP's position_ids would be lost);
    accelerate's `init_empty_weights(include_buffers=False)` is this same register_parameter patch, but process-wide
    (not thread-scoped, which matters inside SD.Next's threaded server) and a dependency we do not otherwise need.
    """
    original = nn.Module.register_parameter
    owner = threading.get_ident()

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def instantiate(kind: str, config: dict) -> nn.Module:
    """An empty model (parameters on meta) for a part kind and config; the config is checked first (types and
    ranges, `cascade.configs.config_problem`), since it decides how much gets built."""
    problem = configs.config_problem(kind, config, strict=False) if kind in (PRIOR, DECODER, STAGE_A, TEXT_ENCODER) else None
    if problem:
        raise CheckpointError(f"the {PART_TITLES[kind]} config is unusable: {problem}.")
    with parameters_on_meta():
        if kind in (PRIOR, DECODER):
            from .models import CascadeUNet

            return CascadeUNet.from_config(config)
        if kind == STAGE_A:
            from .models import PaellaVQModel

            return PaellaVQModel.from_config(config)
        if kind == TEXT_ENCODER:
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            return CLIPTextModelWithProjection(CLIPTextConfig(**config))
        if kind in ("effnet", "previewer", "clip_vision"):  # parts only some requests load (cascade.side_parts)
            from .side_parts import build_model

            return build_model(kind, config)
    raise ValueError(f"cannot instantiate part kind {kind!r}")


def keymap_for(part: Part) -> KeyMap:
    if part.kind in (PRIOR, DECODER):
        return unet_keymap(part.keys, part.prefix, part.kind)
    if part.kind == TEXT_ENCODER:
        return text_encoder_keymap(part.keys, part.prefix)
    if part.kind == STAGE_A:
        return stage_a_keymap(part.keys, part.prefix)
    if part.kind in ("effnet", "previewer", "clip_vision"):
        from .side_parts import keymap

        return keymap(part)
    raise ValueError(f"part kind {part.kind!r} is not loadable")


def _read_state(
    part: Part, keymap: KeyMap, wanted: set[str], dtype: torch.dtype, device: torch.device, pin_memory: bool
) -> dict[str, torch.Tensor]:
    """Read every wanted tensor once, file by file; floating tensors are converted to `dtype` on the way."""
    by_source: dict[str, list[tuple[str, int | None, bool]]] = {}
    for target, src in keymap.items():
        if target in wanted:
            by_source.setdefault(src.key, []).append((target, src.chunk, src.transpose))
    state: dict[str, torch.Tensor] = {}
    for index, header in enumerate(part.headers):
        keys = [k for k in by_source if part.key_header[k] == index]
        if not keys:
            continue
        with TensorReader(header) as reader:
            for key in keys:
                info = header.tensors[key]
                to_dtype = dtype if info.torch_dtype.is_floating_point else None
                tensor = reader.get(key, to_dtype, device, pin_memory=pin_memory)
                chunks = tensor.chunk(3, dim=0) if any(c is not None for _, c, _ in by_source[key]) else None
                for target, chunk, transpose in by_source[key]:
                    t = chunks[chunk] if chunk is not None else tensor
                    state[target] = t.t().contiguous() if transpose else t
    return state


def _source_shape(shape: tuple[int, ...], src: Source) -> tuple[int, ...] | None:
    """The shape the model receives from a file tensor of `shape`: one third of it (q/k/v of a stacked in_proj,
    split like torch.chunk(3)) or its transpose; None when that cannot be taken."""
    if src.chunk is not None:
        if not shape:
            return None
        rows, step = shape[0], -(-shape[0] // 3)
        if src.chunk * step >= rows:
            return None
        return (min(step, rows - src.chunk * step), *shape[1:])
    if src.transpose:
        return (shape[1], shape[0]) if len(shape) == 2 else None
    return shape


def check_part(part: Part) -> tuple[KeyMap, set[str]]:
    """Refuse a part whose file cannot fill its model, before any memory is allocated for it.

    The model is built on the meta device (no memory, no initialisation) from the part's validated config, and each
    of its tensors is matched against the file header: present, of the shape the header declares, floating point
    where the model needs it. Since `read_header` already checked every declared shape against its byte range and
    the file's real extent, a model that passes allocates exactly what the file holds (converted to the load dtype):
    a small file whose config asks for a huge model is refused here. Returns (keymap, model keys) for `load_part`.
    """
    name = printable(part.headers[0].path.name)
    title = PART_TITLES.get(part.kind, part.kind)
    if part.kind in ("effnet", "previewer", "clip_vision"):  # parts only some requests load
        from .side_parts import config_problem as side_config_problem

        problem = side_config_problem(part.kind, part.config)
    else:
        problem = configs.config_problem(part.kind, part.config, strict=False)
    if problem:
        raise CheckpointError(f"{name}: the {title} config is unusable: {problem}.")
    try:
        with torch.device("meta"):
            model = instantiate(part.kind, part.config)
    except CheckpointError:
        raise
    except Exception as err:  # field checks passed but the model class still refuses the combination
        raise CheckpointError(f"{name}: the {title} config cannot build a model ({type(err).__name__}: "
                              f"{printable(str(err))}).") from None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    del model
    keymap = keymap_for(part)
    missing = sorted(k for k in expected.keys() - keymap.keys() if not k.endswith(_OPTIONAL_KEYS))
    if missing:
        raise CheckpointError(
            f"{name}: the {part.kind} weights are incomplete or of another architecture — {len(missing)} tensors "
            f"missing, e.g. {', '.join(missing[:3])}. Download the file again or use an official layout."
        )
    for key, (shape, dtype) in expected.items():
        src = keymap.get(key)
        if src is None:
            continue
        info = part.info(src.key)
        got = _source_shape(info.shape, src)
        if got != shape:
            raise CheckpointError(
                f"{name}: tensor {key} has shape {list(info.shape)} in the file but the {part.kind} model expects "
                f"{list(shape)}; the file does not match its detected variant ({part.variant})."
            )
        if dtype.is_floating_point and not info.torch_dtype.is_floating_point:
            raise CheckpointError(f"{name}: tensor {printable(src.key)} is stored as {info.dtype}, but the model needs "
                                  "floating-point weights there. The file is damaged; download it again.")
    return keymap, set(expected)


def load_part(part: Part, *, dtype: torch.dtype, device: torch.device | str = "cpu", pin_memory: bool = False) -> nn.Module:
    """Instantiate `part`'s model and fill it from the file(s): strict on missing tensors, lenient on extras.

    Everything the file declares is checked against the model first (`check_part`), so nothing is allocated for
    a file that cannot fill it. pin_memory (CPU targets only): weights land in page-locked host memory, ready for
    fast uploads by the offload executor.
    """
    device = torch.device(device)
    keymap, expected = check_part(part)
    name = printable(part.headers[0].path.name)
    extra = sorted(set(keymap) - expected)
    if extra:
        log.warning("%s: %d tensors of the %s part are not used: %s", name, len(extra), part.kind,
                    ", ".join(printable(k) for k in extra[:5]))
    model = instantiate(part.kind, part.config)
    state = _read_state(part, keymap, expected, dtype, device, pin_memory and device.type == "cpu")
    model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{name}: parameters left unloaded: {', '.join(leftover[:5])}")
    # Buffers were created on the CPU at construction; bring them (and optional ones the file lacked) along.
    model.to(device)
    for buf_name, buf in model.named_buffers():
        if buf.is_floating_point() and buf.dtype != dtype:
            *path, leaf = buf_name.split(".")
            owner = model.get_submodule(".".join(path)) if path else model
            owner._buffers[leaf] = buf.to(dtype)
    return model.eval().requires_grad_(False)
