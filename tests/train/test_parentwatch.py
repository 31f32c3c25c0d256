"""A worker whose launcher is killed with SIGKILL stops by itself within seconds, with one line."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

CHILD = ("import time; from bimacosr.train.parentwatch import watch_parent; watch_parent(0.1, 'rank 0'); "
         "print('watching', flush=True); time.sleep(60)")
# The parent starts the child (its stdout/stderr go to files), prints the child's pid, then waits.
PARENT = ("import subprocess, sys, time; "
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=open(sys.argv[2], 'w'), "
          "stderr=open(sys.argv[3], 'w')); print(child.pid, flush=True); time.sleep(60)")


# A rank whose collective fails (its peer left first) before its own watch has noticed: the error
# path calls stop_if_orphaned, which returns while the launcher lives and reports it once it is gone.
ORPHANED_ERROR = ("import os, time; from bimacosr.train.parentwatch import stop_if_orphaned, watch_parent; "
                  "parent = os.getppid(); watch_parent(3600, 'rank 1'); stop_if_orphaned(); "
                  "print('watching', flush=True)\n"
                  "while os.getppid() == parent: time.sleep(0.02)\n"
                  "try:\n    raise RuntimeError('Connection reset by peer')\n"
                  "except RuntimeError:\n    stop_if_orphaned()\n    raise")


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("child_code,what", [(CHILD, "rank 0"), (ORPHANED_ERROR, "rank 1")],
                         ids=["watch", "failed_collective"])
def test_worker_exits_when_its_parent_is_killed(tmp_path, child_code, what):
    out, err = tmp_path / "child.out", tmp_path / "child.err"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code, str(out), str(err)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    deadline = time.time() + 30
    while "watching" not in out.read_text() and time.time() < deadline:
        time.sleep(0.05)
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its parent by 5 s"
    assert err.read_text() == f"error: {what}: the launcher (pid {parent.pid}) is gone; stopping (pid {child})\n"
