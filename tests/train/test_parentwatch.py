"""A worker whose launcher is killed with SIGKILL stops by itself within seconds."""
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

CHILD = ("import time; from bimacosr.train.parentwatch import watch_parent; watch_parent(0.1, 'rank 0'); "
         "print('watching', flush=True); time.sleep(60)")
# The parent starts the child (its stdout/stderr go to files), prints the child's pid, then waits.
PARENT = ("import subprocess, sys, time; "
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=open(sys.argv[2], 'w'), "
          "stderr=open(sys.argv[3], 'w')); print(child.pid, flush=True); time.sleep(60)")


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_exits_when_its_parent_is_killed(tmp_path):
    out, err = tmp_path / "child.out", tmp_path / "child.err"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(out), str(err)], stdout=subprocess.PIPE,
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
    assert err.read_text() == f"error: rank 0: the launcher (pid {parent.pid}) is gone; stopping (pid {child})\n"
