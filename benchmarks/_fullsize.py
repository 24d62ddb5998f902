"""Random-weight Stable Cascade checkpoints in the ComfyUI layout, for benchmarks; written header first, then data.

Nothing is ever held in RAM beyond one tensor: the layout (key -> shape, dtype) comes from the model classes built
on the meta device (`cascade.loader.instantiate`), the header is written from it, then every tensor is generated
(on `device`: CUDA when there is one, it is much faster) and appended. The key names are the ones real ComfyUI
all-in-one files use, produced with the same inverse key maps `cascade.tiny` uses
(`cascade.keymaps.unet_keys_for_layout`):

  Stage C "main" file:  model.diffusion_model.*  (prior UNet, q/k/v split under attention.attn.)
                        text_encoder.clip_g.transformer.*  (CLIP-G, HF names, Linear text_projection)
                        text_encoder.clip_g.logit_scale
  Stage B file:         model.diffusion_model.*  (decoder UNet, `clip_mapper` naming)
                        vae.*  (Stage A, original `vquantizer.codebook` naming)

Configs that are not an official size (the tiny ones of a dry run) are stored in the file's metadata
(`cascade.config.<part>`), which `cascade.checkpoints` reads only for shapes it does not know. Files are reused when
their header already matches the expected layout.

Weights: uniform with the std of PyTorch's default init (1/sqrt(fan_in)) for tensors with 2+ dims, +-0.05 for
vectors (biases, norm gains), zeros for integer buffers. Deep random networks stay finite in bf16 with that.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoder.clip_g.transformer."
STAGE_A_PREFIX = "vae."
FORMAT = "1"  # bump when the layout or the init changes, so cached files are rebuilt
GB = 1e9


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _model_state(kind: str, config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{model key: (shape, dtype)} of a component, from the class built on the meta device."""
    from cascade.loader import instantiate

    model = instantiate(kind, dict(config))
    out = {}
    for key, t in model.state_dict().items():
        out[key] = (tuple(t.shape), t.dtype)
    return out


def _float(dtype: torch.dtype, weights: torch.dtype) -> torch.dtype:
    return weights if dtype.is_floating_point else dtype


def unet_layout(kind: str, config: dict, weights: torch.dtype) -> dict[str, Spec]:
    from cascade.tiny import unet_keys_for_layout

    state = _model_state(kind, config)
    layout = {}
    for file_key, members in unet_keys_for_layout(state, "comfyui", kind).items():
        shapes = [state[m][0] for m, _ in members]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
        layout[UNET_PREFIX + file_key] = Spec(shape, _float(state[members[0][0]][1], weights))
    return layout


def text_encoder_layout(config: dict, weights: torch.dtype) -> dict[str, Spec]:
    layout = {}
    for key, (shape, dtype) in _model_state("text_encoder", config).items():
        if key.endswith("position_ids"):
            continue
        layout[CLIP_PREFIX + key] = Spec(shape, _float(dtype, weights))
    layout[CLIP_PREFIX[: -len("transformer.")] + "logit_scale"] = Spec((), weights)
    return layout


def stage_a_layout(config: dict, weights: torch.dtype) -> dict[str, Spec]:
    layout = {}
    for key, (shape, dtype) in _model_state("stage_a", config).items():
        if key == "vquantizer.embedding.weight":
            key = "vquantizer.codebook.weight"
        layout[STAGE_A_PREFIX + key] = Spec(shape, _float(dtype, weights))
    return layout


def _official(kind: str, config: dict) -> bool:
    from cascade import configs

    official = {
        "prior": [configs.PRIOR, configs.PRIOR_LITE],
        "decoder": [configs.DECODER, configs.DECODER_LITE],
        "text_encoder": [configs.CLIP_G],
        "stage_a": [configs.STAGE_A],
    }[kind]
    return any(dict(config) == dict(o) for o in official)


def _metadata(parts: dict[str, dict]) -> dict[str, str]:
    from cascade.checkpoints import METADATA_CONFIG

    meta = {"cascade.bench": "random weights for benchmarks (benchmarks/_fullsize.py)", "cascade.bench.format": FORMAT}
    for kind, config in parts.items():
        if not _official(kind, config):
            meta[METADATA_CONFIG + kind] = json.dumps(config)
    return meta


def _random(spec: Spec, gen: torch.Generator, device: str) -> torch.Tensor:
    if not spec.dtype.is_floating_point:
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if len(spec.shape) >= 2:
        fan_in = math.prod(spec.shape[1:])
        bound = math.sqrt(3.0 / fan_in)  # uniform(-b, b) has std b / sqrt(3) = 1 / sqrt(fan_in)
    else:
        bound = 0.05
    t = torch.empty(spec.shape, dtype=torch.float32, device=device)
    t.uniform_(-bound, bound, generator=gen)
    return t.to(spec.dtype).cpu()


_DTYPE_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_random_safetensors(path: Path, layout: dict[str, Spec], metadata: dict[str, str], *, seed: int = 0,
                             device: str = "cpu", sparse: bool = False, log=print) -> None:
    """A valid safetensors file: 8-byte header length, JSON header padded to 8 bytes, then each tensor's bytes.

    sparse: write the header only and extend the file to its full length (a sparse file of zeros: no disk used, no
    time spent) — enough to check key layouts, detection and the planner's sizes without writing 12 GB."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, spec in layout.items():
        header[key] = {"dtype": _DTYPE_CODE[spec.dtype], "shape": list(spec.shape),
                       "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator(device=device).manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    t0, done, next_report = time.perf_counter(), 0, 0.0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            if sparse:
                f.truncate(8 + len(raw) + offset)
            for spec in ({} if sparse else layout).values():
                t = _random(spec, gen, device)
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                done += spec.nbytes
                if done / max(offset, 1) >= next_report:
                    log(f"  writing {path.name}: {done / GB:6.2f} / {offset / GB:.2f} GB")
                    next_report += 0.25
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"  wrote {path} ({offset / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s")


def _matches(path: Path, layout: dict[str, Spec], sparse: bool) -> bool:
    from cascade.tensorfile import read_header

    if not path.is_file():
        return False
    try:
        header = read_header(path)
    except Exception:  # noqa: BLE001 - a damaged cached file is rebuilt
        return False
    if header.metadata.get("cascade.bench.format") != FORMAT:
        return False
    if (header.metadata.get("cascade.bench.sparse") == "1") != sparse:  # never take zeros for random weights
        return False
    have = {k: (tuple(v.shape), v.dtype) for k, v in header.tensors.items()}
    return have == {k: (s.shape, _DTYPE_CODE[s.dtype]) for k, s in layout.items()}


def ensure_comfyui_pair(folder: Path, *, prior: dict, decoder: dict, text_encoder: dict, stage_a: dict,
                        weights: torch.dtype = torch.bfloat16, name: str = "fullsize", seed: int = 0,
                        device: str = "cpu", sparse: bool = False, log=print) -> tuple[Path, Path]:
    """The Stage C main file (prior + CLIP-G) and the Stage B file (decoder + Stage A), written once, then reused."""
    folder = Path(folder)
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[weights]
    files = {
        folder / f"{name}_stage_c_comfyui_{tag}.safetensors": (
            {**unet_layout("prior", prior, weights), **text_encoder_layout(text_encoder, weights)},
            {"prior": prior, "text_encoder": text_encoder}),
        folder / f"{name}_stage_b_comfyui_{tag}.safetensors": (
            {**unet_layout("decoder", decoder, weights), **stage_a_layout(stage_a, weights)},
            {"decoder": decoder, "stage_a": stage_a}),
    }
    for i, (path, (layout, parts)) in enumerate(files.items()):
        layout = dict(sorted(layout.items()))
        if _matches(path, layout, sparse):
            log(f"  reusing {path}")
            continue
        need = 0 if sparse else sum(s.nbytes for s in layout.values())
        folder.mkdir(parents=True, exist_ok=True)
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        if free < need * 1.05:
            raise SystemExit(f"{folder}: {need / GB:.1f} GB needed for {path.name}, {free / GB:.1f} GB free")
        meta = {**_metadata(parts), **({"cascade.bench.sparse": "1"} if sparse else {})}
        write_random_safetensors(path, layout, meta, seed=seed + i, device=device, sparse=sparse, log=log)
    prior_path, decoder_path = files
    return prior_path, decoder_path


def layout_bytes(prior: dict, decoder: dict, text_encoder: dict, stage_a: dict, weights: torch.dtype) -> int:
    return sum(s.nbytes for layout in (unet_layout("prior", prior, weights), unet_layout("decoder", decoder, weights),
                                        text_encoder_layout(text_encoder, weights), stage_a_layout(stage_a, weights))
               for s in layout.values())
