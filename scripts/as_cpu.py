"""Run another script as on a lesser CPU class than this machine's, for the per-class speed rows.

``avx2``: AVX2 only (an AMD Zen 3): ATen, oneDNN and MKL held to AVX2, the 1-bit kernel built
``-mno-avx512f`` (its AVX2 table path), no native bf16, so ``--precision auto`` is ``fp32-fast``.
``avx512``: AVX-512 without bf16 (Intel Ice Lake / Cascade Lake): oneDNN held to AVX512_CORE_VNNI,
the kernel built ``-mno-avx512bf16``, no native bf16. The timings are this machine's cores at that
instruction set, not another CPU's; say so beside every figure (docs/speed.md, *Per CPU class*):
the CPU line the benchmarks print first ends with the class held.
Only this process sees the hidden flags; the instruction-set limits (environment variables) reach
the processes it starts too (docs/tolerances.md).

    python scripts/as_cpu.py avx2 scripts/benchmark.py --variants sinsr deploy realesrgan --sizes 64
    python scripts/as_cpu.py avx2 --module pytest -q -m "not slow"   # the suite as on that class
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

from bimacosr.cli import argument_parser  # imports no torch: the environment below still applies

CLASSES = {
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "-mno-avx512f", ("avx512", "amx")),
    "avx512": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "-mno-avx512bf16", ("avx512_bf16", "amx")),
}


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("cpu_class", choices=CLASSES, help="the CPU class to run as")
    p.add_argument("--module", action="store_true",
                   help="SCRIPT is a module, run as `python -m` runs it (e.g. pytest: the test suite as on that class)")
    p.add_argument("script", help="the script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args()
    env, flag, hidden = CLASSES[args.cpu_class]
    os.environ.update(env)  # before torch is imported: ATen reads its capability once, at load

    from bimacosr import cpu, kernels

    real_flags = cpu.cpu_flags

    def flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str]:
        """This machine's flags without the class's hidden ones (other files, e.g. a test's, as they are)."""
        return [f for f in real_flags(cpuinfo) if str(cpuinfo) != "/proc/cpuinfo" or not f.startswith(hidden)]

    real_describe = cpu.describe

    def describe(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
        """This machine's CPU line, saying which class it is held to (the benchmarks print it first)."""
        line = real_describe(cpuinfo)
        return line + f"; held to {args.cpu_class} by scripts/as_cpu.py" if str(cpuinfo) == "/proc/cpuinfo" else line

    cpu.cpu_flags = kernels.cpu_flags = flags  # the kernel's build tag, bf16 routes and precision auto
    cpu.describe = describe
    kernels.FLAGS.append(flag)
    sys.argv = [args.script, *args.args]
    if args.module:
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args.script, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
        runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
