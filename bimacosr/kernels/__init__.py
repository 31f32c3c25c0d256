"""The C++ CPU kernels (docs/kernel.md) and their loader: the fused 1-bit op of the deploy layers
(``binary.cpp``), the bf16 window attention of the Swin blocks (``attention.cpp``, §6) and the bf16
GroupNorm (+ SiLU) of both models' channels-last maps (``norm.cpp``, §7).

One extension: the layer op (``binary.cpp``) and the bound probe (``bound.cpp``, the plain
XOR-popcount GEMM that ``deploy/rates.py`` times beside it) share the popcount micro-kernel
(``popcount.h``) and vector helpers (``vec.h``, also the attention's bf16 pairs); the layer op's
side branches are in ``side.h``.
The C++ sources are compiled on first use with ``torch.utils.cpp_extension.load`` (``-O3
-march=native``; g++ and ninja needed) into ``$BIMACOSR_KERNEL_DIR`` or
``~/.cache/bimacosr/kernels/<tag>``, where the tag hashes the source, the torch version and this
CPU's flags, so a build is reused by later processes and never run on a CPU it was not built for.
Each build records the size and sha256 of the library it produced beside it (``<library>.json``);
a later process loads a library only when it matches that record, directly (no lock: a read-only
cache works), and otherwise builds afresh in the next folder ``<tag>_1``, ``<tag>_2``, ... (a
truncated library crashed every process with a bus error). When the build fails (no compiler, no
ninja, a compile error) or ``BIMACOSR_KERNEL=off``, the deploy layers run the stock PyTorch path
(``torch._int_mm`` per tap, layers.py) instead, and the models PyTorch's attention and GroupNorm. Either way
one line on stderr, printed once per process, says which paths run.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bimacosr.atomic import atomic_write_text, file_digest
from bimacosr.cpu import CLASSES, cpu_flags, held_class

__all__ = ["ATTENTION_ENV", "ENV", "LANES", "NORM_ENV", "available", "binary_conv", "binary_conv_op", "build_dir",
           "group_norm", "group_norm_applies", "op_arguments", "pack_lowrank", "pack_sparse", "pack_weight_bits",
           "require", "status", "window_attention", "window_attention_applies"]

ENV = "BIMACOSR_KERNEL"
"""``off``: never build or use the kernels; ``auto`` (default): build them on first use."""
ATTENTION_ENV = "BIMACOSR_ATTENTION"
"""``torch``: the Swin blocks keep PyTorch's attention (to compare, or on a CPU where it is faster);
``auto`` (default): the C++ window attention where :func:`window_attention_applies`."""
NORM_ENV = "BIMACOSR_NORM"
"""``torch``: the models keep ATen's GroupNorm and SiLU (to compare); ``auto`` (default): the C++
GroupNorm (+ SiLU) where :func:`group_norm_applies`."""
SOURCES = [Path(__file__).with_name(name) for name in ("binary.cpp", "bound.cpp", "attention.cpp", "norm.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("popcount.h", "side.h", "vec.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-Wno-psabi"]  # -fopenmp: at::parallel_for is OpenMP in the headers
if (_held := held_class()):  # built for the lesser class this machine is held to (scripts/as_cpu.py)
    FLAGS.append(CLASSES[_held].kernel_flag)

_state: dict[str, object] = {}  # "ok": bool, "reason": str (why not), "folder", "passed_over", "line": the notice


def build_dir() -> Path:
    """Where the extension is (or will be) built; one folder per source/torch/CPU combination."""
    text = (b"".join(f.read_bytes() for f in SOURCES + HEADERS) + torch.__version__.encode()
            + " ".join(cpu_flags()).encode() + " ".join(FLAGS).encode())
    tag = hashlib.sha256(text).hexdigest()[:12]
    root = os.environ.get("BIMACOSR_KERNEL_DIR") or Path.home() / ".cache" / "bimacosr" / "kernels"
    return Path(root) / tag


def _library(folder: Path) -> Path:
    """The library a build in ``folder`` produces (``cpp_extension`` names it after the extension)."""
    return folder / f"bimacosr_binary_{folder.name}.so"


def _record(library: Path) -> Path:
    """The record of what the build produced, beside the library."""
    return library.with_name(library.name + ".json")


def _fingerprint(library: Path) -> dict[str, object]:
    """What a build records of its library: size in bytes and sha256."""
    return dict(zip(("size", "sha256"), file_digest(library)))


def _inspect(folder: Path) -> tuple[bool, str | None]:
    """``(recorded, damage)`` of the build in ``folder``: whether it has a record, and why it must
    not be loaded: its library is not what the build recorded (truncated, overwritten, gone). The
    damage is None when the library matches, or when there is no record yet (never built, or built
    before records were kept: cpp_extension's up-to-date check decides)."""
    library = _library(folder)
    try:
        recorded = json.loads(_record(library).read_text())
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError) as err:
        return True, f"{_record(library)}: {err}"
    try:
        found = _fingerprint(library)
    except OSError as err:
        return True, f"{library}: {err}"
    if found == recorded:
        return True, None
    what = "size" if found["size"] != recorded.get("size") else "sha256"
    return True, f"{library} has {what} {found[what]}, its build recorded {recorded.get(what)}"


def _compile(folder: Path) -> None:
    """Compile (or let ninja reuse) the extension in ``folder``, load it, and record the library."""
    quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on import
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)
    folder.mkdir(parents=True, exist_ok=True)
    load(name=f"bimacosr_binary_{folder.name}", sources=[str(f) for f in SOURCES], extra_cflags=FLAGS,
         extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
         verbose=False)
    library = _library(folder)
    atomic_write_text(_record(library), json.dumps(_fingerprint(library)) + "\n")


def _folders(first: Path) -> Iterator[Path]:
    """Build folders in the order they are tried: ``first``, then ``<first>_1``, ``<first>_2``, ..."""
    yield first
    for n in itertools.count(1):
        yield first.with_name(f"{first.name}_{n}")


def _build() -> tuple[Path, str]:
    """Load the library of the first folder of :func:`_folders` whose build is not damaged
    (:func:`_inspect`): as it is when it matches its record (no lock, nothing written: a read-only
    cache works), else through :func:`_compile`; a damaged one is passed over, never loaded.
    Registers ``torch.ops.bimacosr.binary_conv``; returns the folder and why earlier builds were
    passed over."""
    folders, passed_over = _folders(build_dir()), []
    folder = next(folders)
    recorded, damage = _inspect(folder)
    while damage is not None:
        passed_over.append(damage)
        folder = next(folders)
        recorded, damage = _inspect(folder)
    if recorded:  # and the library matches the record
        torch.ops.load_library(str(_library(folder)))
    else:
        _compile(folder)
    return folder, "; ".join(passed_over)


def _load() -> None:
    if _state:
        return
    took = 0.0
    if os.environ.get(ENV, "auto").lower() == "off":
        _state.update(ok=False, reason=f"{ENV}=off")
    else:
        start = time.perf_counter()
        try:
            folder, passed_over = _build()
            _state.update(ok=True, reason="", folder=folder, passed_over=passed_over)
        except Exception as err:  # noqa: BLE001 -- any build failure means: use the stock path
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _state.update(ok=False, reason=f"{type(err).__name__}: {first[:200]}")
        took = time.perf_counter() - start
    if _state["ok"]:
        rebuilt = f"; not loaded: {_state['passed_over']}" if _state["passed_over"] else ""
        pairs = torch.ops.bimacosr.side_pairs()
        sides = f"bf16 side branches in bf16 pairs ({pairs})" if pairs else "side branches in float32"
        attention = (f"bf16 window attention in the kernel ({pairs})" if pairs == NATIVE_PAIRS else
                     "window attention: PyTorch's")
        line = (f"bimacosr: deploy layers run the fused 1-bit CPU kernel ({torch.ops.bimacosr.path()}; {sides}; "
                f"{attention}; ready in {took:.1f} s, built in {_state['folder']}{rebuilt})")
    else:
        line = (f"bimacosr: fused 1-bit kernel unavailable ({_state['reason']}); deploy layers run "
                f"the stock PyTorch int8 path, window attention and GroupNorm PyTorch's")
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


NATIVE_PAIRS = "AVX512-BF16"
"""``side_pairs()`` where bf16 pairs are multiplied by the CPU's own instruction (vdpbf16ps)."""


@functools.cache
def _has_bf16_pairs() -> bool:
    """Whether this CPU multiplies bf16 pairs itself (AVX512-BF16), read once."""
    return "avx512_bf16" in cpu_flags()


def window_attention_applies(qkv: Tensor, bias: Tensor, heads: int) -> bool:
    """Whether :func:`window_attention` runs this call: bf16 on CPU with the CPU's own bf16 pairs
    (elsewhere PyTorch's attention is as good), a window and head size the build has, no gradient
    wanted (the kernel has no backward), and not ``BIMACOSR_ATTENTION=torch``. Builds the kernel
    on the first call."""
    if qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        return False
    if not _has_bf16_pairs() or os.environ.get(ATTENTION_ENV, "auto").lower() == "torch":
        return False  # (no build for nothing)
    if torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad):
        return False
    return available() and f"{qkv.shape[1]}x{qkv.shape[2] // 3 // heads}" in _attention_shapes()


@functools.cache
def _attention_shapes() -> frozenset[str]:
    """The ``NxD`` window and head sizes the loaded build's attention has, where its bf16 pairs are
    the CPU's own instruction (none otherwise); read once, after :func:`available`."""
    if torch.ops.bimacosr.side_pairs() != NATIVE_PAIRS:
        return frozenset()
    return frozenset(torch.ops.bimacosr.window_attention_shapes().split(","))


def window_attention(qkv: Tensor, bias: Tensor, mask: Tensor | None, heads: int, scale: float) -> Tensor:
    """``qkv [B', N, 3*C]`` bf16 (q, k, v of ``heads`` heads side by side), ``bias [heads, N, N]``
    and ``mask [T, N, N]`` (or None) -> ``softmax(q k^T * scale + (bias + mask[b % T])) v`` per
    window ``b`` and head, ``[B', N, C]`` bf16, heads side by side (attention.cpp, docs/kernel.md
    §6); bias and mask in float32. Raises ``RuntimeError`` where the kernels cannot build
    (:func:`window_attention_applies` says when to call it)."""
    if not available():
        raise RuntimeError(f"the C++ window attention needs the compiled kernels: {_state['reason']}")
    empty = bias.new_empty(0, dtype=torch.float32)
    return torch.ops.bimacosr.window_attention(qkv.contiguous(), bias.float().contiguous(),
                                               empty if mask is None else mask.float().contiguous(), heads, scale)


def group_norm_applies(x: Tensor, *affine: Tensor) -> bool:
    """Whether :func:`group_norm` runs for ``x``: a 4-d channels-last bf16 CPU map, no gradient wanted
    of it or of the ``affine`` tensors (the kernel has no backward), and not ``BIMACOSR_NORM=torch``.
    Builds the kernels on the first call."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 4:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or os.environ.get(NORM_ENV, "auto").lower() == "torch":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *affine)):
        return False
    return available()


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, silu: bool = False) -> Tensor:
    """GroupNorm of a channels-last bf16 map ``x [N, C, H, W]`` with the affine ``weight``, ``bias``
    (``[C]``, or ``[N, C]`` per image), then SiLU if ``silu``: bf16 in ``x``'s layout, each
    operation rounded to bf16 as ATen's GroupNorm and SiLU on bf16 round it (norm.cpp,
    docs/kernel.md §7). Raises ``RuntimeError`` where the kernels cannot build."""
    if not available():
        raise RuntimeError(f"the C++ GroupNorm needs the compiled kernels: {_state['reason']}")
    n, c = x.shape[:2]
    weight, bias = (t.float().expand(n, c).contiguous() for t in (weight, bias))
    return torch.ops.bimacosr.group_norm(x, groups, weight, bias, eps, silu)


LANES = 16
"""Output channels per weight block of the kernel."""
LANE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
"""The output (within its block) of each lane: the AVX2 path's 64-bit counts of lanes 0-3 and
4-7 interleave into 32-bit lanes in natural order (binary.cpp)."""


def pack_weight_bits(taps: Tensor) -> tuple[Tensor, Tensor]:
    """int8 signs ``taps [T, Cin, Cout]`` -> ``(bits, mask)``, int64 ``[T, ceil(Cout/16),
    ceil(Cin/64), 16]``: blocks of 16 output channels (lanes in :data:`LANE_ORDER`), the lanes of
    one input word adjacent.

    Bit ``c % 64`` of word ``c // 64`` is 1 where the sign of input channel ``c`` is +1 (bits) /
    nonzero (mask); pad bits and pad output channels are 0. ``mask`` is empty when no sign is 0
    (the usual case).
    """
    t, cin, cout = taps.shape
    words, blocks = (cin + 63) // 64, (cout + LANES - 1) // LANES
    signs = torch.zeros(t, blocks * LANES, words * 64, dtype=torch.int8, device=taps.device)
    signs[:, :cout, :cin] = taps.permute(0, 2, 1)
    powers = torch.ones(64, dtype=torch.int64, device=taps.device) << torch.arange(64, device=taps.device)
    order = torch.tensor(LANE_ORDER, device=taps.device)

    def pack(flags: Tensor) -> Tensor:  # distinct powers of two: the sum is the OR (wraps at bit 63)
        words_of = (flags.view(t, blocks, LANES, words, 64).long() * powers).sum(-1)  # [T, OB, 16, Wd]
        return words_of[:, :, order].transpose(2, 3).contiguous()

    mask = pack(signs != 0) if bool((taps == 0).any()) else torch.empty(0, dtype=torch.int64)
    return pack(signs > 0), mask


def pack_lowrank(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """LRMB factors ``first [r, Cin]``, ``second [Cout, r]`` -> the kernel's ``(first_t [Cin, r8],
    second_t [r8, ceil(Cout/16)*16])``, ``r8`` = ``r`` rounded up to a multiple of 8, the padding
    zeros; float32 contiguous."""
    (rank, cin), cout = first.shape, second.shape[0]
    rank8, lanes = (rank + 7) // 8 * 8, (cout + LANES - 1) // LANES * LANES
    first_t = first.new_zeros(cin, rank8, dtype=torch.float32)
    first_t[:, :rank] = first.t()
    second_t = second.new_zeros(rank8, lanes, dtype=torch.float32)
    second_t[:rank, :cout] = second.t()
    return first_t, second_t


def pack_sparse(indices: Tensor, values: Tensor, cout: int) -> tuple[Tensor, Tensor, Tensor]:
    """SMB ``indices [2, n]`` (output, input; int64) and ``values [n]`` -> CSR by output channel:
    ``(rowptr [ceil(Cout/16)*16+1], cols [u], vals [u])`` (int64, int64, float32), output ``o``'s
    nonzeros at ``rowptr[o]:rowptr[o+1]`` in increasing column; duplicate positions add up."""
    rows, cols = indices
    lanes, width = (cout + LANES - 1) // LANES * LANES, int(cols.max()) + 1 if cols.numel() else 1
    keys, inverse = torch.unique(rows * width + cols, return_inverse=True)  # by output, then column
    vals = values.new_zeros(keys.numel(), dtype=torch.float32)
    vals.index_put_((inverse,), values.float(), accumulate=True)
    rowptr = torch.zeros(lanes + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(keys // width, minlength=lanes).cumsum(0)
    return rowptr, (keys % width).contiguous(), vals


def binary_conv(x: Tensor, bits: Tensor, mask: Tensor, cout: int, alpha: Tensor, shift: Tensor,
                slope: Tensor | None, beta1: Tensor | None, kernel: int, stride: int, padding: int,
                lowrank: tuple[Tensor, Tensor] | None = None,
                sparse: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``x [B, H, W, Cin]`` float32 NHWC -> ``[B, Ho, Wo, Cout]``: the binary branch with its
    epilogue, ``alpha * sum_t s_t * dot_t + shift``, then RPReLU (``slope``, ``beta1``) if given,
    then the side branches on the same pixel if given (``lowrank`` from :func:`pack_lowrank`,
    ``sparse`` from :func:`pack_sparse`; only where ``Ho, Wo == H, W``)."""
    return binary_conv_op(*op_arguments(x, bits, mask, cout, alpha, shift, slope, beta1, kernel, stride, padding,
                                        lowrank, sparse))


def binary_conv_op(*args: object) -> Tensor:
    """``torch.ops.bimacosr.binary_conv`` on its positional arguments (:func:`op_arguments`): every
    call of the deploy layers comes through here (``deploy/rates.py`` records them here)."""
    return torch.ops.bimacosr.binary_conv(*args)


def op_arguments(x: Tensor | None, bits: Tensor, mask: Tensor, cout: int, alpha: Tensor, shift: Tensor,
                 slope: Tensor | None, beta1: Tensor | None, kernel: int, stride: int, padding: int,
                 lowrank: tuple[Tensor, Tensor] | None = None,
                 sparse: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple:
    """:func:`binary_conv`'s arguments in the op's positional form (empty tensors for what a layer
    lacks), for :func:`binary_conv_op` or another build of the op (scripts/kernel_ab.py); a deploy
    layer keeps those after ``x`` (``x=None``) as its plan."""
    empty = alpha.new_empty(0)
    first_t, second_t = lowrank if lowrank is not None else (empty, empty)
    rowptr, cols, vals = sparse if sparse is not None else (empty.long(), empty.long(), empty)
    return (x, bits, mask, cout, alpha, shift, empty if slope is None else slope, empty if beta1 is None else beta1,
            first_t, second_t, rowptr, cols, vals, kernel, stride, padding)
