"""Config files that cannot be used: one `error:` line naming the file, from every entry point."""
import subprocess
import sys

import pytest

from bimacosr.config import ConfigError, load_config
from bimacosr.inference import InferenceOptions, plan
from tests.conftest import REPO


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_config_names_the_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config {path} is empty; copy .*BiMaCoSR.yaml"):
        load_config(path)


def test_config_without_the_inference_sections_names_the_file(tmp_path):
    path = tmp_path / "train_only.yaml"
    path.write_text("train:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=f"config {path} is missing required key.*'diffusion.params'"):
        plan(InferenceOptions(tmp_path, tmp_path / "out", config=path))


@pytest.mark.slow
def test_empty_config_is_one_error_line_in_every_entry_point(tmp_path):
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    ckpt = ["--ckpt", str(tmp_path / "w.pth")]
    commands = [["inference_quant.py", "-i", str(REPO / "examples"), "-o", str(tmp_path / "o"), "--config",
                 str(empty), *ckpt],
                ["main_distill.py", "--cfg_path", str(empty), "--save_dir", str(tmp_path / "run")],
                ["scripts/export_deploy.py", "--config", str(empty), *ckpt, "--out", str(tmp_path / "x.st")]]
    for script, *args in commands:
        result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and lines == [f"error: config {empty} is empty; copy "
                                                    f"{REPO / 'configs/BiMaCoSR.yaml'} or write '_base_: <a config>' "
                                                    f"and the keys you change"], (script, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]
