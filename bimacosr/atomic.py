"""Write a file so that readers see the old version or the complete new one, never a part.

The data goes to a hidden temp file in the target folder, is flushed to disk and renamed over the
target (``os.replace`` is atomic within one file system); on any failure -- an exception, Ctrl-C,
a full disk -- the temp file is removed and a previous file at the target is untouched. The file
gets the mode a plain ``open(path, "w")`` would give (0666 less the umask), whatever the writer
used for its temp file (safetensors creates 0600).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "file_digest", "temp_path"]


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so the rename stays atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _umask() -> int:
    """The process's umask (Linux: read from /proc without changing it; elsewhere set and restored)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every OS
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temp path, then move it to ``path``.

    Parent folders are created. Exceptions of ``write`` (and of the rename) propagate after the
    temp file is removed. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text (newlines written as given)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return atomic_write(path, write)


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, read in 1 MiB chunks: what lock files and build
    records keep of a file written whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Path(path).stat().st_size, digest.hexdigest()
