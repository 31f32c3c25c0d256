"""The run folder lock: a live holder is refused by name, a dead holder's lock is taken over."""
import os
import socket
import subprocess
import sys
import time

import pytest

from bimacosr.train.runlock import RunLock, RunLockedError
from tests.conftest import REPO

HOLD = "import sys, time; from bimacosr.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None  # creates the folder
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()}.*another --save_dir"):
        RunLock(tmp_path / "run").acquire()
    (tmp_path / "run/train_log.csv").write_text("step\n")  # the run wrote something: the folder stays
    first.release()
    again = RunLock(tmp_path / "run")
    assert again.acquire() is None  # a clean release leaves no stale owner
    again.release()
    assert (tmp_path / "run/.lock").read_text() == ""


def test_a_folder_the_lock_created_and_nothing_else_used_is_removed(tmp_path):
    lock = RunLock(tmp_path / "new/run")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "new/run").exists() and (tmp_path / "new").is_dir()
    (tmp_path / "kept").mkdir()
    lock = RunLock(tmp_path / "kept")
    lock.acquire()
    lock.release()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [".lock"]


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    lock = RunLock(tmp_path)
    message = lock.acquire()
    assert message.startswith(f"took over the stale lock {tmp_path / '.lock'}: pid {holder.pid} on host ")
    assert message.endswith("is no longer running")
    assert f"pid={os.getpid()}\n" in (tmp_path / ".lock").read_text()
    lock.release()


def test_lock_left_by_another_host_is_taken_over_when_free(tmp_path):
    (tmp_path / ".lock").write_text(f"pid=1\nhost=elsewhere\nsince={time.strftime('%Y')}\n")
    lock = RunLock(tmp_path)
    assert lock.acquire().endswith("pid 1 on host elsewhere (since " + time.strftime("%Y") + ") no longer holds it")
    lock.release()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """The owner dies without releasing while its forked child (like a DataLoader worker) lives on:
    the folder is free at once."""
    code = ("import os, sys, time; from bimacosr.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "pid = os.fork()\nif pid == 0:\n    os.close(1); os.close(2); time.sleep(30); os._exit(0)\nprint(pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    child = int(out.stdout.split()[0])
    try:
        assert os.path.exists(f"/proc/{child}")  # the child still runs
        lock = RunLock(tmp_path / "run")
        assert lock.acquire().endswith("is no longer running")
        lock.release()
    finally:
        os.kill(child, 9)
