"""main_distill.py as users run it: smoke assets, 1 vs 2 processes, exact resume, signals, bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

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


def weights(run, step, name="model.pth"):
    return torch.load(run / "checkpoints" / f"step_{step:07d}" / name, weights_only=True)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(root):
    cfg = config(root, "noqueue", **{"train.queue_size": 0, "train.val_freq": 0, "train.iterations": 2})
    two = distill(root, cfg, root / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = distill(root, cfg, root / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    checksums = torch.load(root / "two/checkpoints/step_0000002/trainer.pth", weights_only=True)["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    a, b = weights(root / "two", 2), weights(root / "one", 2)
    start = torch.load(root / "data/smoke/weights/sinsr.pth", weights_only=True)
    assert not torch.equal(a["out.2.weight"], start["out.2.weight"])  # it trained
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit for bit


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
def test_bad_configs_fail_before_the_first_step(root, change, message):
    (root / "data/smoke/empty").mkdir(exist_ok=True)
    cfg = config(root, "bad", **change)
    result = distill(root, cfg, root / "bad_run", timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (root / "bad_run/train_log.csv").exists()


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
