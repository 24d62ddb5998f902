"""Safetensors headers built from {key: shape} tables (no data), for tests of classification and planning."""

from __future__ import annotations

from pathlib import Path

from cascade.tensorfile import ITEMSIZE, SafetensorsHeader, TensorInfo


def header_from_shapes(name: str, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> SafetensorsHeader:
    """A header whose tensors are laid out back to back in `shapes` order, each `dtype`."""
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        tensors[key] = TensorInfo(key, dtype, tuple(shape), offset, offset + n)
        offset += n
    return SafetensorsHeader(Path(name), tensors, {}, offset)
