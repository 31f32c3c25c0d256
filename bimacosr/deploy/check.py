"""Compare a deploy model with the simulated model it came from.

The whole-model difference is not a reliable measure on random weights: ``sign`` is
discontinuous, so an activation within ~1e-6 of zero can flip between two correct
implementations that round differently, and the flip propagates (docs/denoiser.md §4.4; the simulated
model run in channels-last memory differs from itself by as much). :func:`layerwise_max_diff`
feeds every deploy layer the exact input its simulated twin received, which is robust.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bimacosr.deploy.layers import _DeployBinary
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear

__all__ = ["layerwise_max_diff", "model_max_diff"]


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
