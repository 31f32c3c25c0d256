"""What this CPU can do, read from the kernel's CPU flags (``/proc/cpuinfo`` on Linux).

Run as a script (``python bimacosr/cpu.py``; standard library only) it prints :func:`describe`,
the line CI starts with so that a result can be tied to the machine that produced it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CLASSES", "CLASS_ENV", "PATH_FLAGS", "CpuClass", "cpu_flags", "describe", "held_class", "native_bf16"]

PATH_FLAGS = ("avx2", "avx512f", "avx512_vpopcntdq", "avx512_bf16", "amx_bf16", "amx_int8")
"""The flags that choose code paths: the 1-bit kernel's popcount (docs/kernel.md), bf16 by default
(:func:`native_bf16`), and the oneDNN kernels whose float32 rounding differs (docs/tolerances.md)."""


@dataclass(frozen=True)
class CpuClass:
    """A lesser CPU class this machine can be held to (``scripts/as_cpu.py``): the environment that
    holds ATen, oneDNN and MKL to its instruction set (read once, when torch loads), the flag that
    builds the 1-bit kernel for it, and the prefixes of the flags it hides from ``/proc/cpuinfo``."""

    env: dict[str, str]
    kernel_flag: str
    hidden: tuple[str, ...]


CLASSES = {
    "avx2": CpuClass({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                     "-mno-avx512f", ("avx512", "amx")),  # AVX2 only, as an AMD Zen 3
    "avx512": CpuClass({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
                       "-mno-avx512bf16", ("avx512_bf16", "amx")),  # AVX-512 without bf16, as an Intel Ice Lake
}
CLASS_ENV = "BIMACOSR_CPU_CLASS"
"""Set to a :data:`CLASSES` name, this process and the ones it starts read ``/proc/cpuinfo`` without
that class's hidden flags and build the kernel for it (``scripts/as_cpu.py`` sets it with the
class's environment; docs/tolerances.md)."""


def held_class() -> str | None:
    """The :data:`CLASSES` name in ``$BIMACOSR_CPU_CLASS``, None when unset or empty."""
    name = os.environ.get(CLASS_ENV) or None
    if name is not None and name not in CLASSES:
        raise ValueError(f"{CLASS_ENV}={name!r} is not a CPU class: one of {', '.join(CLASSES)}, or unset")
    return name


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
    """The ``flags`` line of ``cpuinfo`` as a list (empty when the file cannot be read); this
    machine's without those a :func:`held_class` hides (another file's as written)."""
    flags = _fields(cpuinfo).get("flags", "").split()
    held = held_class()
    if held is None or str(cpuinfo) != "/proc/cpuinfo":
        return flags
    return [f for f in flags if not f.startswith(CLASSES[held].hidden)]


def native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Emulated bf16 is not
    used: on CPUs without it, bf16 convolutions are emulated and several times slower than fp32
    (``scripts/benchmark.py --variants sinsr sinsr_bf16`` shows the ratio on any machine)."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """One line: model name, family / model numbers, and which of :data:`PATH_FLAGS` are present,
    e.g. ``CPU: AMD EPYC (family 25, model 17); avx2 avx512f avx512_vpopcntdq avx512_bf16; without
    amx_bf16 amx_int8``: the machine's own flags, then the class it is held to, if any."""
    fields = _fields(cpuinfo)
    if not fields:
        return f"CPU: unknown ({cpuinfo} not readable)"
    flags = set(fields.get("flags", "").split())
    has = [f for f in PATH_FLAGS if f in flags]
    lacks = [f for f in PATH_FLAGS if f not in flags]
    name = fields.get("model name", "unknown model")
    line = f"CPU: {name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}); "
    line += " ".join(has) or "none of " + " ".join(PATH_FLAGS)
    line += f"; without {' '.join(lacks)}" if has and lacks else ""
    held = held_class() if str(cpuinfo) == "/proc/cpuinfo" else None
    return line + (f"; held to {held} by {CLASS_ENV} (scripts/as_cpu.py)" if held else "")


if __name__ == "__main__":
    print(describe(), flush=True)
