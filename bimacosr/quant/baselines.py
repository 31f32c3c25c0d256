"""Table 1 baseline 1-bit layers: XNOR, HORQ, ReActNet, BBCU, ReSTE and BiDM (docs/baselines.md).

Each class reproduces the official layer's maths, quirks and state_dict keys. Layers are built from a
full-precision ``nn.Conv2d`` / ``nn.Linear`` with ``from_float`` exactly like the official replace
pass: same ``(Cin, Cout, k, stride, padding, bias)``, the FP ``weight``/``bias`` Parameter objects
are shared (not copied), extra parameters start at their documented init values. Baselines take no
quant config: any keyword raises ``ValueError`` (the official code raises ``TypeError``).

``BASELINE_LAYERS`` maps the official config names (``conv_quant_modules`` /
``linear_quant_modules``) to the ``from_float`` constructors. As in the original, the BiDM linear
name builds the ReActNet linear.

None of these layers has buffers, BatchNorm or dropout: train and eval compute the same thing.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr.quant.binarize import (binarize_activation, binarize_weight, sign_bireal, sign_clip,
                                     sign_reste)
from bimacosr.quant.common import LearnableBias, QuantLayer, RPReLU

# ReSTE hyper-parameters fixed by the official layer (weights and activations alike, never annealed).
RESTE_T = 1.5
RESTE_O = 1.0
RESTE_INTERVAL = 0.1

_Layer = TypeVar("_Layer", bound="_BaselineConv2d | _BaselineLinear")


def _reject_config(layer_name: str, config: dict) -> None:
    if config:
        raise ValueError(
            f"{layer_name} is a baseline layer and takes no quant config, got {sorted(config)}; "
            "set conv_quant_config/linear_quant_config to {}")


class _BaselineConv2d(QuantLayer, nn.Conv2d):
    """Square conv with dilation 1, groups 1 and zero padding, as built by the replace pass."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias)

    @classmethod
    def _build(cls: type[_Layer], fp_layer: nn.Conv2d, **kwargs) -> _Layer:
        layer = cls(fp_layer.in_channels, fp_layer.out_channels, fp_layer.kernel_size[0],
                    stride=fp_layer.stride[0], padding=fp_layer.padding[0],
                    bias=fp_layer.bias is not None, **kwargs)
        return _share_parameters(layer, fp_layer)

    @classmethod
    def from_float(cls: type[_Layer], fp_layer: nn.Conv2d, **config) -> _Layer:
        """Replace ``fp_layer`` like the official pass (shared weight/bias; no config allowed)."""
        _reject_config(cls.__name__, config)
        return cls._build(fp_layer)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _BaselineLinear(QuantLayer, nn.Linear):
    @classmethod
    def _build(cls: type[_Layer], fp_layer: nn.Linear, **kwargs) -> _Layer:
        layer = cls(fp_layer.in_features, fp_layer.out_features, bias=fp_layer.bias is not None,
                    **kwargs)
        return _share_parameters(layer, fp_layer)

    @classmethod
    def from_float(cls: type[_Layer], fp_layer: nn.Linear, **config) -> _Layer:
        """Replace ``fp_layer`` like the official pass (shared weight/bias; no config allowed)."""
        _reject_config(cls.__name__, config)
        return cls._build(fp_layer)


def _share_parameters(layer: _Layer, fp_layer: nn.Conv2d | nn.Linear) -> _Layer:
    """Move the new layer's extra parameters next to the FP weight, then adopt the FP weight and
    bias Parameter objects themselves (the official pass assigns them; nothing is copied)."""
    layer.to(device=fp_layer.weight.device, dtype=fp_layer.weight.dtype)
    layer.weight = fp_layer.weight
    layer.bias = fp_layer.bias
    return layer


# --------------------------------------------------------------------------------------------------
# XNOR / HORQ (§3.1, §3.2)

class XNORConv2d(_BaselineConv2d):
    """XNOR conv (``order=1``, ``BinaryConv2d_XNOR``) or HORQ conv (``order=2``,
    ``BinaryConv2d_HORQ``): ``y = conv2d(A^N(x), B_W^N(W), bias)``.

    ``A^N`` is the residual scaled sign of the input with one detached scale per sample and pixel
    (mean |r| over channels) and a clip STE at 1; ``B_W^N`` the per-output-channel residual weight
    sign with the clamp STE. Input ``[B, Cin, H, W]`` -> output ``[B, Cout, H', W']``.
    state_dict: ``weight``, ``bias`` (if any). The official int-valued ``kernel_size``/``stride``/
    ``padding`` attributes and unused ``shape`` attribute are not reproduced (no effect on maths).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, order: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.order = order

    @classmethod
    def from_float(cls, fp_layer: nn.Conv2d, *, order: int = 1, **config) -> XNORConv2d:
        """Replace ``fp_layer``; ``order`` selects XNOR (1) or HORQ (2) and is not a quant config."""
        _reject_config(cls.__name__, config)
        return cls._build(fp_layer, order=order)

    def forward(self, x: Tensor) -> Tensor:
        x_bin = binarize_activation(x, dim=1, order=self.order, sign_fn=sign_clip)
        return self._conv(x_bin, binarize_weight(self.weight, self.order))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}"


class XNORLinear(_BaselineLinear):
    """XNOR linear (``order=1``, ``BinaryLinear_XNOR``) or HORQ linear (``order=2``,
    ``BinaryLinear_HORQ``): ``y = A^N(x) · B_W^N(W)ᵀ + bias``, activation scale along the last dim.

    Input ``[..., in]`` -> output ``[..., out]``. state_dict: ``weight``, ``bias`` (if any).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, order: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        self.order = order

    @classmethod
    def from_float(cls, fp_layer: nn.Linear, *, order: int = 1, **config) -> XNORLinear:
        """Replace ``fp_layer``; ``order`` selects XNOR (1) or HORQ (2) and is not a quant config."""
        _reject_config(cls.__name__, config)
        return cls._build(fp_layer, order=order)

    def forward(self, x: Tensor) -> Tensor:
        x_bin = binarize_activation(x, dim=-1, order=self.order, sign_fn=sign_clip)
        return F.linear(x_bin, binarize_weight(self.weight, self.order), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}"


# --------------------------------------------------------------------------------------------------
# ReActNet / BBCU (§3.3, §3.5)

class ReActNetConv2d(_BaselineConv2d):
    """ReActNet conv (``BinaryConv2d_reactnet``)::

        z = conv2d(signBiReal(x + move0), B_W^1(W), bias)
        y = RPReLU(z + x)    if z.shape == x.shape    else RPReLU(z)

    The residual is the raw input and is simply dropped when channels or resolution change; the
    activations are not scaled. Input ``[B, Cin, H, W]`` -> output ``[B, Cout, H', W']``.
    state_dict: ``weight``, ``bias``?, ``move0.bias`` (1,Cin,1,1), ``relu.pr_bias0.bias``
    (1,Cout,1,1), ``relu.pr_prelu.weight`` (Cout,), ``relu.pr_bias1.bias`` (1,Cout,1,1); biases 0
    and PReLU slopes 0.25 at init.
    """

    residual_before_rprelu = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.move0 = LearnableBias((1, in_channels, 1, 1))
        self.relu = RPReLU(out_channels, bias_ndim=4)

    def forward(self, x: Tensor) -> Tensor:
        z = self._conv(sign_bireal(self.move0(x)), binarize_weight(self.weight))
        residual = z.shape == x.shape
        if residual and self.residual_before_rprelu:
            z = z + x
        y = self.relu(z)
        if residual and not self.residual_before_rprelu:
            y = y + x
        return y


class BBCUConv2d(ReActNetConv2d):
    """BBCU conv (``BinaryConv2d_BBCU``): the ReActNet conv with RPReLU **before** the residual::

        y = RPReLU(conv2d(signBiReal(x + move0), B_W^1(W), bias)) (+ x if the shapes match)

    None of the BBCU paper's residual-alignment extras exist in the official code. Input
    ``[B, Cin, H, W]`` -> output ``[B, Cout, H', W']``; keys, shapes and init as ReActNet's.
    """

    residual_before_rprelu = False


class ReActNetLinear(_BaselineLinear):
    """ReActNet linear (``BinaryLinear_reactnet``; also what ``BinaryLinear_BiDM`` builds)::

        u = x + channel_threshold
        y = signBiReal(u) · B_W^1(W)ᵀ + bias   (+ u when in_features == out_features)

    The residual is the thresholded input; there is no RPReLU. Input ``[..., in]`` -> output
    ``[..., out]``. state_dict: ``weight``, ``bias``?, ``channel_threshold`` (1, in), zeros at init.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.channel_threshold = nn.Parameter(torch.zeros(1, in_features))

    def forward(self, x: Tensor) -> Tensor:
        u = x + self.channel_threshold
        y = F.linear(sign_bireal(u), binarize_weight(self.weight), self.bias)
        return y + u if self.in_features == self.out_features else y


class BBCULinear(ReActNetLinear):
    """BBCU linear (``BinaryLinear_BBCU``): same maths, keys and init as :class:`ReActNetLinear`
    (a separate class in the official code too). Input ``[..., in]`` -> output ``[..., out]``."""


# --------------------------------------------------------------------------------------------------
# ReSTE (§3.4)

def _reste_weight(w: Tensor) -> Tensor:
    """``signReSTE(W) · α`` with the per-output-channel ``α = mean |W|`` kept live (it gets a grad)."""
    alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return sign_reste(w, RESTE_T, RESTE_O, RESTE_INTERVAL) * alpha


def _reste_activation(x: Tensor) -> Tensor:
    return sign_reste(x, RESTE_T, RESTE_O, RESTE_INTERVAL)


class ReSTEConv2d(_BaselineConv2d):
    """ReSTE conv (``BinaryConv2d_ReSTE``): ``y = conv2d(signReSTE(x), signReSTE(W) · α, bias)``.

    t = 1.5, o = 1 for weights and activations (plain constants, not in the state_dict), so both
    STEs are a clip at 1.5; α = mean |W| per output channel is not detached. Input
    ``[B, Cin, H, W]`` -> output ``[B, Cout, H', W']``. state_dict: ``weight``, ``bias``?.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(_reste_activation(x), _reste_weight(self.weight))


class ReSTELinear(_BaselineLinear):
    """ReSTE linear (``BinaryLinear_ReSTE``): ``y = signReSTE(x) · (signReSTE(W) · α)ᵀ + bias``.

    Input ``[..., in]`` -> output ``[..., out]``. state_dict: ``weight``, ``bias``?.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_reste_activation(x), _reste_weight(self.weight), self.bias)


# --------------------------------------------------------------------------------------------------
# BiDM (§3.6)

class BiDMConv2d(_BaselineConv2d):
    """BiDM conv (``BinaryConv2d_BiDM``)::

        K  = fliter_k(mean_c |x|)                 (FP (1,1,k,k) kernel, stride s, padding p; live)
        z  = conv2d(signBiReal(x + channel_threshold), B_W^1(W), bias) · K
        y  = z + |shortcut_scale| · shortcut(x)

    ``shortcut`` is the identity when Cin == Cout (avg-pool by s when x is wider than z, nearest
    ×2 upsampling when narrower; only the width is compared, as in the original) and a
    full-precision 1×1 conv (Cin→Cout, stride s, with bias, default random init) otherwise.
    Input ``[B, Cin, H, W]`` -> output ``[B, Cout, H', W']``.

    state_dict (in order): ``weight``, ``bias``?, ``channel_threshold`` (1,Cin,1,1) zeros,
    ``shortcut_scale`` (1,) 0.3, ``fliter_k.weight`` (1,1,k,k) 1/k², and ``shortcut.weight``
    (Cout,Cin,1,1), ``shortcut.bias`` (Cout,) when Cin != Cout.

    Deliberate difference: the official layer overwrites ``fliter_k`` with 1/k² (and calls
    ``.cuda()``) on its first forward, discarding a loaded kernel. This layer never does that and
    never moves itself to a device; call :meth:`reset_fliter_k` to reproduce the official first
    forward of a freshly built or loaded layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.channel_threshold = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        self.shortcut_scale = nn.Parameter(torch.full((1,), 0.3))
        self.fliter_k = nn.Conv2d(1, 1, kernel_size, stride=stride, padding=padding, bias=False)
        self.reset_fliter_k()
        self.shortcut = (None if in_channels == out_channels else
                         nn.Conv2d(in_channels, out_channels, 1, stride=stride, padding=0))

    @torch.no_grad()
    def reset_fliter_k(self) -> None:
        """Set the activation-magnitude kernel to the uniform 1/k² average (its init value)."""
        self.fliter_k.weight.fill_(1.0 / self.fliter_k.weight[0, 0].numel())

    def _shortcut(self, x: Tensor, z: Tensor) -> Tensor:
        if self.shortcut is not None:
            return self.shortcut(x)
        if x.shape[-1] > z.shape[-1]:
            return F.avg_pool2d(x, kernel_size=self.stride[0], stride=self.stride[0])
        if x.shape[-1] < z.shape[-1]:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor) -> Tensor:
        k = self.fliter_k(x.abs().mean(dim=1, keepdim=True))
        z = self._conv(sign_bireal(x + self.channel_threshold), binarize_weight(self.weight)) * k
        return z + self.shortcut_scale.abs() * self._shortcut(x, z)


# --------------------------------------------------------------------------------------------------

BASELINE_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "BinaryConv2d_XNOR": XNORConv2d.from_float,
    "BinaryLinear_XNOR": XNORLinear.from_float,
    "BinaryConv2d_HORQ": partial(XNORConv2d.from_float, order=2),
    "BinaryLinear_HORQ": partial(XNORLinear.from_float, order=2),
    "BinaryConv2d_reactnet": ReActNetConv2d.from_float,
    "BinaryLinear_reactnet": ReActNetLinear.from_float,
    "BinaryConv2d_BBCU": BBCUConv2d.from_float,
    "BinaryLinear_BBCU": BBCULinear.from_float,
    "BinaryConv2d_ReSTE": ReSTEConv2d.from_float,
    "BinaryLinear_ReSTE": ReSTELinear.from_float,
    "BinaryConv2d_BiDM": BiDMConv2d.from_float,
    "BinaryLinear_BiDM": ReActNetLinear.from_float,  # as in the original table
}
"""Official config name -> ``from_float(fp_layer, **config)`` constructor."""
