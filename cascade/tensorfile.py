"""Safetensors files read the way big checkpoints need: header first, then tensors one at a time.

`read_header` is the one validating reader of safetensors headers: it parses the header without touching tensor
data (classifying an 8 GB file costs a few kilobytes of I/O) and turns every header it cannot trust into one error
type, `HeaderError`, whose message names the byte offset or field at fault. After it returns, every tensor has a
supported dtype, a non-negative shape whose size matches its byte range, and a byte range inside the file's real
extent (written bytes, not holes of a sparse file), so nothing later can allocate more than the file holds.

`TensorReader` reads tensors with ordinary positioned reads (`preadv`) straight into memory the result owns, at the
requested dtype and device. It does not memory-map the file: a file truncated while it is mapped kills the process
with SIGBUS when a vanished page is touched (in SD.Next: the whole server), whereas a read of a truncated file just
comes back short, which becomes a clear error. Nothing of the file stays in the process after a tensor is read.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from typing import TYPE_CHECKING

from .errors import CheckpointError, CorruptFileError, HeaderError, PickleRefusedError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> bytes per element. Header work (`inspect`, classification, plans) needs only this, so
# torch is imported only when tensors are actually read: `inspect` answers without paying for torch's import.
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPES = tuple(ITEMSIZE)
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype code (imports torch)."""
    import torch

    return getattr(torch, _TORCH_NAMES[code])


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# The format allows headers up to 100 MB, but parsing a 99 MB one (1.4 M minimal tensor entries, the costliest
# kind per byte) took 17 s and +1.5 GB RSS here. Real checkpoints stay far below 1 MiB (the full Stable Cascade
# prior with CLIP-G: ~0.3 MiB; kohya training metadata: a few MiB), so 16 MiB keeps every real file and bounds the
# worst case to ~3 s and +250 MiB (tests/test_hostile_files.py::test_biggest_allowed_header_is_bounded...).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_RANK = 8  # real checkpoints use up to 5 dimensions (3-D convolutions)
MAX_DIM = 1 << 48  # a dimension no real tensor reaches; bounds zero-element shapes, which the byte check cannot
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; longer integers are never offsets or dimensions
# Unwritten bytes (holes) in the tensor data above both bounds mean an unfinished download that preallocated the
# file; a few zero blocks stored as holes (ZFS does that for all-zero blocks) stay far below them.
_HOLE_BYTES = 16 * 1024 * 1024
_HOLE_FRACTION = 0.01
# Tensors above this size are read by several threads: one reader thread was ~1.7x slower than the multithreaded
# copy out of a memory map that these reads replace; two threads matched it.
_PARALLEL_READ = 16 * 1024 * 1024
_ADVICE = "The file is damaged or is not a safetensors file: download it again from where you got it."


def printable(text: str, limit: int = 200) -> str:
    """`text` safe to print on a terminal or in a log: control characters, escape sequences, bidi overrides and
    other invisible characters become \\x.. / \\u.. escapes, and names longer than `limit` are cut."""
    text = str(text)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    out = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    return out + f"...(+{cut} chars)" if cut > 0 else out


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _quote(name: str) -> str:
    return "'" + printable(name, 120) + "'"


@dataclass(frozen=True, slots=True)
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
        return torch_dtype(self.dtype)


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
            f"{printable(path.name)}: pickled checkpoints ({printable(path.suffix)}) are refused because loading a "
            "pickle can run arbitrary code. Download the .safetensors version of this model instead (every Stable "
            "Cascade release has one)."
        )


# --- parsing ------------------------------------------------------------------------------------------------------
#
# Why not safetensors' own `safe_open` for the parsing: it exposes neither the byte offsets (the memory planner and
# TensorReader need them) nor the field at fault (its errors are one string such as "invalid JSON in header"), it
# maps the whole file, and it accepts headers of up to 100 MB. Our reader applies the same rules it does (dtype
# known, offsets in order, sizes matching shape x itemsize, JSON object of objects, string metadata) plus the
# bounds above, with stdlib json hardened below: NaN/Infinity, over-long integers and duplicate keys are refused
# while parsing, and nesting too deep for the parser is reported, not raised as RecursionError.


class _Reject(ValueError):
    """Raised from inside the JSON parser's hooks; `needle` (and which occurrence of it) locates the fault."""

    def __init__(self, message: str, needle: str, nth: int = 1):
        super().__init__(message)
        self.needle, self.nth = needle, nth


def _no_constant(name: str) -> Any:
    raise _Reject(f"{name} is not a valid number here (only finite numbers are)", name)


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"an integer with {len(digits)} digits (offsets and dimensions have at most {MAX_INT_DIGITS})",
                      digits[:MAX_INT_DIGITS + 1])
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Reject(f"the key {_quote(dup)} appears twice", json.dumps(dup, ensure_ascii=False) + ":", nth=2)
    return table


STRICT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_int=_bounded_int, object_pairs_hook=_unique_keys)


def parse_strict_json(text: str) -> Any:
    """JSON as safetensors headers (and the configs embedded in them) must be: no NaN/Infinity, no integers over 20
    digits, no duplicate keys. Raises ValueError (with `.pos` when the position is known) or RecursionError."""
    return STRICT_JSON.decode(text)


def _json_problem(err: BaseException, text: str, base: int) -> tuple[str, int | None]:
    """A JSON error as (reason, file byte offset or None); `base` is the file offset of text[0]."""
    if isinstance(err, RecursionError):
        return "the JSON is nested too deeply (a safetensors header is 3 levels deep)", None
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg})", base + len(text[: err.pos].encode("utf-8", "surrogatepass"))
    if isinstance(err, _Reject):
        at = -1
        for _ in range(err.nth):
            at = text.find(err.needle, at + 1)
        if at >= 0:
            return str(err), base + len(text[:at].encode("utf-8", "surrogatepass"))
    return str(err), None


def _field_offset(raw: bytes, name: str, base: int) -> int | None:
    """The file offset of a tensor's entry, found by its JSON-encoded key (for messages only)."""
    for encoded in (json.dumps(name), json.dumps(name, ensure_ascii=False)):
        at = raw.find(encoded.encode("utf-8", "surrogatepass") + b":")
        if at >= 0:
            return base + at
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            float: "a decimal number", int: "an integer"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = printable(json.dumps(value) if isinstance(value, (list, str, int)) else repr(value), 60)
    return text


def _open_regular(path: Path) -> int:
    """An fd of `path`, opened without blocking (a FIFO named .safetensors must not hang the reader) and checked
    to be a regular file (not a device, FIFO or folder)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HeaderError(f"{printable(path.name)}: not a regular file, so not a safetensors file. "
                              "Point at the .safetensors file itself.", field="file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got) if hasattr(os, "pread") else _seek_read(fd, offset + got, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _seek_read(fd: int, offset: int, n: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def _unwritten_bytes(fd: int, lo: int, hi: int, enough: int) -> int:
    """Bytes of [lo, hi) that are holes (never written) in a sparse file; stops counting past `enough`.

    Uses SEEK_DATA/SEEK_HOLE; where the OS or filesystem lacks them the file counts as fully written.
    """
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return 0
    holes, pos = 0, lo
    for _ in range(100_000):
        if pos >= hi or holes > enough:
            break
        try:
            data = os.lseek(fd, pos, seek_data)
        except OSError as err:
            if err.errno != errno.ENXIO:  # EINVAL etc.: not supported here
                return 0
            data = hi  # no data after pos: the rest is a hole
        holes += min(data, hi) - pos
        if data >= hi:
            break
        try:
            pos = os.lseek(fd, data, seek_hole)
        except OSError:
            return holes
    return holes


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header. Every header problem raises HeaderError (a CorruptFileError)
    naming the byte offset or field at fault; a truncated file raises CorruptFileError; a pickle raises
    PickleRefusedError; a missing file FileNotFoundError; an unreadable one CheckpointError.
    """
    path = Path(path)
    refuse_pickle(path)
    label = printable(path.name)
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read ({err.strerror or err}). Check that the file exists and "
                              "that you may read it.") from None
    try:
        return _read_header_fd(fd, path, label)
    finally:
        os.close(fd)


def _read_header_fd(fd: int, path: Path, label: str) -> SafetensorsHeader:
    size = os.fstat(fd).st_size
    head = _read_exact(fd, 0, 9)
    if len(head) < 9:
        raise HeaderError(f"{label}: only {size} bytes — not a safetensors file (empty or truncated download). {_ADVICE}",
                          field="length", offset=0)
    (n,) = struct.unpack("<Q", head[:8])
    fits = 2 <= n and 8 + n <= size and head[8:9] == b"{"
    if not fits and (head[:1] == b"\x80" or head[:2] == b"PK"):  # pickle protocol 2+ / zip (torch.save) magic
        raise PickleRefusedError(
            f"{label}: this is a pickled PyTorch checkpoint with a .safetensors name; it is refused because "
            "unpickling can run arbitrary code. Get a real .safetensors file."
        )
    if n < 2 or 8 + n > size:
        raise HeaderError(f"{label}: header length {n} (bytes 0-7) does not fit a {size}-byte file — not a "
                          f"safetensors file, or the download was cut off. {_ADVICE}", field="length", offset=0)
    if n > MAX_HEADER_BYTES:
        raise HeaderError(
            f"{label}: declares a {n:,}-byte header (bytes 0-7); this engine reads headers of at most "
            f"{MAX_HEADER_BYTES >> 20} MiB (real checkpoints use well under 1 MiB), so this is a damaged or "
            f"hostile file. {_ADVICE}", field="length", offset=0)
    if head[8:9] != b"{":
        raise HeaderError(f"{label}: the header (byte 8) does not start with '{{' — not a safetensors file. {_ADVICE}",
                          field="header", offset=8)
    raw = _read_exact(fd, 8, n)
    if len(raw) < n:
        raise CorruptFileError(f"{label}: the file ended while its header was read (it is being written or was "
                               "truncated). Wait for the copy to finish or download it again.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HeaderError(f"{label}: the safetensors header is damaged: invalid UTF-8 at byte {8 + err.start}. {_ADVICE}",
                          field="header", offset=8 + err.start) from None
    try:
        table = parse_strict_json(text)
    except (ValueError, RecursionError) as err:
        reason, offset = _json_problem(err, text, 8)
        where = f" at byte {offset}" if offset is not None else ""
        raise HeaderError(f"{label}: the safetensors header is damaged: {reason}{where}. {_ADVICE}",
                          field="header", offset=offset) from None
    if not isinstance(table, dict):
        raise HeaderError(f"{label}: the safetensors header is {_kind(table)}, not a JSON object. {_ADVICE}",
                          field="header", offset=8)
    return _validate(table, raw, fd, path, label, size, 8 + n)


def _validate(table: dict, raw: bytes, fd: int, path: Path, label: str, size: int, data_start: int) -> SafetensorsHeader:
    def fail(name: str, what: str, reason: str) -> HeaderError:
        offset = _field_offset(raw, name, 8)
        where = f" (header byte {offset})" if offset is not None else ""
        return HeaderError(f"{label}: tensor {_quote(name)}{where}: {what} {reason}. {_ADVICE}",
                           field=f"{printable(name, 120)}.{what}", offset=offset)

    metadata = table.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad = metadata if not isinstance(metadata, dict) else next(v for v in metadata.values() if not isinstance(v, str))
        offset = _field_offset(raw, "__metadata__", 8)
        raise HeaderError(f"{label}: __metadata__ must be an object of string values, but it holds {_kind(bad)}"
                          + (f" (header byte {offset})" if offset is not None else "") + f". {_ADVICE}",
                          field="__metadata__", offset=offset)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise fail(name, "entry", f"must be an object with dtype, shape and data_offsets, got {_kind(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if type(dtype) is not str:
            raise fail(name, "dtype", f"must be a string such as \"F16\", got {_kind(dtype)}")
        if dtype not in DTYPES:
            raise fail(name, "dtype", f"{_show(dtype)} is not supported (supported: {', '.join(DTYPES)})")
        if type(shape) is not list or len(shape) > MAX_RANK:
            got = _kind(shape) if type(shape) is not list else f"{len(shape)} dimensions"
            raise fail(name, "shape", f"must be a list of at most {MAX_RANK} integers, got {got}")
        for d in shape:
            if type(d) is not int or not 0 <= d < MAX_DIM:
                raise fail(name, "shape", f"has dimension {_show(d)}; dimensions are integers from 0 to 2**48")
        if type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets):
            raise fail(name, "data_offsets", f"must be two integers [begin, end], got {_show(offsets)}")
        lo, hi = offsets
        if lo < 0 or hi < lo:
            raise fail(name, "data_offsets", f"{_show(offsets)} is negative or reversed (begin must be <= end)")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ITEMSIZE[dtype] != hi - lo:
            raise fail(name, "data_offsets", f"span {hi - lo} bytes but shape {_show(shape)} of {dtype} needs "
                                             f"{numel * ITEMSIZE[dtype]}")
        info = TensorInfo(name, dtype, tuple(shape), data_start + lo, data_start + hi)
        tensors[name] = info
        spans.append((info.start, info.end, name))

    data_end = max((hi for _, hi, _ in spans), default=data_start)
    if data_end > size:
        missing = data_end - size
        raise CorruptFileError(
            f"{label}: the file is truncated — {missing:,} bytes of tensor data are missing "
            f"(expected {data_end:,} bytes, found {size:,}). The download was interrupted; download it again."
        )
    spans.sort()
    for (_, a_hi, a), (b_lo, _, b) in zip(spans, spans[1:]):
        if b_lo < a_hi:
            raise HeaderError(f"{label}: tensors {_quote(a)} and {_quote(b)} overlap in the file (byte {b_lo}). "
                              f"{_ADVICE}", field=f"{printable(b, 120)}.data_offsets", offset=b_lo)
    declared = data_end - data_start
    enough = max(_HOLE_BYTES, int(declared * _HOLE_FRACTION))
    holes = _unwritten_bytes(fd, data_start, data_end, enough)
    if holes > enough:
        raise CorruptFileError(
            f"{label}: at least {holes:,} of its {declared:,} bytes of tensor data were never written (the file is "
            "sparse: a download that reserved the full size and stopped early). Download it again."
        )
    return SafetensorsHeader(path, tensors, metadata, size)


# --- reading tensors --------------------------------------------------------------------------------------------


class TensorReader:
    """Reads tensors from one safetensors file with positioned reads; use as a context manager.

    `get` returns a tensor in memory it owns. Before each read the file is checked (fstat) to still have the size
    its header was read at; a file that shrinks during a read makes that read come back short. Either way the
    caller gets a CorruptFileError, never a SIGBUS.
    """

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "TensorReader":
        self._fd = os.open(self.header.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        try:
            self._check_unchanged()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._pool = None

    def _changed(self, detail: str) -> CorruptFileError:
        return CorruptFileError(
            f"{printable(self.header.path.name)}: the file changed while it was being loaded ({detail}); it is "
            "being written, replaced or was truncated. Nothing was loaded: wait until it is complete and load again."
        )

    def _check_unchanged(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != self.header.file_size:
            raise self._changed(f"its size is now {st.st_size:,} bytes, its header was read at {self.header.file_size:,}")

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", pin_memory: bool = False
    ) -> torch.Tensor:
        """The tensor `name`, converted to `dtype` (its own dtype if None) on `device`, in memory it owns.

        pin_memory: allocate the (CPU) result in page-locked memory, so later uploads to the GPU are fast and
        asynchronous.
        """
        import torch

        info = self.header.tensors[name]
        if self._fd is None:
            raise RuntimeError("TensorReader used outside its `with` block")
        target = dtype or info.torch_dtype
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=target, device=device)
        self._check_unchanged()
        direct = target == info.torch_dtype and (pin_memory or torch.device(device).type == "cpu")
        src = torch.empty(info.shape, dtype=info.torch_dtype, pin_memory=pin_memory and direct)
        self._read_into(src, info)
        if direct:
            return src
        if pin_memory:
            out = torch.empty(info.shape, dtype=target, pin_memory=True)
            out.copy_(src)
            return out
        return src.to(device=device, dtype=target)

    def _read_into(self, tensor: torch.Tensor, info: TensorInfo) -> None:
        import torch

        buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        size = len(buf)
        workers = min(8, max(1, torch.get_num_threads()), max(1, size // _PARALLEL_READ))
        if workers == 1 or not hasattr(os, "preadv"):
            self._read_range(buf, info.start)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(8, thread_name_prefix="cascade-read")
        step = -(-size // workers)
        jobs = [self._pool.submit(self._read_range, buf[i : i + step], info.start + i) for i in range(0, size, step)]
        for job in jobs:
            job.result()

    def _read_range(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [buf[done:]], offset + done)
            else:
                os.lseek(self._fd, offset + done, os.SEEK_SET)
                got = os.readv(self._fd, [buf[done:]])
            if got <= 0:
                raise self._changed(f"it ended at byte {offset + done:,}")
            done += got


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically: to a uniquely named temporary file beside `path`, then renamed over it, so an
    interrupted write never leaves a half file and concurrent writers never share a temporary file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
