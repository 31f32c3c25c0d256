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
      kernels.FLAGS[-1], any(f.startswith("avx512") for f in cpu.cpu_flags()), "avx512_bf16" in cpu.cpu_flags(),
      build.native_bf16("cpuinfo"))
print(cpu.describe())
import subprocess, sys
print(subprocess.run([sys.executable, "-c", "from bimacosr import build, cpu, kernels; "
                      "print(build.native_bf16(), cpu.held_class(), kernels.FLAGS[-1])"],
                     capture_output=True, text=True, check=True).stdout.strip())
"""


@pytest.mark.parametrize("cls, as_module, want", [
    ("avx2", False, ["AVX2", "fp32-fast", "-mno-avx512f", "False", "False", "True"]),
    ("avx512", True, [None, "fp32-fast", "-mno-avx512bf16", None, "False", "True"]),
])
def test_a_script_runs_as_on_the_lesser_cpu_class(tmp_path, cls, as_module, want):
    """As a script, or as a module from the working directory (``--module pytest`` runs the suite).
    Only this machine's flags are hidden: a cpuinfo file of the suite's own reads as written. The
    CPU line (what the benchmarks print first) says which class the machine is held to, and a
    process the script starts runs as that class too (the environment carries it)."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "cpuinfo").write_text("flags\t: avx2 avx512f avx512_bf16\n")
    target = ["--module", "probe"] if as_module else [str(tmp_path / "probe.py")]
    out = subprocess.run([sys.executable, str(REPO / "scripts/as_cpu.py"), cls, *target],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    first = out[0].split()
    assert len(first) == 6 and all(w is None or o == w for o, w in zip(first, want)), first
    assert out[1].startswith("CPU: ") and out[1].endswith(f"; held to {cls} by BIMACOSR_CPU_CLASS (scripts/as_cpu.py)")
    assert out[2].split() == ["False", cls, want[2]]  # a process it starts runs as that class too


def test_an_unknown_class_is_refused():
    res = subprocess.run([sys.executable, str(REPO / "scripts/as_cpu.py"), "sse", "x.py"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice: 'sse'" in res.stderr
