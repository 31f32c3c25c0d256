"""What this CPU can do, read from the kernel's CPU flags (``/proc/cpuinfo`` on Linux)."""
from __future__ import annotations

import os

__all__ = ["cpu_flags", "native_bf16"]


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str]:
    """The ``flags`` line of ``cpuinfo`` as a list (empty when the file cannot be read)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="ignore") as f:
            return next((line for line in f if line.startswith("flags")), "").split(":", 1)[-1].split()
    except OSError:
        return []


def native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Emulated bf16 is not
    used: on an AVX2-only CPU it measured about 8x slower than fp32 for the autoencoder (README,
    Speed)."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags
