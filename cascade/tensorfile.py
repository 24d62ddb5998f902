"""Safetensors files read the way big checkpoints need: header first, tensors one at a time from a memory map.

`read_header` parses and validates the header without touching tensor data, so classifying an 8 GB file costs a
few kilobytes of I/O. `TensorReader` hands out tensors straight from the mapped file at the requested dtype and
device; after each copy the pages it used are dropped from the process (MADV_DONTNEED), so loading a 7 GB model
never holds a second full copy in RAM.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import CorruptFileError, PickleRefusedError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format itself caps the header at 100 MB
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file: dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class SafetensorsHeader:
    """The parsed header of one file; `tensors` keeps the file's key order."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def keys(self) -> Iterator[str]:
        return iter(self.tensors)


def refuse_pickle(path: Path) -> None:
    """Pickled checkpoints can execute code when loaded; the engine never opens them."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{path.name}: pickled checkpoints ({path.suffix}) are refused because loading a pickle can run arbitrary "
            "code. Download the .safetensors version of this model instead (every Stable Cascade release has one)."
        )


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raise CorruptFileError with the reason when it is unusable.

    Validation covers what a truncated download or a mislabelled file looks like: header length beyond the file,
    invalid JSON, unknown dtypes, byte ranges that do not match shape x itemsize, overlap, or data running past
    the end of the file.
    """
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path.name}: only {size} bytes — not a safetensors file (empty or truncated download).")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            if head[:1] == b"\x80" or head[:2] == b"PK":
                raise PickleRefusedError(
                    f"{path.name}: this is a pickled PyTorch checkpoint with a .safetensors name; it is refused "
                    "because unpickling can run arbitrary code. Get a real .safetensors file."
                )
            raise CorruptFileError(
                f"{path.name}: header length {n} does not fit a {size}-byte file — not a safetensors file, or the "
                "download was cut off. Download the file again."
            )
        raw = f.read(n)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path.name}: the safetensors header is damaged ({err}). Download the file again.") from None
    if not isinstance(table, dict):
        raise CorruptFileError(f"{path.name}: the safetensors header is not a JSON object. Download the file again.")

    metadata = table.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in table.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path.name}: malformed header entry for {name!r}. Download the file again.") from None
        if dtype not in DTYPES:
            raise CorruptFileError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype!r}.")
        info = TensorInfo(name, dtype, shape, data_start + int(lo), data_start + int(hi))
        if info.nbytes != info.numel * ITEMSIZE[dtype] or lo < 0:
            raise CorruptFileError(f"{path.name}: tensor {name!r} byte range does not match its shape {list(shape)}.")
        tensors[name] = info
        spans.append((info.start, info.end, name))

    data_end = max((hi for _, hi, _ in spans), default=data_start)
    if data_end > size:
        missing = data_end - size
        raise CorruptFileError(
            f"{path.name}: the file is truncated — {missing:,} bytes of tensor data are missing "
            f"(expected {data_end:,} bytes, found {size:,}). The download was interrupted; download it again."
        )
    spans.sort()
    for (_, a_hi, a), (b_lo, _, b) in zip(spans, spans[1:]):
        if b_lo < a_hi:
            raise CorruptFileError(f"{path.name}: tensors {a!r} and {b!r} overlap in the file. Download it again.")
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, size)


class TensorReader:
    """Reads tensors from one safetensors file through a read-only memory map.

    Use as a context manager. `get` returns an owned tensor (never a view of the map), so the map can close
    while the model keeps its weights.
    """

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._file = None
        self._map: mmap.mmap | None = None

    def __enter__(self) -> "TensorReader":
        self._file = open(self.header.path, "rb")
        if self.header.file_size > 0:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._map.close()
        if self._file is not None:
            self._file.close()
        self._map = self._file = None

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", pin_memory: bool = False
    ) -> torch.Tensor:
        """The tensor `name`, converted to `dtype` (its own dtype if None) on `device`, in memory it owns.

        pin_memory: allocate the (CPU) result in page-locked memory, so later uploads to the GPU are fast and
        asynchronous; the data is copied straight from the map into it (one copy, not two).
        """
        info = self.header.tensors[name]
        if self._map is None:
            raise RuntimeError("TensorReader used outside its `with` block")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype or info.torch_dtype, device=device)
        view = memoryview(self._map)[info.start : info.end]
        try:
            with warnings.catch_warnings():
                # The map is read-only; we copy out of it immediately and never write to the view.
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(view, dtype=info.torch_dtype).reshape(info.shape)
            target_dtype = dtype or info.torch_dtype
            if pin_memory:
                out = torch.empty(info.shape, dtype=target_dtype, pin_memory=True)
                out.copy_(src)
            else:
                out = src.to(device=device, dtype=target_dtype, copy=True)
            del src
        finally:
            view.release()
        self._drop_pages(info.start, info.end)
        return out

    def _drop_pages(self, start: int, end: int) -> None:
        """Unmap the file pages a tensor used so RSS holds only the converted weights (Linux; no-op elsewhere)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or self._map is None:
            return
        lo = (start // _PAGE) * _PAGE
        hi = min(-(-end // _PAGE) * _PAGE, len(self._map))
        if hi > lo:
            try:
                self._map.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass  # advisory only: failing to drop pages costs RSS, never correctness


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temp file + rename), so an interrupted write never leaves a half file behind."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
