"""bimacosr/cpu.py: the CPU line CI starts with, read from a cpuinfo file."""
import subprocess
import sys

import pytest

from bimacosr.cpu import CLASS_ENV, CLASSES, cpu_flags, describe, held_class
from tests.conftest import REPO

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.30GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_vpopcntdq avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
"""


def test_describe_names_model_family_and_path_flags(tmp_path):
    (tmp_path / "intel").write_text(INTEL_AMX)
    assert describe(tmp_path / "intel") == ("CPU: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.30GHz (family 6, model 207); "
                                            "avx2 avx512f avx512_vpopcntdq avx512_bf16 amx_bf16 amx_int8")
    (tmp_path / "zen3").write_text("cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert describe(tmp_path / "zen3") == ("CPU: AMD EPYC 7B13 (family 25, model 1); avx2; without avx512f "
                                           "avx512_vpopcntdq avx512_bf16 amx_bf16 amx_int8")
    assert "not readable" in describe(tmp_path / "missing")


def test_ci_starts_with_the_cpu_line():
    line = subprocess.run([sys.executable, str(REPO / "bimacosr/cpu.py")], capture_output=True, text=True,
                          env={}, check=True).stdout
    assert line.startswith("CPU: ") and line.count("\n") == 1
    ci = (REPO / ".ci/run").read_text().splitlines()
    commands = [c for c in ci if c and not c.startswith(("#", "set ", "cd "))]
    assert commands[0] == "python bimacosr/cpu.py"
    readme = (REPO / "README.md").read_text()
    test_command = readme.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert commands[-1] == test_command


def test_a_held_class_hides_its_flags_from_this_machine_only_and_an_unknown_one_is_refused(monkeypatch, tmp_path):
    """$BIMACOSR_CPU_CLASS (what scripts/as_cpu.py sets): /proc/cpuinfo reads without the class's
    flags, another cpuinfo file as written, the CPU line says so; a name that is no class fails
    with the names that are."""
    monkeypatch.delenv(CLASS_ENV, raising=False)
    real = cpu_flags()
    (tmp_path / "intel").write_text(INTEL_AMX)
    for name, cls in CLASSES.items():
        monkeypatch.setenv(CLASS_ENV, name)
        assert held_class() == name
        held = cpu_flags()
        assert held == [f for f in real if not f.startswith(cls.hidden)]
        assert not any(f.startswith(("amx", "avx512_bf16")) for f in held) and ("avx2" in held) == ("avx2" in real)
        assert "amx_int8" in cpu_flags(tmp_path / "intel")
        assert describe().endswith(f"; held to {name} by {CLASS_ENV} (scripts/as_cpu.py)")
        assert "held" not in describe(tmp_path / "intel")
    monkeypatch.setenv(CLASS_ENV, "avx2")
    assert not any(f.startswith("avx512") for f in cpu_flags())
    monkeypatch.setenv(CLASS_ENV, "")
    assert held_class() is None and cpu_flags() == real
    monkeypatch.setenv(CLASS_ENV, "sse")
    with pytest.raises(ValueError, match="BIMACOSR_CPU_CLASS='sse' is not a CPU class: one of avx2, avx512"):
        cpu_flags()
