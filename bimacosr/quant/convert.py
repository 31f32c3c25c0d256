"""The replace pass: swap a model's conv/linear layers for binary layers by their official names.

``binarize(model, params)`` follows the original ``replace_conv_and_linear`` (docs/denoiser.md §4.1,
docs/baselines.md §1.2): convs first, then (with ``binary_linear``) linears, each walk in registration
order; a layer stays full precision when a ``which_fp_conv`` / ``which_fp_linear`` entry matches
it (a keyword is a substring of its name and it has at most ``param_threshold`` million trainable
parameters). Layers created by the pass are never visited. Unlike the original, an unknown layer
name is an error (the original silently left the model full precision), no layer is moved to CUDA,
and a ``which_fp_conv`` entry without ``use_for_fp`` keeps the layer FP instead of crashing.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from bimacosr.quant.baselines import BASELINE_LAYERS
from bimacosr.quant.bimaco import BiMaCoConv2d, BiMaCoLinear
from bimacosr.quant.common import QuantLayer

LAYERS: dict[str, Callable[..., nn.Module]] = {
    "BinaryConv2d_ours_with_skip_and_lora": BiMaCoConv2d.from_float,
    "BinaryLinear_ours_with_skip_and_lora": BiMaCoLinear.from_float,
    **BASELINE_LAYERS,
}
"""Official config name -> constructor ``(fp_layer, **layer_config) -> binary layer``."""

QUANT_KEYS = ("binary_linear", "conv_quant_modules", "linear_quant_modules", "conv_quant_config",
              "linear_quant_config", "which_fp_conv", "which_fp_linear")
"""The ``model.params`` keys that ask for a binarized denoiser."""

KEEP_FP = "nn.Conv2d"

RELEASED_FP_CONVS = [{"skip_keywords": ["input_blocks.0.0", "out.2"], "param_threshold": 0.2,
                      "use_for_fp": KEEP_FP}]
"""The released ``which_fp_conv``: the first and the last conv stay full precision."""


def convert_layer(name: str, fp_layer: nn.Module, **layer_config: Any) -> nn.Module:
    """Build the binary layer ``name`` (e.g. ``'BinaryConv2d_ours_with_skip_and_lora'``) from an
    FP ``nn.Conv2d`` / ``nn.Linear``; ``layer_config`` is the config's ``*_quant_config``."""
    if name not in LAYERS:
        raise ValueError(f"unknown binary layer {name!r}; known names: {', '.join(sorted(LAYERS))}")
    wants_conv = name.startswith("BinaryConv2d")
    if not isinstance(fp_layer, nn.Conv2d if wants_conv else nn.Linear):
        raise TypeError(f"{name} replaces {'nn.Conv2d' if wants_conv else 'nn.Linear'} layers, "
                        f"got {type(fp_layer).__name__}")
    return LAYERS[name](fp_layer, **layer_config)


def binarize(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """Replace, in place, the layers of ``model`` as ``params`` (the quant keys of
    ``model.params``) asks; binary layers are initialised from the current FP weights. Returns
    ``model``."""
    params = dict(params)
    conv_name = params.get("conv_quant_modules")
    linear_name = params.get("linear_quant_modules")
    for key, value in (("conv_quant_modules", conv_name), ("linear_quant_modules", linear_name)):
        if value is not None and value not in LAYERS:
            raise ValueError(f"model.params.{key}: unknown binary layer {value!r}; known names: "
                             f"{', '.join(sorted(LAYERS))}")
    if conv_name is not None:
        _replace(model, nn.Conv2d, conv_name, dict(params.get("conv_quant_config") or {}),
                 params.get("which_fp_conv", RELEASED_FP_CONVS) or [])
    if params.get("binary_linear", False):
        if linear_name is None:
            raise ValueError("model.params.binary_linear is true but linear_quant_modules is not set")
        _replace(model, nn.Linear, linear_name, dict(params.get("linear_quant_config") or {}),
                 params.get("which_fp_linear") or [])
    return model


def _replace(model: nn.Module, kind: type[nn.Module], name: str, config: dict,
             fp_rules: list) -> None:
    targets = []
    for module_name, module in _walk(model):
        if isinstance(module, kind):
            targets.append((module_name, module))
    for module_name, module in targets:
        replacement = _fp_rule(module_name, module, fp_rules, kind)
        if replacement == KEEP_FP:
            continue
        new = convert_layer(replacement or name, module, **({} if replacement else config))
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def _walk(module: nn.Module, prefix: str = ""):
    """``named_modules`` order, not descending into (or yielding) existing binary layers."""
    for child_name, child in module.named_children():
        full = f"{prefix}{child_name}"
        if isinstance(child, QuantLayer):
            continue
        yield full, child
        yield from _walk(child, full + ".")


def _fp_rule(module_name: str, module: nn.Module, rules: list, kind: type[nn.Module]) -> str | None:
    """``KEEP_FP``, another layer name to use instead, or ``None`` (use the configured layer)."""
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for rule in rules:
        keywords = rule.get("skip_keywords", [])
        threshold = float(rule.get("param_threshold", 0.0)) * 1e6
        if any(k in module_name for k in keywords) and n_params <= threshold:
            use = rule.get("use_for_fp", KEEP_FP) if kind is nn.Conv2d else KEEP_FP
            if use != KEEP_FP and use not in LAYERS:
                raise ValueError(f"which_fp_conv use_for_fp: unknown layer {use!r}; use {KEEP_FP!r} "
                                 f"or one of {', '.join(sorted(LAYERS))}")
            return use
    return None
