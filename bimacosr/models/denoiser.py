"""Build the denoiser from the original ``model.params`` mapping."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from bimacosr.models.swin import SwinTransformerBlock
from bimacosr.models.unet import UNetModelSwin
from bimacosr.quant.convert import QUANT_KEYS, binarize


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
    model = UNetModelSwin(**_plain(unet_kwargs))
    if is_binarized(quant):
        binarize(model, _plain(quant))
        _use_quant_key_order(model)
    return model


def _use_quant_key_order(model: nn.Module) -> None:
    """BiMaCoSR's quant UNet registers a Swin block's ``norm2`` after its ``mlp`` (SinSR before
    it): same keys, but this makes ``state_dict()`` list them in the released files' order."""
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            module._modules["norm2"] = module._modules.pop("norm2")


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
