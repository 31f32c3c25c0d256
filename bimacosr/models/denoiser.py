"""Build the denoiser from the original ``model.params`` mapping."""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bimacosr.config import to_plain
from bimacosr.models.swin import (
    SwinTransformerBlock,
    relative_position_index,
    shift_window_mask,
)
from bimacosr.models.unet import UNetModelSwin
from bimacosr.quant.convert import QUANT_KEYS, binarize

RECOMPUTED_BUFFERS = ("attn_mask", "relative_position_index")
"""Buffers a loader may leave out: :func:`recompute_buffers` rebuilds them from the structure."""


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(unet_kwargs, quant_kwargs)``; unknown keys raise ``ValueError`` naming them."""
    params = {str(k): v for k, v in dict(params).items()}
    known = set(inspect.signature(UNetModelSwin.__init__).parameters) - {"self"}
    unknown = sorted(set(params) - known - set(QUANT_KEYS))
    if unknown:
        raise ValueError(f"model.params has unknown key(s) {unknown}; the Swin-UNet takes "
                         f"{sorted(known)} and the binarization keys {list(QUANT_KEYS)}")
    quant = {k: params.pop(k) for k in QUANT_KEYS if k in params}
    return params, quant


def is_binarized(params: Mapping[str, Any]) -> bool:
    """Whether ``params`` asks for binary layers."""
    quant = split_params(params)[1]
    return bool(quant.get("conv_quant_modules") or quant.get("binary_linear"))


def build_denoiser(params: Mapping[str, Any]) -> nn.Module:
    """The Swin-UNet for ``params`` (the original's ``model.params``).

    Without the quant keys: the FP network (ResShift teacher / SinSR). With them: the FP network
    converted by :func:`bimacosr.quant.binarize` -- the structure the original has just before it
    loads a BiMaCoSR checkpoint (branch values come from the checkpoint, not from this init).
    """
    unet_kwargs, quant = split_params(params)
    model = UNetModelSwin(**to_plain(unet_kwargs))
    if is_binarized(quant):
        binarize(model, to_plain(quant))
        _use_quant_key_order(model)
    return model


def denoiser_skeleton(params: Mapping[str, Any], *, binarized: bool = True) -> nn.Module:
    """The structure of ``build_denoiser(params)`` on the meta device: no memory, no weight init
    (no SVD / top-k), built in seconds; every tensor must then come from a file (load with
    ``assign=True``). ``binarized=False`` gives the Swin-UNet before the replace pass, in the
    binarized model's key order (the deploy loader swaps its own layers in)."""
    with torch.device("meta"):
        if binarized:
            return build_denoiser(params)
        model = UNetModelSwin(**to_plain(split_params(params)[0]))
    if is_binarized(params):
        _use_quant_key_order(model)
    return model


def recompute_buffers(model: nn.Module) -> None:
    """Replace every meta ``relative_position_index`` / ``attn_mask`` buffer of ``model`` with the
    value its constructor computes (they depend on the window and resolution only)."""
    for module in model.modules():
        for name in RECOMPUTED_BUFFERS:
            value = module._buffers.get(name)
            if value is not None and value.is_meta:
                module._buffers[name] = _recomputed(module, name, value.shape)


def _recomputed(module: nn.Module, name: str, shape: torch.Size) -> Tensor:
    if name == "relative_position_index":
        return relative_position_index(math.isqrt(module.relative_position_bias_table.shape[0]) // 2 + 1)
    if not isinstance(module, SwinTransformerBlock):
        raise ValueError(f"unexpected buffer {name!r} in a {type(module).__name__}")
    resolution = module.window * math.isqrt(shape[0])
    return shift_window_mask(resolution, resolution, module.window, module.shift)


def _use_quant_key_order(model: nn.Module) -> None:
    """BiMaCoSR's quant UNet registers a Swin block's ``norm2`` after its ``mlp`` (SinSR before
    it): same keys, but this makes ``state_dict()`` list them in the released files' order."""
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            module._modules["norm2"] = module._modules.pop("norm2")

