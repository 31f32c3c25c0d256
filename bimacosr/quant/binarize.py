"""Sign functions with straight-through gradients, and the scaled binarizers built on them.

Every function here is pure: tensors in, tensors out. ``sign`` is ``torch.sign`` throughout, so
``sign(0) = 0`` (docs/quirks.md Q11, docs/baselines.md §2). The estimators differ only in backward:

* ``sign_clip(u, limit)``  -- d/du = 1[|u| <= limit] (XNOR, HORQ: limit 1; boundary included).
* ``sign_bireal(u)``       -- d/du = max(0, 2 - 2|u|) (Bi-Real / ApproxSign: BiMaCo, ReActNet,
  BBCU, BiDM).
* ``sign_reste(u, t, o)``  -- ReSTE's power-function estimator (docs/baselines.md §3.4).

``binarize_weight`` and ``binarize_activation`` add the per-channel / per-position scales.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SignFn = Callable[[Tensor], Tensor]


class _SignClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, limit: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.limit = limit
        return torch.sign(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        return grad * (u.abs() <= ctx.limit).to(grad.dtype), None


class _SignBiReal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return torch.sign(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        return grad * torch.clamp(2.0 - 2.0 * u.abs(), min=0.0)


class _SignReSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, t: float, o: float, interval: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.hyper = (t, o, interval)
        return torch.sign(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        t, o, interval = ctx.hyper
        a = u.abs()
        power = (1.0 / o) * a.clamp(min=interval).pow((1.0 - o) / o)
        inner = interval ** (1.0 / o) / interval
        slope = torch.where(a <= interval, torch.full_like(a, inner), power)
        slope = torch.where(a > t, torch.zeros_like(a), slope)
        return grad * slope, None, None, None


def sign_clip(u: Tensor, limit: float = 1.0) -> Tensor:
    """``sign(u)``; backward passes the gradient where ``|u| <= limit``."""
    return _SignClip.apply(u, limit)


def sign_bireal(u: Tensor) -> Tensor:
    """``sign(u)``; backward multiplies by the Bi-Real polynomial slope ``max(0, 2 - 2|u|)``."""
    return _SignBiReal.apply(u)


def sign_reste(u: Tensor, t: float = 1.5, o: float = 1.0, interval: float = 0.1) -> Tensor:
    """``sign(u)``; backward uses ReSTE's slope: ``(1/o)|u|^((1-o)/o)`` on ``interval < |u| <= t``,
    the secant ``interval^(1/o)/interval`` on ``|u| <= interval`` and 0 beyond ``t``.
    With ``o = 1`` (the official setting) this is a clip STE at ``t``."""
    return _SignReSTE.apply(u, t, o, interval)


def binarize_activation(x: Tensor, dim: int, order: int = 1, sign_fn: SignFn = sign_bireal) -> Tensor:
    """Residual scaled sign of activations (XNOR-Net's ``A^N``; N = 1 for BiMaCo and XNOR).

    ``r_0 = x``; ``b_i = beta_i * sign_fn(r_{i-1})`` with ``beta_i = mean |r_{i-1}|`` along
    ``dim`` (kept, detached); ``r_i = r_{i-1} - b_i``; returns ``b_1 + ... + b_N``.
    Use ``dim=1`` for ``[B, C, H, W]`` maps (one scale per pixel) and ``dim=-1`` for tokens.
    """
    residual, out = x, None
    for _ in range(order):
        beta = residual.abs().mean(dim=dim, keepdim=True).detach()
        b = beta * sign_fn(residual)
        out = b if out is None else out + b
        residual = residual - b
    return out


def binarize_weight(w: Tensor, order: int = 1) -> Tensor:
    """Per-output-channel residual sign of a weight ``[Cout, ...]`` (``B_W^N``).

    Forward value ``b_1 + ... + b_N`` with ``b_i = alpha_i * sign(r_{i-1})`` and
    ``alpha_i = mean |r_{i-1}|`` over every axis but 0 (no gradient). Backward is the clipped
    identity ``1[-1 < w < 1]``. Evaluated as ``(b - clamp(w)) + clamp(w)`` with the bracket
    detached, which is ``b`` up to one float rounding (docs/quirks.md Q12).
    """
    with torch.no_grad():
        axes = tuple(range(1, w.dim()))
        residual, b = w, torch.zeros_like(w)
        for _ in range(order):
            step = residual.abs().mean(dim=axes, keepdim=True) * torch.sign(residual)
            b = b + step
            residual = residual - step
    clipped = torch.clamp(w, -1.0, 1.0)
    return (b - clipped).detach() + clipped
