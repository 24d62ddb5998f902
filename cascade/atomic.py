"""Files that other processes may read or write at the same time: unique temporary files, atomic replace, locks.

Why: fixed temporary names (`<out>.partial`) collide when two runs write the same output, and a process killed
between `open` and `rename` leaves a 0-byte or half file. Here every write goes to a temporary file made by
`tempfile.mkstemp` in the target's own folder (same file system, so `os.replace` is atomic), is flushed and
fsync'ed, and only then replaces the target. A kill at any moment leaves the target either untouched or complete;
at worst a uniquely named `.<name>.<random>.partial` stays behind. Any exception — KeyboardInterrupt and
SystemExit (a SIGTERM handler) included — removes the temporary file.

`file_lock` is a cross-process lock (fcntl.flock on POSIX, msvcrt.locking on Windows) for read-merge-write caches
and for building a shared cache only once.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from .errors import CascadeError

PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    """The process umask without changing it (Linux exposes it; elsewhere the set-and-restore dance)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_output_target(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output path that cannot be written as a regular file.

    Refused: a path that exists and is not a regular file (a directory, /dev/full or another device, a fifo, a
    socket — it would be replaced by our file, or the write would fail after the whole generation), a name
    ending in a path separator, and a folder (or its nearest existing ancestor, when the folder is still to be
    created) that is not a writable directory. A symlink is judged by what it points to.
    """
    text = os.fspath(path)
    if not text or text.endswith((os.sep, "/")) or (os.altsep and text.endswith(os.altsep)):
        raise CascadeError(f"The {what} path {text!r} names a folder; give a file name such as {os.path.join(text or '.', 'image.png')!r}.")
    target = Path(text)
    try:
        info = target.stat()
    except FileNotFoundError:
        info = None
    except OSError as err:
        raise CascadeError(f"Cannot use {text!r} as the {what} file: {err.strerror or err}.") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise CascadeError(f"The {what} path {text!r} is a directory; give a file name such as "
                               f"{os.path.join(text, 'image.png')!r}.")
        if not stat.S_ISREG(info.st_mode):
            kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                    "a fifo" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else
                    "not a regular file")
            raise CascadeError(f"The {what} path {text!r} exists and is {kind}; it is never overwritten. "
                               "Give the name of a new or regular file.")
    folder = target.parent if str(target.parent) else Path(".")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise CascadeError(f"Cannot write {text!r}: {str(existing)!r} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "its folder" if existing == folder else f"{str(existing)!r} (where its folder would be created)"
        raise CascadeError(f"Cannot write {text!r}: {where} is not writable. Choose another output folder.")


def _temporary_beside(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    return fd, Path(name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, what: str = "output",
                 durable: bool = True) -> Path:
    """Write `path` through `write(file)`: a unique temporary file beside it, fsync'ed, then `os.replace`d.

    The target is refused (CascadeError) if it exists and is not a regular file; OSErrors (disk full, no
    permission) become CascadeError naming the file. The temporary file is removed on any exception."""
    path = Path(path)
    check_output_target(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary_beside(path)
    except OSError as err:
        raise CascadeError(f"Cannot write {str(path)!r}: {err.strerror or err}.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        check_output_target(path, what)  # it may have become a directory or a device while we wrote
        os.replace(tmp, path)
    except OSError as err:
        _unlink_quietly(tmp)
        raise CascadeError(f"Cannot write {str(path)!r}: {err.strerror or err}. Nothing was written there.") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "file", durable: bool = True) -> Path:
    """`atomic_write` of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what=what, durable=durable)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive cross-process lock on `path` (created if missing) for the `with` block.

    On POSIX a directory can be locked itself (no lock file left in it). The lock file is never deleted:
    deleting it would let a waiting process and a newcomer hold two different locks."""
    path = Path(path)
    if os.name == "nt":
        import msvcrt

        lock_path = path / ".lock" if path.is_dir() else path
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises: keep waiting
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)
        return
    import fcntl

    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
