"""What this CPU can do, read from the kernel's CPU flags (``/proc/cpuinfo`` on Linux).

Run as a script (``python bimacosr/cpu.py``; standard library only) it prints :func:`describe`,
the line CI starts with so that a result can be tied to the machine that produced it.
"""
from __future__ import annotations

import os

__all__ = ["PATH_FLAGS", "cpu_flags", "describe", "native_bf16"]

PATH_FLAGS = ("avx2", "avx512f", "avx512_vpopcntdq", "avx512_bf16", "amx_bf16", "amx_int8")
"""The flags that choose code paths: the 1-bit kernel's popcount (docs/kernel.md), bf16 by default
(:func:`native_bf16`), and the oneDNN kernels whose float32 rounding differs (docs/tolerances.md)."""


def _fields(cpuinfo: str | os.PathLike) -> dict[str, str]:
    """``key: value`` of the first processor block of ``cpuinfo`` (empty when unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="ascii", errors="ignore") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str]:
    """The ``flags`` line of ``cpuinfo`` as a list (empty when the file cannot be read)."""
    return _fields(cpuinfo).get("flags", "").split()


def native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Emulated bf16 is not
    used: on CPUs without it, bf16 convolutions are emulated and several times slower than fp32
    (``scripts/benchmark.py --variants sinsr sinsr_bf16`` shows the ratio on any machine)."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """One line: model name, family / model numbers, and which of :data:`PATH_FLAGS` are present,
    e.g. ``CPU: AMD EPYC (family 25, model 17); avx2 avx512f avx512_vpopcntdq avx512_bf16; without
    amx_bf16 amx_int8``."""
    fields = _fields(cpuinfo)
    if not fields:
        return f"CPU: unknown ({cpuinfo} not readable)"
    flags = set(fields.get("flags", "").split())
    has = [f for f in PATH_FLAGS if f in flags]
    lacks = [f for f in PATH_FLAGS if f not in flags]
    name = fields.get("model name", "unknown model")
    line = f"CPU: {name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}); "
    line += " ".join(has) or "none of " + " ".join(PATH_FLAGS)
    return line + (f"; without {' '.join(lacks)}" if has and lacks else "")


if __name__ == "__main__":
    print(describe(), flush=True)
