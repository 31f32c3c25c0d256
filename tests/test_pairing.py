"""The pairing rule of metric.py and --ref_path: stems, inference's output suffix (given or
detected), comparison panels left out; metric.py on inference-named outputs without warnings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bimacosr.pairing import EvaluationError, detect_suffix, pair_by_name
from bimacosr.smoke import photo


def _folder(root: Path, name: str, files: list[str], size: int = 8) -> Path:
    """``root/name`` holding ``files`` (small gray-blue PNGs, or crops of a photograph)."""
    folder = root / name
    folder.mkdir()
    for file in files:
        Image.new("RGB", (size, size), (40, 60, 200)).save(folder / file)
    return folder


def _pairs(pairing) -> list[tuple[str, str | None]]:
    return [(s.name, g.name if g is not None else None) for s, g in pairing.pairs]


def test_explicit_suffix_leaves_other_files_out(tmp_path):
    sr = _folder(tmp_path, "sr", ["a_out.png", "b_out.png", "a.png"])
    gt = _folder(tmp_path, "gt", ["a.png", "b.png"])
    for suffix in ("out", "_out"):
        pairing = pair_by_name(sr, gt, suffix)
        assert _pairs(pairing) == [("a_out.png", "a.png"), ("b_out.png", "b.png")]
        assert (pairing.unpaired_sr, pairing.unpaired_gt) == ([], [])
        assert pairing.left_out == ["a.png"]
        assert pairing.notes == ["1 file(s) without the suffix '_out' left out"]


def test_suffix_detected_when_every_sr_name_is_a_gt_name_plus_it(tmp_path):
    sr = _folder(tmp_path, "sr", ["a_out.png", "b_c_out.png"])
    gt = _folder(tmp_path, "gt", ["a.png", "b_c.png", "b.png", "d.png"])
    pairing = pair_by_name(sr, gt)
    assert _pairs(pairing) == [("a_out.png", "a.png"), ("b_c_out.png", "b_c.png")]
    assert pairing.unpaired_gt == ["b.png", "d.png"]
    assert pairing.notes == ["paired by the suffix '_out': every SR name is a GT name + '_out' "
                             "(metric.py --suffix out)"]


def test_detect_suffix_rule():
    gt = {"a", "b", "b_c"}
    assert detect_suffix(["a_x4", "b_x4"], gt) == "_x4"
    assert detect_suffix(["b_c_x4"], gt) == "_x4"          # shortest fitting suffix
    assert detect_suffix(["a_x4", "b_x2"], gt) is None     # no common suffix
    assert detect_suffix(["a_x4", "b"], gt) is None        # a stem matches: plain pairing
    assert detect_suffix(["ax4", "e_x4"], gt) is None      # not <GT stem>_<suffix>
    assert detect_suffix([], gt) is None


def test_comparison_panels_are_not_sr_outputs(tmp_path):
    sr = _folder(tmp_path, "sr", ["a.png", "a_compare.png", "b.png", "b_compare.png", "x_compare.png"])
    gt = _folder(tmp_path, "gt", ["a.png", "b.png", "x_compare.png"])
    pairing = pair_by_name(sr, gt)
    # x_compare.png has no output beside it: an image of that name, paired as usual
    assert _pairs(pairing) == [("a.png", "a.png"), ("b.png", "b.png"), ("x_compare.png", "x_compare.png")]
    assert (pairing.unpaired_sr, pairing.unpaired_gt) == ([], [])
    assert pairing.left_out == ["a_compare.png", "b_compare.png"]
    assert pairing.notes == ["2 comparison panel(s) (*_compare) left out"]
    assert _pairs(pair_by_name(sr, None))[:2] == [("a.png", None), ("b.png", None)]


def test_nothing_paired_names_the_suffix_flag(tmp_path):
    sr = _folder(tmp_path, "sr", ["a_out.png", "b_sr.png"])
    gt = _folder(tmp_path, "gt", ["a.png", "b.png"])
    with pytest.raises(EvaluationError, match="no SR image .* pass --suffix SUFFIX"):
        pair_by_name(sr, gt)
    with pytest.raises(EvaluationError, match="no images in .* ending in '_x4'"):
        pair_by_name(sr, gt, "x4")


def test_metric_py_scores_inference_named_outputs_without_warnings(tmp_path, monkeypatch, capsys):
    """Outputs named as inference_quant.py --suffix out --compare writes them: paired with their GT
    (suffix detected; then given with --suffix), panels left out, no 'without a partner' warning."""
    import metric

    crop = photo("astronaut")[:48, :48]
    gt, out = tmp_path / "gt", tmp_path / "out"
    gt.mkdir(), out.mkdir()
    for name in ("a", "b"):
        Image.fromarray(crop).save(gt / f"{name}.png")
        Image.fromarray(crop // 2 + 60).save(out / f"{name}_out.png")
        Image.new("RGB", (96, 48)).save(out / f"{name}_out_compare.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    for extra in ([], ["--suffix", "out"]):
        assert metric.main(["--inp_imgs", str(out), "--gt_imgs", str(gt), "--metrics", "psnr", "--offline",
                            "--log", str(tmp_path / "log"), *extra]) == 0
        stderr = capsys.readouterr().err
        assert "without a partner" not in stderr and "warning" not in stderr
        assert f"note: {out}: 2 comparison panel(s) (*_compare) left out" in stderr
        assert ("paired by the suffix '_out'" in stderr) == (not extra)
        folder = json.loads((tmp_path / "log" / "metrics_summary.json").read_text())["folders"][0]
        assert folder["images"] == 2 and folder["left_out"] == ["a_out_compare.png", "b_out_compare.png"]
        assert 0 < folder["scores"]["psnr"] < 30
