"""One training per run folder: ``<save_dir>/.lock``, held with ``flock`` by the main process.

The file holds the owner's pid, host and start time. The kernel releases a ``flock`` when its
process dies however it dies (``kill -9`` included), so a lock that can be taken while the file
still names an owner was left by a process that is gone: it is taken over with a one-line message.
A lock held by a live process is refused with :class:`RunLockedError` naming that process. On
release the file is emptied; when the lock created the folder and nothing else was written there
(a run that failed while setting up), file and folder are removed. A process that locked a file
that was removed meanwhile notices (other inode than the path's) and locks the new one.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # descriptors holding a run lock in this process


def _drop_inherited() -> None:
    """In a forked child (e.g. a DataLoader worker), close the inherited lock descriptors: a
    ``flock`` lasts while any descriptor of the open file lives, so a child outliving its parent
    would otherwise keep the folder locked."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited)


class RunLockedError(RuntimeError):
    """Another live training holds the run folder's lock; the message names it and the fix."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this host (a zombie, dead but not yet reaped by
    its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): kill() said it exists
        return True


def _fields(text: str) -> dict[str, str]:
    """A lock file's ``key=value`` lines."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _owner(text: str) -> str:
    """``pid P on host H (since T)`` from a lock file's text."""
    fields = _fields(text)
    return f"pid {fields.get('pid', '?')} on host {fields.get('host', '?')} (since {fields.get('since', '?')})"


class RunLock:
    """The lock of one run folder: ``acquire()`` ... ``release()``.

    ``acquire()`` creates the folder if needed and returns a message when it took over a stale
    lock (``None`` otherwise); it raises :class:`RunLockedError` when a live process holds it.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        self.created_folder = False

    def _lock_file(self) -> int:
        """An open descriptor of ``self.path`` holding its ``flock``."""
        while True:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.created_folder = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = self.path.read_text(errors="replace")
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another training: {_owner(held)} holds {self.path}; "
                    f"wait for it to finish or stop it, or choose another --save_dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # its owner removed the file between our open and flock: lock the new one

    def acquire(self) -> str | None:
        fd = self._lock_file()
        previous = os.read(fd, 4096).decode(errors="replace")
        record = f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD.add(fd)
        if not previous.strip():
            return None
        fields = _fields(previous)
        dead = fields.get("host") == socket.gethostname() and fields.get("pid", "").isdigit() \
            and not _alive(int(fields["pid"]))
        return (f"took over the stale lock {self.path}: {_owner(previous)} "
                f"{'is no longer running' if dead else 'no longer holds it'}")

    def release(self) -> None:
        """Empty the file -- or remove file and folder when the lock created the folder and it
        holds nothing else -- and drop the lock (idempotent)."""
        if self.fd is None:
            return
        folder = self.path.parent
        if self.created_folder and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            folder.rmdir()
        else:
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        _HELD.discard(self.fd)
        self.fd = None

