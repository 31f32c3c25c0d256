"""scripts/gpu_check.py where a CPU can test it: one line and exit 2 without CUDA, the argument
parsing, and the small checks as a dry run on the CPU."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts/gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the no-CUDA exit")
def test_no_cuda_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: no CUDA device") and len(out.stderr.strip().splitlines()) == 1


def test_unknown_check_is_refused():
    out = subprocess.run([sys.executable, str(SCRIPT), "--checks", "warp_drive"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "invalid choice: 'warp_drive'" in out.stderr


@pytest.mark.slow
def test_dry_run_on_cpu(smoke_assets, tmp_path):
    rows = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--config", str(REPO / "configs/smoke.yaml"),
                          "--checks", "int_mm", "deploy_layers", "--json", str(rows)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(rows.read_text())
    assert [r["check"] for r in got] == ["int_mm", "deploy_layers"] and all(r["status"] == "ok" for r in got)
    assert "worst max |deploy - simulated|" in got[1]["result"] and "| deploy_layers | ok |" in out.stdout
