"""The fused kernel's rate beside the bound probe's, per layer of one model call (docs/kernel.md §5).

:func:`record_calls` runs a model once and keeps every ``binary_conv`` call (layer name, inputs);
:func:`step_parts` replays them with the side branches switched off one by one, to split the
kernel's time; :func:`kernel_rates` replays each call and times it interleaved with the bound probe
(``torch.ops.bimacosr.xor_popcount``, the plain XOR-popcount GEMM on the same micro-kernel) on
random words of the same shape: rows = output pixels, the layer's K = taps x Cin bits (padded to
whole words as the kernel pads them), columns = output channels in blocks of 16. Both are credited
with the layer's binary MACs, ``pixels x Cout x Cin x taps``, so their rates compare directly.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bimacosr import kernels
from bimacosr.timing import interleaved_medians


@dataclass
class Call:
    """One ``binary_conv`` call: the layer's name and the op's positional arguments
    (:func:`bimacosr.kernels.op_arguments`: ``x, wbits, wmask, cout, ..., k, stride, padding``)."""

    name: str
    args: tuple

    @property
    def shape(self) -> dict[str, int]:
        """``pixels`` (output), ``cin``, ``cout``, ``taps``, ``words`` per tap, ``macs`` (binary)."""
        x, cout, (k, stride, pad) = self.args[0], self.args[3], self.args[-3:]
        b, h, w, cin = x.shape
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        pixels, taps = b * ho * wo, k * k
        return {"pixels": pixels, "cin": cin, "cout": cout, "taps": taps, "words": (cin + 63) // 64,
                "macs": pixels * cout * cin * taps}

    def run(self) -> Tensor:
        return kernels.binary_conv_op(*self.args)


def record_calls(model: nn.Module, run: Callable[[], object]) -> list[Call]:
    """Every fused-kernel call ``run()`` makes through ``model``'s deploy layers, in call order."""
    from bimacosr.deploy.layers import DeployBinaryConv2d, DeployBinaryLinear

    calls: list[Call] = []
    current = [""]
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: current.__setitem__(0, name))
             for name, m in model.named_modules() if isinstance(m, (DeployBinaryConv2d, DeployBinaryLinear))]
    original = kernels.binary_conv_op

    def recording(*args):
        calls.append(Call(current[0], (args[0].clone(), *args[1:])))  # the model may add a residual into x later
        return original(*args)

    kernels.binary_conv_op = recording
    try:
        run()
    finally:
        kernels.binary_conv_op = original
        for h in hooks:
            h.remove()
    return calls


KINDS = ("3x3", "1x1", "1 pixel")
PARTS = ("kernel", "without SMB", "without LRMB", "binary only", "bound")


def kind(shape: dict[str, int]) -> str:
    """A call's layer kind, one of :data:`KINDS`: a 1-pixel call (the time-embedding linears), else
    by its taps."""
    return "1 pixel" if shape["pixels"] == 1 else ("3x3" if shape["taps"] == 9 else "1x1")


def without_side(args: tuple, lowrank: bool, sparse: bool) -> tuple:
    """The op's positional arguments (:func:`bimacosr.kernels.op_arguments`) with the LRMB
    (``lowrank=False``) and/or the SMB (``sparse=False``) replaced by the empty tensors of a layer
    that has none."""
    out, empty = list(args), args[4].new_empty(0)
    if not lowrank:
        out[8], out[9] = empty, empty
    if not sparse:
        out[10], out[11], out[12] = empty.long(), empty.long(), empty
    return tuple(out)


def step_parts(calls: list[Call], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Where the kernel's time goes: every call replayed whole, without its SMB, without its LRMB,
    with neither (the binary part: packing, popcounts, epilogue), and the bound probe at its shape,
    the five in an order rotating each round; per part (:data:`PARTS`) the medians in seconds,
    summed by layer kind (:data:`KINDS`)."""
    gen = torch.Generator().manual_seed(0)
    total = {part: dict.fromkeys(KINDS, 0.0) for part in PARTS}
    for call in calls:
        a, b = _probe_inputs(call.shape, gen)
        jobs = {part: functools.partial(kernels.binary_conv_op, *without_side(call.args, lowrank, sparse))
                for part, (lowrank, sparse) in zip(PARTS, ((1, 1), (1, 0), (0, 1), (0, 0)))}
        jobs["bound"] = functools.partial(torch.ops.bimacosr.xor_popcount, a, b)
        for part, secs in interleaved_medians(jobs, rounds).items():
            total[part][kind(call.shape)] += secs
    return total


def _probe_inputs(shape: dict[str, int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random words for the bound probe at a call's shape: ``a [pixels, taps*words]``, ``b
    [ceil(Cout/16), taps*words, 16]``."""
    k_words, blocks = shape["taps"] * shape["words"], -(-shape["cout"] // kernels.LANES)
    a = torch.randint(-2**63, 2**63 - 1, (shape["pixels"], k_words), generator=gen, dtype=torch.int64)
    b = torch.randint(-2**63, 2**63 - 1, (blocks, k_words, kernels.LANES), generator=gen, dtype=torch.int64)
    return a, b


def kernel_rates(calls: list[Call], reps: int = 5) -> list[dict]:
    """Per call: median wall seconds of the kernel and of the bound probe (interleaved, the order
    alternating), both rates in G binary MAC/s, and ``ratio`` = kernel / bound time."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for call in calls:
        shape = call.shape
        a, b = _probe_inputs(shape, gen)
        secs = interleaved_medians({"kernel": call.run, "bound": functools.partial(torch.ops.bimacosr.xor_popcount, a, b)},
                                   reps)
        rows.append({"layer": call.name, **shape, "kernel_s": secs["kernel"], "bound_s": secs["bound"],
                     "kernel_gmacs": shape["macs"] / secs["kernel"] / 1e9, "bound_gmacs": shape["macs"] / secs["bound"] / 1e9,
                     "ratio": secs["kernel"] / secs["bound"]})
    return rows
