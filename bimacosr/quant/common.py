"""Pieces shared by the binary layers: the layer marker, LearnableBias, RPReLU, and the eval-mode
cache of weights derived from parameters (also used by the autoencoder's phase upsampling)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class QuantLayer:
    """Marker mixin for every binarized layer.

    The conversion pass never descends into a ``QuantLayer`` (its low-rank convs or shortcut
    convs stay as they are), and never converts one twice.
    """


class LearnableBias(nn.Module):
    """Adds a learnable per-channel bias (key ``bias``), zero-initialised.

    ``shape`` is the stored shape: ``(1, C)`` in BiMaCo layers, ``(1, C, 1, 1)`` in ReActNet/BBCU.
    Either broadcasts over a ``[B, C, *spatial]`` input along dim 1.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.reshape(1, -1, *([1] * (x.dim() - 2)))


class RPReLU(nn.Module):
    """``PReLU(x + beta0; a) + beta1`` per channel (keys ``pr_bias0.bias``, ``pr_prelu.weight``,
    ``pr_bias1.bias``); betas zero and slopes 0.25 at init. ``bias_ndim`` is the
    number of dims of the stored betas: 2 -> ``(1, C)``, 4 -> ``(1, C, 1, 1)``."""

    def __init__(self, channels: int, bias_ndim: int = 2):
        super().__init__()
        shape = (1, channels) + (1,) * (bias_ndim - 2)
        self.pr_bias0 = LearnableBias(shape)
        self.pr_prelu = nn.PReLU(channels)
        self.pr_bias1 = LearnableBias(shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.pr_bias1(self.pr_prelu(self.pr_bias0(x)))


def eval_cached(module: nn.Module, name: str, sources: tuple[Tensor, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, computed once and reused while ``module`` is in eval mode with gradients off
    and ``sources`` are unchanged (same storage and version): inference binarizes each weight once,
    not at every call. Training (or any call with gradients) always recomputes, and so does a model
    under ``torch.compile``, which traces ``make`` into its graph (the cache's storage and version
    checks are not traceable: dynamo recompiled per layer and gave up past its recompile limit)."""
    if module.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return make()
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources) + (torch.is_inference_mode_enabled(),)
    cache = module.__dict__.setdefault("_eval_cache", {})
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, make())
    return cache[name][1]
