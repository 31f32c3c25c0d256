"""Run another script as on a lesser CPU class than this machine's, for the per-class speed rows.

``avx2``: AVX2 only (an AMD Zen 3): ATen, oneDNN and MKL held to AVX2, the 1-bit kernel built
``-mno-avx512f`` (its AVX2 table path), no native bf16, so ``--precision auto`` is ``fp32-fast``.
``avx512``: AVX-512 without bf16 (Intel Ice Lake / Cascade Lake): oneDNN held to AVX512_CORE_VNNI,
the kernel built ``-mno-avx512bf16``, no native bf16. The timings are this machine's cores at that
instruction set, not another CPU's; say so beside every figure (docs/speed.md, *Per CPU class*):
the CPU line the benchmarks print first ends with the class held. It is all environment
(``bimacosr.cpu.CLASSES``, ``$BIMACOSR_CPU_CLASS``), so the processes the script starts (torchrun's
workers, a test's subprocess, ``benchmark.py --memory``'s) run as that class too (docs/tolerances.md).

    python scripts/as_cpu.py avx2 scripts/benchmark.py --variants sinsr deploy realesrgan --sizes 64
    python scripts/as_cpu.py avx2 --module pytest -q -m "not slow"   # the suite as on that class
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

from bimacosr.cli import argument_parser  # imports no torch: the environment below still applies
from bimacosr.cpu import CLASS_ENV, CLASSES


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("cpu_class", choices=CLASSES, help="the CPU class to run as")
    p.add_argument("--module", action="store_true",
                   help="SCRIPT is a module, run as `python -m` runs it (e.g. pytest: the test suite as on that class)")
    p.add_argument("script", help="the script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args()
    # before torch is imported: ATen reads its capability once, at load
    os.environ.update({**CLASSES[args.cpu_class].env, CLASS_ENV: args.cpu_class})
    sys.argv = [args.script, *args.args]
    if args.module:
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args.script, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
        runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
