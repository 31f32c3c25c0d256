"""Sign bits packed 8 per byte, with the (rare) exact zeros kept as a sparse list.

A binary weight ``W [Cout, ...]`` is deployed as ``alpha[o] * sign(W[o, j])`` (docs/denoiser.md §4.4).
``sign`` has three values because ``sign(0) = 0`` (docs/quirks.md Q11), so one bit per weight is not enough in
general; latent weights that are exactly ``0.0`` are (almost) nonexistent in trained or random
weights, so they are stored as a list of flat positions next to the bits (usually empty):

* ``bits``  -- uint8 ``[Cout, ceil(n / 8)]``, ``n = prod(W.shape[1:])``: bit ``j % 8`` (least
  significant first) of byte ``j // 8`` of row ``o`` is 1 where ``W[o].flatten()[j] > 0``; the pad
  bits at the end of each row are 0.
* ``zeros`` -- int64 ``[z]``: flat positions (into ``W.reshape(-1)``) where ``W == 0``; their bit
  is 0 and they unpack to 0 instead of -1.

With ``bits, zeros = pack_signs(w)``, ``unpack_signs(bits, w.shape, zeros)`` equals ``torch.sign(w)`` as int8, for any shape.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pack_signs", "packed_row_bytes", "unpack_signs"]

_BIT_VALUES = [1, 2, 4, 8, 16, 32, 64, 128]


def packed_row_bytes(shape: Sequence[int]) -> int:
    """Bytes per output channel for a weight of ``shape`` ``[Cout, ...]``: ``ceil(n / 8)``."""
    return (math.prod(shape[1:]) + 7) // 8


def pack_signs(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w [Cout, ...]`` (float) -> ``(bits uint8 [Cout, ceil(n/8)], zeros int64 [z])``.

    Raises ``ValueError`` for a weight with NaN (its sign is not a sign).
    """
    if w.dim() < 1 or w.shape[0] == 0:
        raise ValueError(f"pack_signs needs a weight [Cout, ...] with Cout > 0, got {tuple(w.shape)}")
    if torch.isnan(w).any():
        raise ValueError("pack_signs: the weight contains NaN")
    flat = w.detach().reshape(w.shape[0], -1)
    n = flat.shape[1]
    nbytes = (n + 7) // 8
    positive = torch.zeros(flat.shape[0], nbytes * 8, dtype=torch.uint8, device=w.device)
    positive[:, :n] = flat > 0
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=w.device)
    bits = (positive.view(-1, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)
    zeros = torch.nonzero(w.detach().reshape(-1) == 0).reshape(-1)
    return bits.cpu(), zeros.cpu()


def unpack_signs(bits: Tensor, shape: Sequence[int], zeros: Tensor | None = None,
                 dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_signs`: the signs ``{-1, 0, +1}`` as ``dtype`` of ``shape``.

    ``bits`` uint8 ``[Cout, ceil(n/8)]``; ``zeros`` flat positions of the zeros (or ``None``).
    Raises ``ValueError`` when ``bits`` or ``zeros`` do not fit ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape[1:])
    expected = (shape[0], (n + 7) // 8)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != expected:
        raise ValueError(f"packed signs for a weight {list(shape)} must be uint8 {list(expected)}, "
                         f"got {bits.dtype} {list(bits.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    ones = (bits[:, :, None] >> shifts) & 1  # [Cout, nbytes, 8]
    signs = ones.reshape(shape[0], -1)[:, :n].to(dtype) * 2 - 1
    signs = signs.reshape(shape)
    if zeros is not None and zeros.numel():
        zeros = zeros.reshape(-1).long()
        if int(zeros.min()) < 0 or int(zeros.max()) >= signs.numel():
            raise ValueError(f"zero positions out of range for a weight {list(shape)} "
                             f"({signs.numel()} entries)")
        signs.view(-1)[zeros.to(bits.device)] = 0
    return signs
