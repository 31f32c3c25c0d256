"""Compare a deploy model with the simulated model it came from.

The whole-model difference is not a reliable measure on random weights: ``sign`` is
discontinuous, so an activation within ~1e-6 of zero can flip between two correct
implementations that round differently, and the flip propagates (docs/denoiser.md §4.4; the simulated
model run in channels-last memory differs from itself by as much). :func:`layerwise_max_diff`
feeds every deploy layer the exact input its simulated twin received, which is robust; it is what
:func:`check_export` judges (``scripts/export_deploy.py --check``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bimacosr.deploy.layers import _DeployBinary
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear

__all__ = ["LAYER_TOLERANCE", "ExportCheck", "check_export", "layerwise_max_diff", "model_max_diff"]

LAYER_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 1e-2}
"""Allowed max |deploy - simulated| of one binary layer fed its twin's input, by the file's side
branch dtype: float32 reorders float32 sums only (observed ~1e-6; the deploy layers' tests use
1e-4); float16 also rounds the low-rank and sparse values and the biases (observed up to ~1e-3)."""


@torch.no_grad()
def layerwise_max_diff(simulated: nn.Module, deployed: nn.Module, *args: Any,
                       **kwargs: Any) -> dict[str, float]:
    """Run ``simulated(*args, **kwargs)``; for every BiMaCo layer, the max abs difference between
    its output and the same-named deploy layer's output on the same input. ``{name: diff}``."""
    targets = {n: m for n, m in deployed.named_modules() if isinstance(m, _DeployBinary)}
    diffs: dict[str, float] = {}
    handles = []

    def hook(name: str):
        def run(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            twin = targets[name]
            diffs[name] = float((twin(inputs[0]) - output).abs().max())
        return run

    for name, module in simulated.named_modules():
        if isinstance(module, (BiMaCoConv2d, BiMaCoLinear)):
            if name not in targets:
                raise ValueError(f"the deploy model has no binary layer {name!r}")
            handles.append(module.register_forward_hook(hook(name)))
    try:
        simulated(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return diffs


@torch.no_grad()
def model_max_diff(simulated: nn.Module, deployed: nn.Module, *args: Any, **kwargs: Any) -> float:
    """Max abs difference of the two models' outputs on the same inputs."""
    return float((deployed(*args, **kwargs) - simulated(*args, **kwargs)).abs().max())


@dataclass(frozen=True)
class ExportCheck:
    """A deploy file compared with its simulated model on one random input."""

    per_layer: float
    """max over the binary layers of :func:`layerwise_max_diff`: what is judged."""
    whole_model: float
    """:func:`model_max_diff`: reported, not judged (sign flips, see the module docstring)."""
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.per_layer <= self.tolerance

    def line(self) -> str:
        verdict, sign = ("PASS", "<=") if self.passed else ("FAIL", ">")
        return (f"{verdict}: max |deploy - simulated| per binary layer {self.per_layer:.3g} {sign} tolerance "
                f"{self.tolerance:g}; whole model {self.whole_model:.3g} (not judged: on random weights a "
                f"sign flip of a near-zero activation propagates)")


def check_export(simulated: nn.Module, deployed: nn.Module, side_dtype: str, size: int = 64) -> ExportCheck:
    """Judge ``deployed`` (a loaded deploy file with side branches in ``side_dtype``) against the
    ``simulated`` model it was exported from on one random ``size`` x ``size`` latent / LR pair at
    t = 0, with :data:`LAYER_TOLERANCE`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)
    lq = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    t = torch.zeros(1, dtype=torch.long)
    per_layer = max(layerwise_max_diff(simulated, deployed, x, t, lq=lq).values())
    return ExportCheck(per_layer, model_max_diff(simulated, deployed, x, t, lq=lq), LAYER_TOLERANCE[side_dtype])
