"""Write a file so that readers see the old version or the complete new one, never a part.

The data goes to a hidden temp file in the target folder, is flushed to disk and renamed over the
target (``os.replace`` is atomic within one file system); on any failure -- an exception, Ctrl-C,
a full disk -- the temp file is removed and a previous file at the target is untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "temp_path"]


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so the rename stays atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


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
