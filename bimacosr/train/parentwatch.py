"""Stop a ``torchrun`` worker when its launcher dies.

If the ``torchrun`` process is killed (``kill -9``, a closed terminal's SIGHUP on the launcher
only), its workers are re-parented and would keep training -- and keep the run folder busy. A
daemon thread polls ``os.getppid()``; once it changes, the worker prints one line and leaves at
once with ``os._exit`` (no clean-up can hang on collectives whose peers may be gone). A checkpoint
folder is only ever renamed into place when complete, so nothing half-written is left.

The ranks poll independently, so the first to notice leaves while another may be inside a
collective, which then fails on the lost peer ("Connection reset by peer"). The training loop
calls :func:`stop_if_orphaned` on any error, so that rank too reports the launcher, not the
collective's traceback.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STATUS = 1
_watched: tuple[int, str] | None = None  # (parent pid, what) of this process's watch


def _stop(parent: int, what: str) -> None:
    print(f"error: {what}: the launcher (pid {parent}) is gone; stopping (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)


def _watch(parent: int, interval: float, what: str) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    _stop(parent, what)


def stop_if_orphaned() -> None:
    """Leave as the watch would, now, if the watched launcher is gone; otherwise return."""
    if _watched is not None and os.getppid() != _watched[0]:
        _stop(*_watched)


def watch_parent(interval: float = 0.5, what: str = "worker") -> threading.Thread:
    """Start the daemon thread watching the current parent process; returns it."""
    global _watched
    _watched = (os.getppid(), what)
    thread = threading.Thread(target=_watch, args=(_watched[0], interval, what), name="parent-watch",
                              daemon=True)
    thread.start()
    return thread
