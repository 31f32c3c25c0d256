"""metric.py --table1: the paper's columns per test set over ROOT/<set>/HR and METHOD/<set>, the
paper's rows beside them (not recorded here: said so, no numbers), skipped metrics as cells."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from bimacosr.evaluation import EvaluationError
from bimacosr.smoke import photo
from bimacosr.table1 import COLUMNS, DATASETS, NOT_RECORDED, PAPER_METHODS, PAPER_ROWS, score_table1

HEADER = "| SR folder | PSNR ↑ | SSIM ↑ | LPIPS ↓ | DISTS ↓ | FID ↓ | NIQE ↓ | MUSIQ ↑ | MANIQA ↑ | CLIP-IQA+ ↑ |"


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """test/{RealSR,DIV2K-Val}/HR (no DRealSR); ours/ with both sets, sinsr/ with RealSR only;
    one 128×112 photograph crop per set, the methods' images blurred copies."""
    root = tmp_path_factory.mktemp("table1")
    for dataset, name in (("RealSR", "astronaut"), ("DIV2K-Val", "coffee")):
        hr = Image.fromarray(photo(name)[:128, 100:212])
        (root / "test" / dataset / "HR").mkdir(parents=True)
        hr.save(root / "test" / dataset / "HR" / f"{name}.png")
        for method, radius in (("ours", 1.0), ("sinsr", 2.0)):
            if (method, dataset) != ("sinsr", "DIV2K-Val"):
                (root / method / dataset).mkdir(parents=True)
                hr.filter(ImageFilter.GaussianBlur(radius)).save(root / method / dataset / f"{name}.png")
    return root


def test_paper_rows_table_is_complete_and_not_invented():
    assert list(COLUMNS) == ["psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa-pipal", "clipiqa+"]
    assert {d: list(rows) for d, rows in PAPER_ROWS.items()} == {d: list(PAPER_METHODS) for d in DATASETS}
    assert all(v is None or len(v) == len(COLUMNS) for rows in PAPER_ROWS.values() for v in rows.values())


def test_a_filled_paper_row_shows_its_values_under_the_scored_columns(layout, monkeypatch):
    """Once a row is filled from the paper, its values land under their own columns (a subset of
    the nine scored here) in the table and the JSON; the other rows still say not recorded."""
    import bimacosr.table1 as table1

    filled = tuple(float(i) + 0.5 for i in range(len(COLUMNS)))  # psnr 0.5, ssim 1.5, ..., clipiqa+ 8.5
    monkeypatch.setitem(table1.PAPER_ROWS, "RealSR", {**PAPER_ROWS["RealSR"], "ResShift": filled})
    result = score_table1(layout / "test", [layout / "ours"], metrics=["niqe", "psnr", "ssim"], offline=True)
    assert result.columns == ["psnr", "ssim", "niqe"]
    lines = result.markdown().split("### ")[1].splitlines()
    assert [c.strip() for c in lines[6].strip("|").split("|")] == ["ResShift (paper's Table 1)", "0.5", "1.5", "5.5"]
    assert lines[5].split(" | ")[1] == lines[7].split(" | ")[1] == NOT_RECORDED
    rows = result.summary()["sets"]["RealSR"]["paper_rows"]
    assert rows == {"SinSR": None, "ResShift": {"psnr": 0.5, "ssim": 1.5, "niqe": 5.5}, "BiMaCoSR": None}
    assert result.summary()["sets"]["DIV2K-Val"]["paper_rows"]["ResShift"] is None


def test_table1_on_the_layout(layout, monkeypatch, capsys):
    import metric

    monkeypatch.setenv("TORCH_HOME", str(layout / "home"))  # no weights: the learned metrics are skipped
    assert metric.main(["--table1", str(layout / "test"), "--inp_imgs", str(layout / "ours"), str(layout / "sinsr"),
                        "--log", str(layout / "out"), "--offline"]) == 0
    table = (layout / "out" / "table1.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    sections = table.split("### ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == ["RealSR", "DIV2K-Val"]
    realsr = sections[0].splitlines()
    assert realsr[2] == HEADER
    assert [ln.split(" | ")[0] for ln in realsr[4:9]] == ["| ours", "| sinsr"] + [
        f"| {m} (paper's Table 1)" for m in PAPER_METHODS]
    ours = realsr[4].strip("| ").split(" | ")
    assert [c == "skipped" for c in ours[1:]] == [False, False, True, True, True, False, True, True, True]
    assert 30 < float(ours[1]) < 60 and 0.8 < float(ours[2]) < 1 and float(ours[6]) > 0
    assert all(ln.split(" | ")[1] == NOT_RECORDED for ln in realsr[6:9])
    assert "* DRealSR not scored" in table and "* sinsr left out of DIV2K-Val" in table
    summary = json.loads((layout / "out" / "table1.json").read_text())
    assert summary["columns"] == list(COLUMNS) and list(summary["sets"]) == ["RealSR", "DIV2K-Val"]
    assert summary["sets"]["RealSR"]["methods"] == ["ours", "sinsr"]
    assert summary["sets"]["RealSR"]["paper_rows"] == {m: None for m in PAPER_METHODS}
    assert (layout / "out" / "RealSR" / "metrics_per_image.csv").is_file()


def test_table1_input_errors(layout, tmp_path):
    with pytest.raises(EvaluationError, match="nothing to score under"):
        score_table1(tmp_path, [layout / "ours"])
    with pytest.raises(EvaluationError, match="folder not found: .*missing"):
        score_table1(layout / "test", [layout / "missing"])
    with pytest.raises(EvaluationError, match="none requested"):
        score_table1(layout / "test", [layout / "ours"], ["clipiqa"])
    import metric
    with pytest.raises(SystemExit):
        metric.parse_args(["--table1", "r", "--inp_imgs", "a", "--gt_imgs", "g", "--log", "l"])


def test_metrics_are_built_once_for_every_set(layout, monkeypatch):
    import bimacosr.evaluation as evaluation

    calls = []
    real = evaluation.build_metrics
    monkeypatch.setattr(evaluation, "build_metrics", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    result = score_table1(layout / "test", [layout / "ours", layout / "sinsr"], metrics=["psnr", "niqe"], offline=True)
    assert list(result.sets) == ["RealSR", "DIV2K-Val"] and calls == [["psnr", "niqe"]]
    assert all(r.metrics == ["psnr", "niqe"] and r.skipped == [] for r in result.sets.values())


def test_a_set_that_does_not_pair_stops_before_any_metric_is_built(layout, tmp_path, monkeypatch):
    """Every set is paired before the metrics are built (the second set's problem is found first),
    and a metric set built for GT cannot score without one."""
    import shutil

    import bimacosr.evaluation as evaluation
    from bimacosr.evaluation import metric_set, pairings_of, score

    root = tmp_path / "copy"
    shutil.copytree(layout / "test", root / "test")
    shutil.copytree(layout / "ours", root / "ours")
    (root / "ours" / "DIV2K-Val" / "coffee.png").rename(root / "ours" / "DIV2K-Val" / "other.png")
    calls = []
    monkeypatch.setattr(evaluation, "build_metrics", lambda *a, **k: calls.append(a) or ({}, [], {}))
    with pytest.raises(EvaluationError, match="no SR image in .*DIV2K-Val has a GT of the same name"):
        score_table1(root / "test", [root / "ours"], metrics=["psnr"], offline=True)
    assert calls == []
    built = metric_set(["psnr"], True, offline=True)
    with pytest.raises(ValueError, match="built for a GT folder"):
        score(pairings_of([layout / "ours" / "RealSR"], None), None, built)
