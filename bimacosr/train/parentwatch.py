"""Stop a ``torchrun`` worker when its launcher dies.

If the ``torchrun`` process is killed (``kill -9``, a closed terminal's SIGHUP on the launcher
only), its workers are re-parented and would keep training -- and keep the run folder busy. A
daemon thread polls ``os.getppid()``; once it changes, the worker prints one line and leaves at
once with ``os._exit`` (no clean-up can hang on collectives whose peers may be gone). A checkpoint
folder is only ever renamed into place when complete, so nothing half-written is left.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STATUS = 1


def _watch(parent: int, interval: float, what: str) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    print(f"error: {what}: the launcher (pid {parent}) is gone; stopping (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS)


def watch_parent(interval: float = 0.5, what: str = "worker") -> threading.Thread:
    """Start the daemon thread watching the current parent process; returns it."""
    thread = threading.Thread(target=_watch, args=(os.getppid(), interval, what), name="parent-watch",
                              daemon=True)
    thread.start()
    return thread
