"""Image sizes the metrics cannot score: the limit table against pyiqa's own behaviour (for the
metrics that run offline), and metric.py turning them into per-image notes, never a traceback."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from bimacosr.evaluation import METRICS, build_metrics
from bimacosr.metric_sizes import SIZE_LIMITS, SizeLimit
from bimacosr.smoke import photo


def test_every_metric_has_a_limit():
    assert list(SIZE_LIMITS) == list(METRICS)


def test_size_rule():
    niqe, musiq = SIZE_LIMITS["niqe"], SIZE_LIMITS["musiq"]
    assert niqe.note("NIQE", 64, 64) == "too small for NIQE: 64×64 < 96 px"
    assert niqe.note("NIQE", 200, 95) == "too small for NIQE: 200×95 < 96 px"
    assert niqe.note("NIQE", 96, 96) is None
    assert musiq.note("MUSIQ", 447, 1) is None
    assert musiq.note("MUSIQ", 1, 448) == "too elongated for MUSIQ: 1×448, sides ≥ 448:1"
    assert SizeLimit().note("PSNR", 1, 1) is None
    assert {n: SIZE_LIMITS[n].min_side for n in ("ssim", "lpips", "clipiqa", "clipiqa+")} == \
        {"ssim": 11, "lpips": 31, "clipiqa": 31, "clipiqa+": 31}


@pytest.mark.parametrize("name", ["psnr", "ssim", "niqe"])
def test_limit_is_where_pyiqa_stops_working(name, tmp_path, monkeypatch):
    """The offline metrics score an image at their minimum side and fail one pixel below it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = build_metrics([name], True, None, torch.device("cpu"), offline=True)[0][name]
    side = SIZE_LIMITS[name].min_side
    score = (lambda x: metric(x, x.flip(-1))) if METRICS[name].kind == "fr" else metric
    assert torch.isfinite(score(torch.rand(1, 3, side, 3 * side))).all()
    if side > 1:
        with pytest.raises(RuntimeError):
            score(torch.rand(1, 3, side - 1, 3 * side))


def test_niqe_on_a_64px_image_is_a_note_and_the_rest_still_scores(tmp_path, monkeypatch, capsys):
    """metric.py on a 64×64 and a 160×128 image (it raised pyiqa's RuntimeError and wrote nothing)."""
    import metric

    sr = tmp_path / "sr"
    sr.mkdir()
    Image.fromarray(photo("astronaut")[:64, :64]).save(sr / "tiny.png")
    Image.fromarray(photo("coffee")[:128, :160]).save(sr / "big.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    assert metric.main(["--inp_imgs", str(sr), "--metrics", "niqe", "--log", str(tmp_path / "out"),
                        "--log_name", "small", "--offline"]) == 0
    printed = capsys.readouterr()
    assert f"note: {sr / 'tiny.png'}: too small for NIQE: 64×64 < 96 px" in printed.err.splitlines()
    rows = {r["sr_file"]: r for r in csv.DictReader((tmp_path / "out" / "metrics_per_image.csv").open())}
    assert rows["tiny.png"]["niqe"] == "" and rows["tiny.png"]["not_scored"] == "too small for NIQE: 64×64 < 96 px"
    assert float(rows["big.png"]["niqe"]) > 0 and rows["big.png"]["not_scored"] == ""
    folder = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())["folders"][0]
    assert folder["images"] == 2 and folder["scored_images"] == {"niqe": 1}
    assert folder["scores"]["niqe"] == pytest.approx(float(rows["big.png"]["niqe"]))
    assert f"| sr | {folder['scores']['niqe']:.4f} (1/2) |" in printed.out
    (log,) = (tmp_path / "out").glob("test_small_*.log")
    assert log.read_text().splitlines()[1] == f"{sr}/tiny.png | too small for NIQE: 64×64 < 96 px"
