"""The fused 1-bit CPU kernel of the deploy layers (``binary.cpp``, docs/kernel.md) and its loader.

The C++ source is compiled on first use with ``torch.utils.cpp_extension.load`` (``-O3
-march=native``; g++ and ninja needed) into ``$BIMACOSR_KERNEL_DIR`` or
``~/.cache/bimacosr/kernels/<tag>``, where the tag hashes the source, the torch version and this
CPU's flags, so a build is reused by later processes and never run on a CPU it was not built for.
When the build fails (no compiler, no ninja, a compile error) or ``BIMACOSR_KERNEL=off``, the deploy
layers run the stock PyTorch path (``torch._int_mm`` per tap, layers.py) instead. Either way one
line on stderr, printed once per process, says which path runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from bimacosr.cpu import cpu_flags

__all__ = ["ENV", "available", "binary_conv", "build_dir", "pack_weight_bits", "require", "side_add", "status"]

ENV = "BIMACOSR_KERNEL"
"""``off``: never build or use the fused kernel; ``auto`` (default): build it on first use."""
SOURCE = Path(__file__).with_name("binary.cpp")
FLAGS = ["-O3", "-march=native"]

_state: dict[str, object] = {}  # "ok": bool, "reason": str (why not), "line": the notice


def build_dir() -> Path:
    """Where the extension is (or will be) built; one folder per source/torch/CPU combination."""
    text = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(cpu_flags()).encode() + " ".join(FLAGS).encode()
    tag = hashlib.sha256(text).hexdigest()[:12]
    root = os.environ.get("BIMACOSR_KERNEL_DIR") or Path.home() / ".cache" / "bimacosr" / "kernels"
    return Path(root) / tag


def _build() -> None:
    """Compile (or reuse) and load the extension: registers ``torch.ops.bimacosr.binary_conv``."""
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on import
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    load(name=f"bimacosr_binary_{folder.name}", sources=[str(SOURCE)], extra_cflags=FLAGS,
         build_directory=str(folder), is_python_module=False, verbose=False)


def _load() -> None:
    if _state:
        return
    took = 0.0
    if os.environ.get(ENV, "auto").lower() == "off":
        _state.update(ok=False, reason=f"{ENV}=off")
    else:
        start = time.perf_counter()
        try:
            _build()
            _state.update(ok=True, reason="")
        except Exception as err:  # noqa: BLE001 -- any build failure means: use the stock path
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _state.update(ok=False, reason=f"{type(err).__name__}: {first[:200]}")
        took = time.perf_counter() - start
    if _state["ok"]:
        line = (f"bimacosr: deploy layers run the fused 1-bit CPU kernel (ready in {took:.1f} s, "
                f"built in {build_dir()})")
    else:
        line = (f"bimacosr: fused 1-bit kernel unavailable ({_state['reason']}); deploy layers run "
                f"the stock PyTorch int8 path")
    _state["line"] = line
    print(line, file=sys.stderr, flush=True)


def available() -> bool:
    """Whether the fused kernel can run here (builds it on the first call)."""
    _load()
    return bool(_state["ok"])


def status() -> str:
    """The notice line: which path the deploy layers run, and why."""
    _load()
    return str(_state["line"])


def require() -> None:
    """Raise ``RuntimeError`` (with the reason) when the fused kernel cannot run."""
    if not available():
        raise RuntimeError(f"deploy mode 'fused' needs the compiled kernel: {_state['reason']}")


def pack_weight_bits(taps: Tensor) -> tuple[Tensor, Tensor]:
    """int8 signs ``taps [T, Cin, Cout]`` -> ``(bits, mask)``, int64 ``[T, Cout, ceil(Cin/64)]``.

    Bit ``c % 64`` of word ``c // 64`` is 1 where the sign of input channel ``c`` is +1 (bits) /
    nonzero (mask); pad bits are 0. ``mask`` is empty when no sign is 0 (the usual case).
    """
    t, cin, cout = taps.shape
    words = (cin + 63) // 64
    signs = torch.zeros(t, cout, words * 64, dtype=torch.int8, device=taps.device)
    signs[:, :, :cin] = taps.permute(0, 2, 1)
    powers = torch.ones(64, dtype=torch.int64, device=taps.device) << torch.arange(64, device=taps.device)

    def pack(flags: Tensor) -> Tensor:  # distinct powers of two: the sum is the OR (wraps at bit 63)
        return (flags.view(t, cout, words, 64).long() * powers).sum(-1).contiguous()

    mask = pack(signs != 0) if bool((taps == 0).any()) else torch.empty(0, dtype=torch.int64)
    return pack(signs > 0), mask


def binary_conv(x: Tensor, bits: Tensor, mask: Tensor, alpha: Tensor, shift: Tensor,
                slope: Tensor | None, beta1: Tensor | None, kernel: int, stride: int,
                padding: int) -> Tensor:
    """``x [B, H, W, Cin]`` float32 NHWC -> ``[B, Ho, Wo, Cout]``: the binary branch with its
    epilogue, ``alpha * sum_t s_t * dot_t + shift``, then RPReLU (``slope``, ``beta1``) if given."""
    empty = alpha.new_empty(0)
    return torch.ops.bimacosr.binary_conv(x, bits, mask, alpha, shift,
                                          empty if slope is None else slope,
                                          empty if beta1 is None else beta1,
                                          kernel, stride, padding)


def side_add(y: Tensor, x: Tensor, lora: tuple[Tensor, Tensor] | None,
             smb: tuple[Tensor, Tensor] | None) -> Tensor:
    """``y [M, Cout] += x [M, Cin] @ (S + second @ first)^T`` in place; ``lora`` = ``(first_t
    [Cin, r], second_t [r, Cout])``, ``smb`` = ``(indices [2, n]`` (output, input), ``values
    [n])``, duplicates adding up; float32, contiguous. Returns ``y``."""
    empty = x.new_empty(0)
    first_t, second_t = lora if lora is not None else (empty, empty)
    indices, values = smb if smb is not None else (empty.long().view(2, 0), empty)
    torch.ops.bimacosr.side_add(y, x, first_t, second_t, indices[0], indices[1], values)
    return y
