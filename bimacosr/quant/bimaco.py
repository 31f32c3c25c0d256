"""BiMaCo layers: binary matrix branch + low-rank matrix branch (LRMB) + sparse matrix branch (SMB).

``BiMaCoConv2d`` and ``BiMaCoLinear`` replace the official ``BinaryConv2d_ours`` /
``BinaryLinear_ours`` (config names ``BinaryConv2d_ours_with_skip_and_lora`` /
``BinaryLinear_ours_with_skip_and_lora``) key for key. docs/denoiser.md §4 is the specification; the
quirks of docs/quirks.md (Q7-Q17) are reproduced and named where they happen.

State-dict names are the original's: the sparse branch lives under ``skip_connection`` and the
low-rank branch under ``lora``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr.quant.binarize import binarize_activation, binarize_weight, sign_bireal
from bimacosr.quant.common import LearnableBias, QuantLayer, RPReLU, eval_cached


class SparseBranch(nn.Module):
    """A ``Cout x Cin`` sparse matrix ``S`` applied as a 1x1 conv / matrix product (SMB).

    Keys: ``values`` (parameter ``[n]``) and ``indices_float`` (float32 buffer ``[2, n]``: row 0 =
    output index, row 1 = input index). Indices are rounded to the nearest integer at use (Q14:
    they are EMA-averaged floats in training checkpoints); duplicate positions add up.
    """

    def __init__(self, out_features: int, in_features: int, nnz: int):
        super().__init__()
        self.shape = (out_features, in_features)
        self.values = nn.Parameter(torch.zeros(nnz))
        self.register_buffer("indices_float", torch.zeros(2, nnz))

    def dense(self) -> Tensor:
        """The dense matrix ``[Cout, Cin]`` (differentiable in ``values``)."""
        rows, cols = self.indices_float.round().long()
        dense = self.values.new_zeros(self.shape)
        return dense.index_put((rows, cols), self.values, accumulate=True)

    @torch.no_grad()
    def set_from_dense(self, matrix: Tensor) -> None:
        """Keep the ``n`` largest-magnitude entries of ``matrix`` (``torch.topk``, unsorted)."""
        flat = matrix.reshape(-1)
        idx = torch.topk(flat.abs(), self.values.numel(), sorted=False).indices
        cols = matrix.shape[1]
        self.indices_float.copy_(torch.stack([idx // cols, idx % cols]).to(self.indices_float))
        self.values.copy_(flat[idx])

    def forward(self, x: Tensor, channel_dim: int) -> Tensor:
        """``x`` ``[B, Cin, H, W]`` (``channel_dim=1``) or ``[..., Cin]`` (``channel_dim=-1``)."""
        s = eval_cached(self, "dense", (self.values, self.indices_float), self.dense).to(x.dtype)
        if channel_dim == 1:
            return F.conv2d(x, s[:, :, None, None])
        return F.linear(x, s)


class LowRankBranch(nn.Module):
    """Two bias-free projections ``Cin -> r -> Cout`` (LRMB), dense equivalent ``L = second @ first``.

    Q15: the conv version names its first projection ``A`` (1x1 convs), the linear version names
    its first projection ``B`` (and registers it first), so the keys match the original.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, conv: bool):
        super().__init__()
        first, second = ("A", "B") if conv else ("B", "A")
        make = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if conv else (lambda i, o: nn.Linear(i, o, bias=False))
        self.first_name, self.second_name, self.rank = first, second, rank
        self.add_module(first, make(in_features, rank))
        self.add_module(second, make(rank, out_features))

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(first [r, Cin], second [Cout, r])`` as matrices."""
        first = getattr(self, self.first_name).weight
        second = getattr(self, self.second_name).weight
        return first.reshape(first.shape[0], -1), second.reshape(second.shape[0], -1)

    @torch.no_grad()
    def set_from_dense(self, matrix: Tensor) -> Tensor:
        """Fit the best rank-``self.rank`` approximation of ``matrix [Cout, Cin]`` by SVD (float64);
        returns the dense approximation ``L`` in ``matrix``'s dtype."""
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        r = self.rank
        root = s[:r].sqrt()
        second = u[:, :r] * root  # [Cout, r]
        first = root[:, None] * vh[:r]  # [r, Cin]
        for name, value in ((self.first_name, first), (self.second_name, second)):
            weight = getattr(self, name).weight
            weight.copy_(value.reshape(weight.shape).to(weight.dtype))
        return (second @ first).to(matrix.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.second_name)(getattr(self, self.first_name)(x))


def _nnz(in_features: int, out_features: int) -> int:
    """SMB size ``2 * max(Cin, Cout)`` (Q17), clamped to the matrix size for tiny layers."""
    return min(2 * max(in_features, out_features), in_features * out_features)


class _SideBranches:
    """What BiMaCoConv2d and BiMaCoLinear share: the SMB (``skip_connection``) and LRMB (``lora``)
    construction and the (eval-cached) binarized weight."""

    def _add_side_branches(self, cin: int, cout: int, rank: int, if_LRMB: bool, if_SMB: bool,
                           conv: bool) -> None:
        name = type(self).__name__
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
        for key, value in (("if_LRMB", if_LRMB), ("if_SMB", if_SMB)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {key} must be true or false, got {value!r}")
        self.skip_connection = SparseBranch(cout, cin, _nnz(cin, cout)) if if_SMB else None
        self.lora = LowRankBranch(cin, cout, min(rank, cin, cout), conv=conv) if if_LRMB else None

    def binary_weight(self) -> Tensor:
        """``alpha * sign(W)`` of the latent weight (docs/denoiser.md §4.4)."""
        return eval_cached(self, "binary_weight", (self.weight,), lambda: binarize_weight(self.weight))


class BiMaCoConv2d(QuantLayer, _SideBranches, nn.Conv2d):
    """BiMaCo convolution (official ``BinaryConv2d_ours``), ``[B, Cin, H, W] -> [B, Cout, H', W']``.

    ``y = RPReLU(conv(s * sign(x), alpha * sign(W)) + bias)`` plus, on the real-valued input ``x``:
    the SMB (``Cin != Cout`` or same height) or a parameter-free shortcut (``Cin == Cout`` and the
    height changes: avg-pool for stride 2, Q7), and the LRMB only when the height is unchanged
    (Q8). ``s`` is the per-pixel mean of ``|x|`` over channels (detached), ``alpha`` the
    per-output-channel mean of ``|W|``. ``move0`` is stored but unused (Q10).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, rank: int = 8, if_LRMB: bool = True,
                 if_SMB: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.move0 = LearnableBias((1, in_channels))
        self.relu = RPReLU(out_channels)
        self._add_side_branches(in_channels, out_channels, rank, if_LRMB, if_SMB, conv=True)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, rank: int = 8, if_LRMB: bool = True,
                   if_SMB: bool = True) -> "BiMaCoConv2d":
        """Decompose an FP conv (docs/denoiser.md §4.6, Q16): SMB = top-n entries of the kernel-mean
        matrix, removed from the centre tap; LRMB = rank-r SVD of the remaining kernel mean,
        removed from the centre tap; the rest is the binary branch's latent weight."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                    conv.padding[0], conv.bias is not None, rank, if_LRMB, if_SMB)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            weight = conv.weight.detach().clone()
            c = weight.shape[-1] // 2
            if layer.skip_connection is not None:
                layer.skip_connection.set_from_dense(weight.mean(dim=(2, 3)))
                weight[:, :, c, c] -= layer.skip_connection.dense()
            if layer.lora is not None:
                weight[:, :, c, c] -= layer.lora.set_from_dense(weight.mean(dim=(2, 3)))
            layer.weight.copy_(weight)
        if conv.bias is not None:
            layer.bias = conv.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        xb = binarize_activation(x, dim=1, sign_fn=sign_bireal)
        y = F.conv2d(xb, self.binary_weight(), self.bias, self.stride, self.padding)
        y = self.relu(y)
        if self.in_channels == self.out_channels and x.shape[2] != y.shape[2]:
            y = y + _resize_shortcut(x, y, self.stride[0])
        elif self.skip_connection is not None:
            y = y + self.skip_connection(x, channel_dim=1)
        if self.lora is not None and x.shape[2] == y.shape[2]:
            y = y + self.lora(x)
        return y


def _resize_shortcut(x: Tensor, y: Tensor, stride: int) -> Tensor:
    """Parameter-free shortcut when the height changes: nearest x2 up, or avg-pool by ``stride``."""
    if x.shape[2] < y.shape[2]:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, kernel_size=stride, stride=stride)


class BiMaCoLinear(QuantLayer, _SideBranches, nn.Linear):
    """BiMaCo linear (official ``BinaryLinear_ours``), ``[..., Cin] -> [..., Cout]``.

    ``y = linear(s * sign(x), alpha * sign(W), bias) + LRMB(x) + SMB(x)`` with ``s`` the mean of
    ``|x|`` over the last axis (per row / token, detached). No RPReLU (Q9);
    ``channel_threshold`` is stored but unused (Q10).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8,
                 if_LRMB: bool = True, if_SMB: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.channel_threshold = nn.Parameter(torch.zeros(1, in_features))
        self._add_side_branches(in_features, out_features, rank, if_LRMB, if_SMB, conv=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, rank: int = 8, if_LRMB: bool = True,
                   if_SMB: bool = True) -> "BiMaCoLinear":
        """SMB = top-n entries of ``W``; LRMB = rank-r SVD of ``W - S``; latent weight
        ``W - S - L`` (docs/denoiser.md §4.6)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank,
                    if_LRMB, if_SMB)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            weight = linear.weight.detach().clone()
            if layer.skip_connection is not None:
                layer.skip_connection.set_from_dense(weight)
                weight -= layer.skip_connection.dense()
            if layer.lora is not None:
                weight -= layer.lora.set_from_dense(weight)
            layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        xb = binarize_activation(x, dim=-1, sign_fn=sign_bireal)
        y = F.linear(xb, self.binary_weight(), self.bias)
        if self.lora is not None:
            y = y + self.lora(x)
        if self.skip_connection is not None:
            y = y + self.skip_connection(x, channel_dim=-1)
        return y
