"""main_distill.py as users run it: smoke assets, 1 vs 2 processes, exact resume, signals, bad input,
one error line per failure (under torchrun too), the run-folder lock, resume past a broken checkpoint."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from bimacosr import build
from bimacosr.config import load_config
from tests.conftest import REPO, SMOKE_CONFIG

SMOKE = SMOKE_CONFIG
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's per-worker default: same kernels everywhere


@pytest.fixture(scope="module")
def root(smoke_assets, tmp_path_factory):
    return smoke_assets.copy_to(tmp_path_factory.mktemp("train"))


def config(root, name, **train):
    cfg = load_config(SMOKE)
    for key, value in train.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    path = root / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return path


def distill(root, cfg, save_dir, *extra, nproc=1, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, str(REPO / "main_distill.py"), "--cfg_path", str(cfg), "--save_dir", str(save_dir), *extra],
                          cwd=root, capture_output=True, text=True, timeout=timeout, env=ENV)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def worker_tracebacks(stderr):
    """Traceback lines from our code (torchrun's own ChildFailedError report is not ours)."""
    return [line for line in stderr.splitlines() if line.lstrip().startswith('File "')
            and ("bimacosr" in line or "main_distill.py" in line)]


def weights(run, step, name="model.pth"):
    return torch.load(run / "checkpoints" / f"step_{step:07d}" / name, weights_only=True)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(root):
    cfg = config(root, "noqueue", **{"train.queue_size": 0, "train.val_freq": 0, "train.iterations": 2})
    two = distill(root, cfg, root / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = distill(root, cfg, root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    batch = OmegaConf.load(cfg).train.batch[0]
    assert two.stdout.splitlines()[0] == (f"training 2 steps in {root / 'two'}: 2 process(es) on cpu, batch {batch} "
                                          f"({batch // 2} per process), 8 training images")
    assert two.stdout.splitlines()[-1].startswith("done: 2 step(s) in ")
    assert two.stdout.splitlines()[-1].endswith(f"last checkpoint {root / 'two/checkpoints/step_0000002'}")
    checksums = torch.load(root / "two/checkpoints/step_0000002/trainer.pth", weights_only=True)["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    a, b = weights(root / "two", 2), weights(root / "one", 2)
    start = torch.load(root / "data/smoke/weights/sinsr.pth", weights_only=True)
    assert not torch.equal(a["out.2.weight"], start["out.2.weight"])  # it trained
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit


@pytest.mark.slow
def test_one_step_under_bf16_autocast(root):
    """train.amp=bf16 (the trainer's autocast; the UNet's forms below float32, shifted-window
    attention included, under gradients): a step that moves the weights and keeps them all finite,
    and not to where the same step in float32 takes them (autocast did run). Where this CPU
    emulates bf16 (or is held to a class without it, ``scripts/as_cpu.py``) the run says so."""
    native = build.native_bf16()
    runs = {}
    for amp in ("bf16", "none"):
        cfg = config(root, f"amp_{amp}", **{"train.amp": amp, "train.queue_size": 0, "train.val_freq": 0,
                                            "train.iterations": 1})
        result = distill(root, cfg, root / f"amp_{amp}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("note: train.amp bf16: this CPU has no native bf16" in result.stdout) == (amp == "bf16" and not native)
        runs[amp] = weights(root / f"amp_{amp}", 1)
    trained, start = runs["bf16"], torch.load(root / "data/smoke/weights/sinsr.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert not torch.equal(trained["out.2.weight"], start["out.2.weight"])
    assert not torch.equal(trained["out.2.weight"], runs["none"]["out.2.weight"])


@pytest.fixture(scope="module")
def straight(root):
    """4 iterations in one go (checkpoints at 2 and 4, validation at 3): the run the resume test
    compares against and the inference test loads."""
    cfg = config(root, "resume", **{"train.save_freq": 2, "train.val_freq": 3, "train.iterations": 4})
    return cfg, distill(root, cfg, root / "straight")


@pytest.mark.slow
def test_resume_continues_bit_identically(root, straight):
    cfg, straight = straight
    first = distill(root, cfg, root / "split", "--iterations", "2")
    second = distill(root, cfg, root / "split", "--resume")
    for result in (straight, first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.pth", "ema.pth"):
        a, b = weights(root / "straight", 4, name), weights(root / "split", 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(root / "straight/checkpoints/step_0000004/trainer.pth", weights_only=True)
    opt_b = torch.load(root / "split/checkpoints/step_0000004/trainer.pth", weights_only=True)
    assert torch.equal(opt_a["pools"][0]["lq"], opt_b["pools"][0]["lq"])
    assert (root / "straight/checkpoints/best_psnr/ema.pth").exists()
    end = straight.stdout.splitlines()[-1]
    assert "; best by validation PSNR (" in end and end.endswith(f" dB): {root / 'straight/checkpoints/best_psnr'}")
    assert second.stdout.splitlines()[0].startswith(f"training from step 2 to 4 in {root / 'split'}: 1 process(es)")
    rows = (root / "split/train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4"]


@pytest.mark.slow
def test_saved_student_runs_in_inference_and_curves_plot(root, straight):
    assert straight[1].returncode == 0, straight[1].stderr[-3000:]
    run = root / "straight"
    result = subprocess.run([sys.executable, str(REPO / "inference_quant.py"), "--config", str(SMOKE),
                             "--ckpt", str(run / "checkpoints/step_0000004/ema.pth"), "-i", "data/smoke/val/LR",
                             "-o", str(root / "sr_from_run")], cwd=root, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    plot = subprocess.run([sys.executable, str(REPO / "scripts/plot_training.py"), str(run)], capture_output=True, text=True)
    assert plot.returncode == 0 and (run / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(root):
    cfg = config(root, "long", **{"train.iterations": 1000, "train.val_freq": 0, "train.save_freq": 1000})
    proc = subprocess.Popen([sys.executable, str(REPO / "main_distill.py"), "--cfg_path", str(cfg), "--save_dir", "sig"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = root / "sig/train_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    saved = sorted((root / "sig/checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    again = distill(root, cfg, root / "sig", "--resume", "--iterations", str(step + 1))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (root / f"sig/checkpoints/step_{step + 1:07d}/model.pth").exists()


@pytest.mark.parametrize("change,message", [
    ({"model.teacher_ckpt_path": "data/smoke/weights/missing_teacher.pth"}, "missing_teacher.pth"),
    ({"data.train.params.dir_paths": ["data/smoke/empty"]}, "data/smoke/empty"),
    ({"model.params.conv_quant_modules": "BinaryConv2d_typo"}, "unknown binary layer 'BinaryConv2d_typo'"),
])
@pytest.mark.slow
def test_bad_configs_fail_before_the_first_step(root, change, message):
    (root / "data/smoke/empty").mkdir(exist_ok=True)
    cfg = config(root, "bad", **change)
    result = distill(root, cfg, root / "bad_run", timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (root / "bad_run").exists()  # not even the lock


def test_non_finite_loss_stops_without_touching_the_weights(root, monkeypatch):
    from bimacosr.train import trainer as trainer_module

    monkeypatch.chdir(root)
    monkeypatch.setattr(trainer_module, "distill_loss",
                        lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    opts = trainer_module.TrainOptions(cfg_path=SMOKE, save_dir=root / "nan_run")
    run = trainer_module.Trainer(opts, trainer_module.Dist(0, 1, torch.device("cpu")))
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    batch = next(iter(run._loader()))
    with pytest.raises(FloatingPointError, match="non-finite loss.*weights are unchanged"):
        run.train_step(batch, 1)
    assert all(torch.equal(before[k], v) for k, v in run.student.state_dict().items())


def test_corrupt_training_image_advice_matches_the_run_folder(root, monkeypatch):
    """Before any checkpoint the advice is to run the command again (--resume would find nothing),
    after one (saved on the way out) to continue with --resume."""
    from bimacosr.train import state
    from bimacosr.train import trainer as trainer_module
    from bimacosr.train.batches import TrainingDataError

    monkeypatch.chdir(root)
    data = root / "data/smoke/train_unreadable"
    shutil.copytree(root / "data/smoke/train", data, dirs_exist_ok=True)
    for image in data.iterdir():
        image.write_bytes(image.read_bytes()[:200])
    cfg = config(root, "unreadable", **{"data.train.params.dir_paths": [str(data)], "train.num_workers": 0})
    run_dir = root / "unreadable_run"
    run = trainer_module.Trainer(trainer_module.TrainOptions(cfg_path=cfg, save_dir=run_dir),
                                 trainer_module.Dist(0, 1, torch.device("cpu")))
    fresh = r"remove it, then run the same command again \(no checkpoint was saved yet, so without --resume\)$"
    with pytest.raises(TrainingDataError, match=fresh):
        run._next_batch(iter(run._loader()))
    assert state.list_checkpoints(run_dir) == []
    run.step = 1  # a step trained since the last checkpoint: saved before the error
    with pytest.raises(TrainingDataError, match="replace or remove it, then continue with --resume$"):
        run._next_batch(iter(run._loader()))
    assert [p.name for p in state.list_checkpoints(run_dir)] == ["step_0000001"]


def malformed(root):
    path = root / "malformed.yaml"
    path.write_text(f"_base_: {SMOKE}\ntrain:\n  iterations: [1, 2\n")
    return path


@pytest.mark.slow
def test_malformed_yaml_is_one_error_line(root):
    cfg = malformed(root)
    result = distill(root, cfg, root / "malformed_run", timeout=120)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: cannot parse config {cfg}, line 4 column 1: did not find "
                                          f"expected ',' or ']' (fix the YAML there)"], result.stderr
    assert "Traceback" not in result.stderr and not (root / "malformed_run").exists()
    debug = distill(root, cfg, root / "malformed_run", "--debug", timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.slow
def test_malformed_yaml_under_torchrun_is_one_error_line_from_rank_0(root):
    result = distill(root, malformed(root), root / "malformed_run2", nproc=2, timeout=300)
    assert result.returncode != 0
    assert len(error_lines(result.stderr)) == 1 and "cannot parse config" in result.stderr, result.stderr
    assert worker_tracebacks(result.stderr) == []
    assert not (root / "malformed_run2").exists()


HOLD = ("import sys, time; from bimacosr.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def test_second_run_on_a_locked_folder_is_refused(root):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root / "locked")], stdout=subprocess.PIPE, text=True,
                              env={**ENV, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = distill(root, config(root, "locked"), root / "locked", timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {root / 'locked'} is in use by another training: pid {holder.pid} on host ")
    assert "Traceback" not in result.stderr and sorted(p.name for p in (root / "locked").iterdir()) == [".lock"]


@pytest.mark.slow
def test_stale_lock_taken_over_and_resume_falls_back_past_a_truncated_checkpoint(root):
    cfg = config(root, "fallback", **{"train.save_freq": 1, "train.val_freq": 0, "train.iterations": 2})
    run = root / "fallback"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.mkdir()
    (run / ".lock").write_text(f"pid={dead.stdout.strip()}\nhost={socket.gethostname()}\nsince=earlier\n")
    first = distill(root, cfg, run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"warning: took over the stale lock {run / '.lock'}: pid {dead.stdout.strip()} " in first.stderr
    assert (run / ".lock").read_text() == ""  # released at the end

    broken = run / "checkpoints/step_0000002/model.pth"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    explicit = distill(root, cfg, run, "--resume", str(broken.parent), "--iterations", "3")
    assert explicit.returncode == 1 and "Traceback" not in explicit.stderr
    (line,) = error_lines(explicit.stderr)
    assert line.startswith(f"error: resumed student {broken} is corrupt, truncated or not a weight file")

    again = distill(root, cfg, run, "--resume", "--iterations", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"warning: skipped checkpoint {broken.parent}: resumed student {broken} is corrupt" in again.stderr
    assert f"resuming from {run / 'checkpoints/step_0000001'}" in again.stderr
    rows = (run / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3"]  # step 2 trained again
    assert set(weights(run, 2)) == set(weights(run, 3))  # the broken step 2 was rewritten


@pytest.mark.slow
def test_resume_under_torchrun_past_a_truncated_checkpoint_exits_cleanly_every_time(root):
    """Issue 19: a complete resumed run under torchrun ended with status 1 once in a few runs
    ("terminate called without an active exception" from a gloo thread at interpreter exit).
    The workers now leave in a fixed order (trainer.train), so every repeat exits 0."""
    cfg = config(root, "shutdown", **{"train.save_freq": 1, "train.val_freq": 0, "train.iterations": 2})
    first = distill(root, cfg, root / "shutdown", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    for repeat in range(4):
        run = root / f"shutdown_{repeat}"
        shutil.copytree(root / "shutdown", run)
        broken = run / "checkpoints/step_0000002/model.pth"
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
        again = distill(root, cfg, run, "--resume", "--iterations", "3", nproc=2)
        assert again.returncode == 0 and "terminate called" not in again.stderr, (repeat, again.stderr[-3000:])
        assert f"resuming from {run / 'checkpoints/step_0000001'}" in again.stderr
        assert (run / "checkpoints/step_0000003/model.pth").is_file() and (run / ".lock").read_text() == ""


@pytest.mark.slow
def test_corrupt_training_image_stops_every_rank_once_after_saving(root):
    from bimacosr.data.datasets import build_train_dataset
    from bimacosr.train.batches import BatchPlan

    data = root / "data/smoke/train_corrupt"
    shutil.copytree(root / "data/smoke/train", data, dirs_exist_ok=True)
    cfg = config(root, "corrupt", **{"train.save_freq": 100, "train.val_freq": 0, "train.iterations": 3,
                                     "train.num_workers": 1, "data.train.params.dir_paths": [str(data)]})
    loaded = load_config(cfg)
    paths = build_train_dataset(loaded.data.train, seed=int(loaded.train.seed)).paths
    plans = [BatchPlan(len(paths), 4, 2, rank, 2, int(loaded.train.seed)) for rank in (0, 1)]
    used = {step: {i for plan in plans for i in plan.indices(step)} for step in (1, 2)}
    bad = paths[min(used[2] - used[1])]  # read at step 2, not at step 1
    bad.write_bytes(bad.read_bytes()[:200])
    result = distill(root, cfg, root / "corrupt_run", nproc=2, timeout=600)
    assert result.returncode != 0
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: training image {bad} cannot be read ("), result.stderr[-3000:]
    assert line.endswith("replace or remove it, then continue with --resume")
    assert worker_tracebacks(result.stderr) == [] and "Connection" not in result.stderr
    saved = sorted(p.name for p in (root / "corrupt_run/checkpoints").iterdir())
    assert saved == ["step_0000001"]  # the step done before the bad batch is not lost


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _running(pid):
    """Whether any thread of process ``pid`` is still running. The main thread of a process that
    exits becomes a zombie before its other threads are gone, and those still hold its files (and
    so the run lock): the main thread's state alone is not enough."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().split(")")[-1].split()[0] not in "ZX":
                    return True
        except FileNotFoundError:
            pass
    return False


@pytest.mark.slow
def test_killing_the_torchrun_launcher_stops_its_workers_and_frees_the_folder(root):
    from bimacosr.train.runlock import RunLock

    cfg = config(root, "orphan", **{"train.iterations": 1000, "train.val_freq": 0, "train.save_freq": 1000})
    err = root / "orphan.err"
    with err.open("w") as stderr:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     str(REPO / "main_distill.py"), "--cfg_path", str(cfg), "--save_dir", "orphan"],
                                    cwd=root, stdout=subprocess.DEVNULL, stderr=stderr, env=ENV)
    log = root / "orphan/train_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.5)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and all(map(_running, workers))
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_running, workers)):
        time.sleep(0.1)
    assert not any(map(_running, workers)), "workers outlived the launcher by 10 s"
    assert err.read_text().count(f"the launcher (pid {launcher.pid}) is gone") == 2
    lock = RunLock(root / "orphan")
    assert lock.acquire().endswith("is no longer running")  # the folder is free for the next run
    lock.release()


@pytest.mark.slow
def test_training_from_another_working_folder_finds_the_configs_data(smoke_assets, tmp_path):
    """configs/smoke.yaml's relative data and weight paths resolve against the repository, as in
    inference: a copy of the repository with its smoke assets, trained from an empty folder."""
    repo = tmp_path / "repo"
    for part in ("bimacosr", "configs"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "main_distill.py", repo)
    smoke_assets.copy_to(repo)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(repo / "main_distill.py"), "--cfg_path", str(repo / "configs/smoke.yaml"),
                             "--save_dir", str(tmp_path / "run"), "--iterations", "1"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/step_0000001/model.pth").is_file() and not any(elsewhere.iterdir())
