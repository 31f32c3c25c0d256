"""Evaluation: fixture g, metric.py's PSNR/SSIM against an independent computation on real
photos, pairing by name, offline learned metrics reported as skipped, written results."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bimacosr.evaluation import (EvaluationError, channel_mismatch, evaluate, folder_labels, metric_name,
                                 pair_by_name, write_results)
from bimacosr.parity import check_file
from tests.conftest import FIXTURES, REPO

G_METRICS = FIXTURES / "pipeline/g_metrics.pt"
LEARNED = ["lpips", "dists", "fid", "musiq", "maniqa-pipal", "clipiqa", "clipiqa+"]


def test_fixture_g_metrics():
    checks = check_file(G_METRICS)
    assert len(checks) == 5
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """gt/ (astronaut, coffee, gt_only), sr_jpeg/ (JPEG q20 copies + sr_only),
    sr_blur/ (blurred copies, coffee as .bmp: pairing is by stem); 192x192 crops."""
    root = tmp_path_factory.mktemp("photos")
    crops = {"astronaut": Image.fromarray(data.astronaut()[:192, 96:288]),
             "coffee": Image.fromarray(data.coffee()[100:292, 200:392])}
    for sub in ("gt", "sr_jpeg", "sr_blur", "home"):
        (root / sub).mkdir()
    for name, img in crops.items():
        img.save(root / "gt" / f"{name}.png")
        _jpeg(img, 20).save(root / "sr_jpeg" / f"{name}.png")
        ext = "bmp" if name == "coffee" else "png"
        img.filter(ImageFilter.GaussianBlur(1.2)).save(root / "sr_blur" / f"{name}.{ext}")
    crops["coffee"].save(root / "gt" / "gt_only.png")
    crops["astronaut"].save(root / "sr_jpeg" / "sr_only.png")
    return root


def _metric_py(*args: str, home: Path) -> subprocess.CompletedProcess:
    """Run metric.py with an empty torch hub (TORCH_HOME), as on a machine without weights."""
    env = {**os.environ, "TORCH_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "metric.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(photos):
    """metric.py on both SR folders, all metrics (default), results in out/."""
    proc = _metric_py("--inp_imgs", str(photos / "sr_jpeg"), str(photos / "sr_blur"),
                      "--gt_imgs", str(photos / "gt"), "--log", str(photos / "out"), "--offline",
                      home=photos / "home")
    assert proc.returncode == 0, proc.stderr
    out = photos / "out"
    rows = list(csv.DictReader((out / "metrics_per_image.csv").open()))
    summary = json.loads((out / "metrics_summary.json").read_text())
    return proc, rows, summary, (out / "metrics_table.md").read_text()


def _y(path: Path, dtype: type = np.float64) -> np.ndarray:
    """BT.601 Y (16..235 scale / 255) of an image file, independent of pyiqa."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=dtype) / dtype(255)
    return (dtype(16) + rgb @ np.array([65.481, 128.553, 24.966], dtype=dtype)) / dtype(255)


def test_psnr_ssim_match_independent_computation(run, photos):
    _, rows, _, _ = run
    assert len(rows) == 4
    for row in rows:
        sr_file, gt_file = Path(row["folder"]) / row["sr_file"], photos / "gt" / row["gt_file"]
        psnr = peak_signal_noise_ratio(_y(gt_file), _y(sr_file), data_range=1.0)
        # pyiqa adds eps 1e-8 to the MSE (docs/pipeline.md §7.2) and works in float32 (~1e-5 dB).
        want_psnr = -10 * np.log10(10 ** (-psnr / 10) + 1e-8)
        # pyiqa SSIM: Y (computed in float32) rounded at range 255; 11x11 Gaussian (sigma 1.5),
        # population statistics, valid region only (skimage crops the same 5-pixel border), no
        # downsampling. pyiqa stores the window in float32, hence ~1e-7 differences.
        gt_y, sr_y = (np.round(_y(f, np.float32) * np.float32(255)).astype(np.float64)
                      for f in (gt_file, sr_file))
        want_ssim = structural_similarity(gt_y, sr_y, data_range=255, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
        assert float(row["psnr"]) == pytest.approx(want_psnr, abs=2e-5)
        assert float(row["ssim"]) == pytest.approx(want_ssim, abs=1e-6)
        assert 20 < psnr < 40 and 0.5 < want_ssim < 0.99


def test_unpaired_files_named(run):
    proc, rows, summary, _ = run
    jpeg, blur = summary["folders"]
    assert (jpeg["unpaired_sr"], jpeg["unpaired_gt"]) == (["sr_only.png"], ["gt_only.png"])
    assert (blur["unpaired_sr"], blur["unpaired_gt"]) == ([], ["gt_only.png"])
    assert "sr_only.png" in proc.stderr and "gt_only.png" in proc.stderr
    assert {r["sr_file"] for r in rows if r["folder"].endswith("sr_blur")} == {
        "astronaut.png", "coffee.bmp"}


def test_learned_metrics_skipped_with_their_files(run, photos):
    _, rows, summary, table = run
    skipped = {s["metric"]: s for s in summary["skipped"]}
    assert sorted(skipped) == sorted(LEARNED)
    home = photos / "home" / "hub"
    assert skipped["lpips"]["needed_files"] == [
        str(home / "checkpoints/alexnet-owt-7be5be79.pth"),
        str(home / "pyiqa/LPIPS_v0.1_alex-df73285e.pth")]
    assert skipped["fid"]["needed_files"] == [
        str(home / "pyiqa/pt_inception-2015-12-05-6726825d.pth")]
    assert all(skipped[m]["needed_files"] for m in LEARNED)
    assert "niqe" in summary["notes"] and "basicsr" in summary["notes"]["niqe"]
    for folder in summary["folders"]:
        assert set(folder["scores"]) == {"psnr", "ssim", "niqe"}
    assert set(rows[0]) == {"folder", "image", "sr_file", "gt_file", "psnr", "ssim", "niqe",
                            "channel_mismatch", "not_scored"}
    assert all(r["channel_mismatch"] == r["not_scored"] == "" for r in rows)  # 192 px: NIQE scores
    assert all(f["channel_mismatch"] == [] for f in summary["folders"])
    lines = table.splitlines()
    assert lines[0].startswith("| SR folder | PSNR ↑ | SSIM ↑ | LPIPS ↓")
    assert [ln.split(" | ")[0] for ln in lines[2:4]] == ["| sr_jpeg", "| sr_blur"]  # folder names
    assert [f["sr_dir"] for f in summary["folders"]] == [str(photos / "sr_jpeg"), str(photos / "sr_blur")]
    assert lines[2].count("skipped") == len(LEARNED)


def test_no_reference_metrics_without_gt(photos, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(photos / "home"))
    result = evaluate([photos / "sr_jpeg"], None, ["psnr", "niqe"], device="cpu")
    assert [(s.metric, s.needed_files) for s in result.skipped] == [("psnr", [])]
    assert [r["image"] for r in result.folders[0].rows] == ["astronaut", "coffee", "sr_only"]
    assert all(np.isfinite(r["niqe"]) for r in result.folders[0].rows)


def test_pairing_errors(photos, tmp_path):
    (tmp_path / "other").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "unrelated.png")
    with pytest.raises(EvaluationError, match="no SR image"):
        pair_by_name(photos / "sr_jpeg", tmp_path / "other")
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "unrelated.jpg")
    with pytest.raises(EvaluationError, match="same stem"):
        pair_by_name(tmp_path / "other", None)
    with pytest.raises(EvaluationError, match="folder not found"):
        pair_by_name(tmp_path / "missing", None)


def test_metric_py_clean_error_for_missing_folder(photos, tmp_path):
    proc = _metric_py("--inp_imgs", str(tmp_path / "nope"), "--gt_imgs", str(photos / "gt"),
                      "--log", str(tmp_path / "out"), home=photos / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: folder not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "out").exists()


def test_gray_sr_against_colour_gt_is_warned_and_recorded(photos, tmp_path):
    """A gray result scored against a colour GT: one warning naming both files, and the CSV and
    JSON say how they were compared (gray replicated to 3 channels)."""
    sr_dir = tmp_path / "sr_gray"
    sr_dir.mkdir()
    Image.open(photos / "sr_jpeg" / "astronaut.png").convert("L").save(sr_dir / "astronaut.png")
    proc = _metric_py("--inp_imgs", str(sr_dir), "--gt_imgs", str(photos / "gt"), "--metrics", "psnr",
                      "--log", str(tmp_path / "out"), home=photos / "home")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "differ in channels" in ln]
    assert warnings == [f"warning: {sr_dir / 'astronaut.png'} and {photos / 'gt' / 'astronaut.png'} differ "
                        f"in channels: SR gray (1 ch) vs GT rgb (3 ch); SR gray replicated to 3 channels; "
                        f"compared as RGB"]
    note = warnings[0].split("channels: ", 1)[1]
    (row,) = csv.DictReader((tmp_path / "out" / "metrics_per_image.csv").open())
    assert row["channel_mismatch"] == note
    folder = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())["folders"][0]
    assert folder["channel_mismatch"] == [{"sr_file": "astronaut.png", "gt_file": "astronaut.png",
                                           "channel_mismatch": note}]


def test_rows_are_labelled_by_folder_name(tmp_path, monkeypatch):
    assert folder_labels(["/r/run1/out", "/r/run2/out", "/x/sinsr", "/y/a/b", "/z/a/b"]) == \
        ["run1/out", "run2/out", "sinsr", "y/a/b", "z/a/b"]
    monkeypatch.chdir(tmp_path)
    assert folder_labels([".", "sub/."]) == [tmp_path.name, "sub"]


def test_channel_mismatch_notes():
    assert channel_mismatch("rgb", "rgb") is None
    assert channel_mismatch("rgb", "gray") == ("SR rgb (3 ch) vs GT gray (1 ch); GT gray replicated to 3 "
                                               "channels; compared as RGB")
    assert channel_mismatch("rgba", "rgb").endswith("alpha ignored; compared as RGB")


def test_metric_names_in_the_original_spellings():
    import metric
    assert [metric_name(n) for n in ("PSNR", "MANIQA", "CLIPIQA+", "clip-iqa", "Maniqa-PIPAL")] == \
        ["psnr", "maniqa-pipal", "clipiqa+", "clipiqa", "maniqa-pipal"]
    with pytest.raises(ValueError, match="unknown metric 'brisque'; known: psnr"):
        metric_name("brisque")
    args = metric.parse_args(["--inp_imgs", "a", "--log", "l", "--metrics", "PSNR", "MANIQA", "--log_name", "x"])
    assert args.metrics == ["psnr", "maniqa-pipal"] and args.log_name == "x"
    with pytest.raises(SystemExit):
        metric.parse_args(["--inp_imgs", "a", "--log", "l", "--metrics", "brisque"])


def test_log_name_writes_the_original_log(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(photos / "home"))
    result = evaluate([photos / "sr_jpeg"], photos / "gt", ["psnr", "ssim"], device="cpu")
    paths = write_results(result, tmp_path, log_name="RealSR")
    assert paths["log"].parent == tmp_path and paths["log"].name.startswith("test_RealSR_")
    lines = paths["log"].read_text().splitlines()
    astro = next(r for r in result.folders[0].rows if r["image"] == "astronaut")
    assert lines[0] == f"{photos / 'sr_jpeg'}/astronaut.png | PSNR: {astro['psnr']:.6f}; SSIM: {astro['ssim']:.6f}"
    assert lines[-1] == (f"{photos / 'sr_jpeg'} | PSNR: {result.folders[0].scores['psnr']:.4f}; "
                         f"SSIM: {result.folders[0].scores['ssim']:.4f}")
    assert "log" not in write_results(result, tmp_path / "plain")


@pytest.mark.parametrize("device, words", [("banana", "not a device name"), ("cuda:99", "CUDA device")])
def test_bad_device_is_one_line_before_any_work(photos, tmp_path, capsys, device, words):
    import metric

    assert metric.main(["--inp_imgs", str(photos / "sr_jpeg"), "--log", str(tmp_path / "log"),
                        "--device", device, "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}") and words in err and err.count("\n") == 1
    assert not (tmp_path / "log").exists()


def test_fid_sees_the_outputs_and_gt_images_only(photos, tmp_path):
    """FID is handed exactly the files pairing counts (pyiqa's own folder scan, which recurses,
    run on what it gets): no comparison panel, no file without the output suffix, no subfolder."""
    from pyiqa.utils.img_util import scandir_images

    from bimacosr.evaluation import _score_folder

    sr = tmp_path / "sr"
    (sr / "nested").mkdir(parents=True)
    for name in ("astronaut_out.png", "astronaut_out_compare.png", "coffee_out.png", "extra_out.png",
                 "astronaut.png", "nested/coffee_out.png"):
        Image.open(photos / "gt" / "astronaut.png").save(sr / name)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    seen = {}

    def fid(sr_folder: str, gt_folder: str, **_) -> float:
        seen.update(sr=[Path(p).name for p in scandir_images(sr_folder)],
                    gt=[Path(p).name for p in scandir_images(gt_folder)])
        assert Path(sr_folder).resolve() != sr.resolve()
        return 1.5

    pairing = pair_by_name(sr, photos / "gt", "out")
    result = _score_folder(sr, photos / "gt", pairing, {"fid": fid}, "cpu")
    assert result.scores == {"fid": 1.5}
    assert seen == {"sr": ["astronaut_out.png", "coffee_out.png", "extra_out.png"],
                    "gt": ["astronaut.png", "coffee.png", "gt_only.png"]}
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
