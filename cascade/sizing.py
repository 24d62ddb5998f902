"""Weight sizes the memory planner works from: real files' headers, or the official models' shipped size table.

Headers: every tensor the loaded model will hold, counted at its device dtype from the file's own dtype and shape
(a fused in_proj counts one third per target), so a plan is made before a byte of weights is read.
Full size (no files, e.g. `python -m cascade plan`): `cascade/data/full_size_weights.json`, element counts per
UNet block and per dtype of the official configs. It is derived data: `build_full_size_table()` rebuilds it from
`cascade.configs` on the meta device (16 s, so it is not done per call) and a test checks the two agree.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .memory import ComponentSizes
from .names import COMPONENT_OF_PART

FULL_SIZE_FILE = Path(__file__).resolve().parent / "data" / "full_size_weights.json"
VARIANTS = ("big", "lite")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _device_bytes(numel: int, file_dtype: torch.dtype, compute: torch.dtype) -> int:
    """Floating tensors are converted to the compute dtype on load; integer buffers keep theirs."""
    return numel * (_itemsize(compute) if file_dtype.is_floating_point else _itemsize(file_dtype))


def sizes_from_sources(sources, dtypes: dict[str, torch.dtype]) -> ComponentSizes:
    """Sizes of what `cascade.loader` will load from `sources` (a cascade.loader.Sources), read from the headers."""
    from .loader import keymap_for

    named = {}
    for kind, part in sources.parts().items():
        component = COMPONENT_OF_PART[kind]
        sizes = {}
        for model_key, src in keymap_for(part).items():
            info = part.info(src.key)
            numel = info.numel // 3 if src.chunk is not None else info.numel
            sizes[model_key] = _device_bytes(numel, info.torch_dtype, dtypes[component])
        named[component] = sizes
    return ComponentSizes.from_bytes(named, {c: _itemsize(d) for c, d in dtypes.items()})


def _group(key: str) -> str:
    """A UNet block's name ("down_blocks.1.3") or "" for everything outside the blocks."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:3])
    return ""


def build_full_size_table() -> dict:
    """{component: {variant: [[group, numel, dtype], ...]}} of the official models, built on the meta device."""
    from . import configs
    from .loader import instantiate

    models = {
        "text_encoder": {"big": ("text_encoder", configs.CLIP_G)},
        "prior": {v: ("prior", configs.unet_config("prior", v)) for v in VARIANTS},
        "decoder": {v: ("decoder", configs.unet_config("decoder", v)) for v in VARIANTS},
        "vqgan": {"big": ("stage_a", configs.STAGE_A)},
    }
    table: dict = {}
    for component, variants in models.items():
        for variant, (kind, config) in variants.items():
            with torch.device("meta"):
                model = instantiate(kind, dict(config))
            groups: dict[tuple[str, str], int] = {}
            for key, tensor in model.state_dict().items():
                slot = (_group(key), str(tensor.dtype).removeprefix("torch."))
                groups[slot] = groups.get(slot, 0) + tensor.numel()
            table.setdefault(component, {})[variant] = [[g, n, d] for (g, d), n in sorted(groups.items())]
    return table


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(FULL_SIZE_FILE.read_text())


def full_size(dtypes: dict[str, torch.dtype], prior: str = "big", decoder: str = "big") -> ComponentSizes:
    """The official models' sizes at the given compute dtypes, from the shipped table (no files, no model build)."""
    table = _table()
    variant = {"text_encoder": "big", "prior": prior, "decoder": decoder, "vqgan": "big"}
    named = {}
    for component, choice in variant.items():
        rows = table[component][choice]
        # Group names stand in for tensor keys: ComponentSizes groups "down_blocks.1.3.<n>" into block down_blocks.1.3.
        named[component] = {f"{g}.{i}" if g else f"rest.{i}": _device_bytes(n, _DTYPES[d], dtypes[component])
                            for i, (g, n, d) in enumerate(rows)}
    return ComponentSizes.from_bytes(named, {c: _itemsize(d) for c, d in dtypes.items()})
