"""scripts/as_cpu.py: another script runs with the instruction set, kernel build and precision
``auto`` of a lesser CPU class (the per-class speed rows of docs/speed.md)."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import torch
from bimacosr import build, cpu, kernels
print(torch.backends.cpu.get_cpu_capability(), build.resolve_precision("auto", torch.device("cpu")).name,
      kernels.FLAGS[-1], any(f.startswith("avx512") for f in cpu.cpu_flags()), "avx512_bf16" in cpu.cpu_flags())
"""


@pytest.mark.parametrize("cls, want", [
    ("avx2", ["AVX2", "fp32-fast", "-mno-avx512f", "False", "False"]),
    ("avx512", [None, "fp32-fast", "-mno-avx512bf16", None, "False"]),
])
def test_a_script_runs_as_on_the_lesser_cpu_class(tmp_path, cls, want):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = subprocess.run([sys.executable, str(REPO / "scripts/as_cpu.py"), cls, str(probe)],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert len(out) == 5 and all(w is None or o == w for o, w in zip(out, want)), out


def test_an_unknown_class_is_refused():
    res = subprocess.run([sys.executable, str(REPO / "scripts/as_cpu.py"), "sse", "x.py"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice: 'sse'" in res.stderr
