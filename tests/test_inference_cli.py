"""inference_quant.py end to end, as a user runs it: tiny random checkpoints, real photographs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bimacosr.imageio import read_image, write_image
from bimacosr.smoke import downscale, photo
from tests.conftest import REPO, SMOKE_CONFIG

SCRIPT = REPO / "inference_quant.py"
CONFIG = SMOKE_CONFIG


@pytest.fixture(scope="module")
def workdir(smoke_assets, tmp_path_factory):
    root = smoke_assets.copy_to(tmp_path_factory.mktemp("infer"))
    lr = root / "lr"
    lr.mkdir()
    rgb = downscale(photo("astronaut"), 8)[:48, :40]
    Image.fromarray(rgb).save(lr / "astronaut.png")
    big = root / "big"  # larger than the minimum tile (64 LR pixels): tiled runs
    big.mkdir()
    Image.fromarray(downscale(photo("astronaut"), 4)[:96, :80]).save(big / "astronaut.png")
    Image.fromarray(downscale(photo("coffee"), 8)[:30, :50]).save(lr / "coffee.JPG", quality=90)
    Image.fromarray(downscale(photo("camera"), 8)[:32, :32, 0]).save(lr / "camera_gray.png")
    rgba = np.concatenate([rgb[:20, :20], np.full((20, 20, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(lr / "logo_rgba.png")
    (lr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def run(workdir, *args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(CONFIG),
                           "--ckpt", "data/smoke/weights/bimacosr.pth", *map(str, args)],
                          cwd=workdir, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_folder_with_every_kind_of_input(workdir):
    result = run(workdir, "-i", "lr", "-o", "out", "--compare")
    assert result.returncode == 1  # one file is corrupt: reported, skipped, non-zero exit
    assert "broken.png" in result.stdout + result.stderr and "4 image(s) written" in result.stdout
    assert "Traceback" not in result.stderr
    out = workdir / "out"
    expected = {"astronaut.png": ("RGB", (160, 192)), "coffee.png": ("RGB", (200, 120)),
                "camera_gray.png": ("L", (128, 128)), "logo_rgba.png": ("RGBA", (80, 80))}
    for name, (mode, size) in expected.items():
        with Image.open(out / name) as im:
            assert (im.mode, im.size) == (mode, size), name
        assert (out / name.replace(".png", "_compare.png")).exists()
    alpha = read_image(out / "logo_rgba.png").alpha
    assert alpha is not None and abs(float(alpha.mean()) - 128 / 255) < 0.01


def test_single_file_16_bit_and_tiny(workdir, tmp_path):
    ramp = (np.arange(20 * 24 * 3).reshape(20, 24, 3) * 37 % 65536).astype(np.float32) / 65535
    import torch
    write_image(tmp_path / "deep.png", torch.from_numpy(ramp).permute(2, 0, 1), bit_depth=16)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / "dot.png")
    for name, size, depth in (("deep.png", (80, 96), 16), ("dot.png", (4, 4), 8)):
        result = run(workdir, "-i", tmp_path / name, "-o", tmp_path / "res", "--suffix", "_x4")
        assert result.returncode == 0, result.stderr[-2000:]
        image = read_image(tmp_path / "res" / name.replace(".png", "_x4.png"))
        assert image.rgb.shape[-2:] == size and image.bit_depth == depth


@pytest.mark.slow
def test_tiled_run_matches_the_pipeline_and_is_seed_stable(workdir):
    args = ["-i", "big/astronaut.png", "--chop_size", "64", "--chop_stride", "48"]
    a, b = run(workdir, *args, "-o", "tiled_a"), run(workdir, *args, "-o", "tiled_b", "--blend", "gaussian")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    img_a = np.asarray(Image.open(workdir / "tiled_a/astronaut.png"))
    img_b = np.asarray(Image.open(workdir / "tiled_b/astronaut.png"))
    assert img_a.shape == img_b.shape == (384, 320, 3) and not np.array_equal(img_a, img_b)
    again = run(workdir, *args, "-o", "tiled_c")
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(img_a, np.asarray(Image.open(workdir / "tiled_c/astronaut.png")))


def test_missing_weights_name_the_file_and_the_fix(workdir):
    result = run(workdir, "-i", "lr/astronaut.png", "-o", "x", "--ckpt", "weights/BiMaCoSR.pth")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "BiMaCoSR.pth" in result.stderr and "put it at" in result.stderr
    assert "download_weights.py" in result.stderr


@pytest.mark.slow
def test_wrong_checkpoint_kind_is_explained(workdir):
    result = run(workdir, "-i", "lr/astronaut.png", "-o", "x", "--ckpt", "data/smoke/weights/sinsr.pth")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "FP SinSR/ResShift checkpoint" in result.stderr and "student init" in result.stderr


@pytest.mark.slow
def test_never_overwrites_an_input(workdir, tmp_path):
    shutil.copy(workdir / "lr/astronaut.png", tmp_path / "a.png")
    result = run(workdir, "-i", tmp_path, "-o", tmp_path)
    assert result.returncode != 0 and "outputs would become inputs" in result.stderr
    result = run(workdir, "-i", tmp_path, "-o", tmp_path, "--suffix", "_sr")
    assert result.returncode == 0 and (tmp_path / "a_sr.png").exists()


@pytest.mark.slow
def test_torchrun_splits_files_across_processes(workdir):
    inputs = workdir / "lr_ok"
    inputs.mkdir(exist_ok=True)
    for name in ("astronaut.png", "camera_gray.png", "coffee.JPG"):
        shutil.copy(workdir / "lr" / name, inputs / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per worker
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(SCRIPT), "--config", str(CONFIG), "--ckpt", "data/smoke/weights/bimacosr.pth",
                             "-i", "lr_ok", "-o", "dist"], cwd=workdir, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 0]" in result.stdout and "[rank 1]" in result.stdout
    single = run(workdir, "-i", "lr_ok", "-o", "single", env=env)  # same thread count: same kernels
    assert single.returncode == 0
    for name in ("astronaut.png", "camera_gray.png", "coffee.png"):
        assert np.array_equal(np.asarray(Image.open(workdir / "dist" / name)),
                              np.asarray(Image.open(workdir / "single" / name))), name


@pytest.mark.slow
def test_packed_deploy_file_runs_batched_tiles(workdir):
    from bimacosr.build import deployable_denoiser
    from bimacosr.deploy import export_deploy

    export_deploy(*deployable_denoiser(workdir / "data/smoke/weights/bimacosr.pth", CONFIG), workdir / "deploy.safetensors")
    result = run(workdir, "-i", "big/astronaut.png", "-o", "dep", "--deploy", "deploy.safetensors",
                 "--chop_size", "64", "--chop_stride", "16", "--tile_batch", "4", "--channels_last")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(workdir / "dep/astronaut.png") as im:
        assert im.size == (320, 384)
    wrong = run(workdir, "-i", "lr/astronaut.png", "-o", "dep2", "--deploy", "data/smoke/weights/sinsr.pth")
    assert wrong.returncode != 0 and "sinsr.pth" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_ref_path_scores_the_suffixed_outputs_against_gt(workdir, tmp_path):
    gt = tmp_path / "gt"
    gt.mkdir()
    Image.fromarray(downscale(photo("astronaut"), 2)[:192, :160]).save(gt / "astronaut.png")  # 4x the LR crop
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.fromarray(downscale(photo("astronaut"), 8)[:48, :40]).save(lr / "astronaut.png")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub")}  # no metric weights: learned metrics skipped
    result = run(workdir, "-i", lr, "-o", lr, "--suffix", "out", "--ref_path", gt, env=env)
    assert result.returncode == 0, result.stderr
    assert (lr / "astronaut_out.png").exists() and (lr / "metrics" / "metrics_summary.json").exists()
    assert "| lr | " in result.stdout  # the table, one row labelled by the folder name
    summary = json.loads((lr / "metrics" / "metrics_summary.json").read_text())
    assert summary["folders"][0]["images"] == 1 and summary["folders"][0]["scores"]["psnr"] > 10


@pytest.mark.slow
def test_compare_and_suffix_outputs_score_in_metric_py(workdir, tmp_path):
    """inference_quant.py --suffix out --compare, then metric.py on its output folder: every output
    paired with its GT (suffix detected), the panels left out, no unpaired warning."""
    gt, lr, out = tmp_path / "gt", tmp_path / "lr", tmp_path / "out"
    gt.mkdir(), lr.mkdir()
    for name, (top, left) in {"astronaut": (0, 0), "rocket": (100, 200)}.items():
        hr = downscale(photo("astronaut"), 2)[top:top + 192, left:left + 160]
        Image.fromarray(hr).save(gt / f"{name}.png")
        Image.fromarray(downscale(hr, 4)).save(lr / f"{name}.png")
    assert run(workdir, "-i", lr, "-o", out, "--suffix", "out", "--compare").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["astronaut_out.png", "astronaut_out_compare.png",
                                                     "rocket_out.png", "rocket_out_compare.png"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub")}
    metric = subprocess.run([sys.executable, str(REPO / "metric.py"), "--inp_imgs", str(out), "--gt_imgs",
                             str(gt), "--metrics", "psnr", "ssim", "--log", str(tmp_path / "scores")],
                            cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
    assert metric.returncode == 0, metric.stderr
    assert "warning" not in metric.stderr and "without a partner" not in metric.stderr
    assert "2 comparison panel(s)" in metric.stderr and "paired by the suffix '_out'" in metric.stderr
    folder = json.loads((tmp_path / "scores" / "metrics_summary.json").read_text())["folders"][0]
    assert folder["images"] == 2 and (folder["unpaired_sr"], folder["unpaired_gt"]) == ([], [])


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_only_whole_images(workdir, tmp_path):
    lr, out = tmp_path / "lr", tmp_path / "out"
    lr.mkdir()
    for i in range(8):
        shutil.copy(workdir / "lr/astronaut.png", lr / f"a{i}.png")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(CONFIG), "--ckpt",
                             "data/smoke/weights/bimacosr.pth", "-i", str(lr), "-o", str(out)],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert re.fullmatch(r"interrupted after [1-7] of 8 images; rerun with --skip_existing", err.splitlines()[-1])
    written = sorted(out.iterdir())  # no temp file, no partial image
    assert written and not [p.name for p in written if p.name.startswith(".")]
    assert all(read_image(path).rgb.shape[-2:] == (192, 160) for path in written)


def test_ctrl_c_while_scoring_is_one_line(smoke_assets, tmp_path, monkeypatch, capsys):
    import inference_quant
    from bimacosr import inference

    root = smoke_assets.copy_to(tmp_path)
    monkeypatch.chdir(root)
    (root / "lr").mkdir()
    Image.fromarray(photo("astronaut")[:16, :16]).save(root / "lr" / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference, "score", interrupted)
    args = ["-i", "lr", "-o", "out", "--config", str(REPO / "configs/smoke.yaml"),
            "--ckpt", str(smoke_assets.weights["student"]), "--ref_path", "lr"]
    assert inference.run(inference_quant.parse_args(args)) == 130
    assert (root / "out" / "a.png").is_file()
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted while scoring against --ref_path; the outputs are complete; score them with: "
        "python metric.py --inp_imgs out --gt_imgs lr --log out/metrics")
