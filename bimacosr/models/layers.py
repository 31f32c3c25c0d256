"""Small building blocks shared by the UNet, the Swin layer and the autoencoder, and the
precision test that chooses between the original's operations and their faster forms."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr import kernels


def autocast_dtype(device: str) -> torch.dtype | None:
    """The autocast dtype active for ``device`` ("cpu", "cuda", ...), None when autocast is off there
    or the device has none (e.g. "meta")."""
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_off(device: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device`` where it is on (a no-op elsewhere, e.g. on "meta", which
    has no autocast): the code inside computes in its tensors' own dtypes."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def reduced_precision(x: Tensor) -> bool:
    """True when the layers fed by ``x`` compute below float32: ``x`` is float16/bfloat16, or
    autocast is on for its device with such a dtype. Only then do the faster forms of the same
    maths run (docs/deviations.md D16); float32 keeps the original's operations, which the
    fixtures match bit for bit."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return True
    return autocast_dtype(x.device.type) not in (None, torch.float32)


_FAST_FLOAT32 = contextvars.ContextVar("bimacosr_fast_float32", default=False)


@contextlib.contextmanager
def fast_float32(enabled: bool = True):
    """Inside, float32 work of the layers that offer one runs in a faster form of the same maths
    (``--precision fp32-fast``; docs/deviations.md D16): :class:`WinogradConv2d` through NNPACK's
    Winograd transforms, the autoencoder's swish as one ``silu`` and its attention in query blocks.
    The float32 roundings differ (relative 1e-6 to 1e-5 a convolution); outside, float32 keeps the
    original's operations."""
    token = _FAST_FLOAT32.set(enabled)
    try:
        yield
    finally:
        _FAST_FLOAT32.reset(token)


def fast_float32_enabled() -> bool:
    """Whether the innermost :func:`fast_float32` is on."""
    return _FAST_FLOAT32.get()


def faster_forms(x: Tensor) -> bool:
    """Whether layers fed by ``x`` run the faster forms of the same maths: below float32
    (:func:`reduced_precision`) or inside :func:`fast_float32` (docs/deviations.md D16)."""
    return reduced_precision(x) or fast_float32_enabled()


@functools.cache
def nnpack_available() -> bool:
    """Whether PyTorch's NNPACK works on this CPU (x86-64 with AVX2 and FMA3, or ARM NEON); the
    call also initialises it, which its convolution needs first."""
    return bool(torch.backends.nnpack.is_available())


_nnpack_failure: str | None = None  # NNPACK's first error this process, noted once on stderr


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 3, 1, 1)``, the same parameters and state_dict keys,
    whose float32 CPU inference inside :func:`fast_float32` runs through NNPACK's Winograd
    F(6x6, 3x3) transforms (``torch._nnpack_spatial_convolution``): 2-3x fewer cycles than
    oneDNN's direct float32 convolution at the autoencoder's shapes, within ~1e-5 relative of it
    (docs/speed.md §2). Everything else (other dtypes, autocast below float32, gradients, a
    channels-last input, no NNPACK) is ``nn.Conv2d``'s. NNPACK sizes its thread pool once, from
    ``torch.get_num_threads()`` at its first call. Its workspace is ~3.6x its input, so a map of
    more than ``band_elements`` values is convolved in bands of rows (each with its neighbour rows
    as halo): at most ~230 MB of workspace instead of 3.6 GB for a 1 GB map (the decoder's at the
    default 256-pixel tile)."""

    band_elements = 1 << 24

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self._winograd_applies(x):
            try:
                return self._winograd(x)
            except RuntimeError as err:  # e.g. NNPACK's workspace allocation: oneDNN computes the same
                global _nnpack_failure
                if _nnpack_failure is None:
                    _nnpack_failure = str(err)
                    print(f"bimacosr: NNPACK's Winograd convolution failed ({err}); oneDNN's direct "
                          f"convolution runs instead", file=sys.stderr, flush=True)
        return super().forward(x)

    def _winograd(self, x: Tensor) -> Tensor:
        """NNPACK's convolution of ``x`` [N, C, H, W], in bands of at least 16 rows."""
        n, c, h, w = x.shape
        rows = max(16, self.band_elements // max(n * c * w, 1))
        if rows >= h:
            return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1], [1, 1])
        out = x.new_empty(n, self.out_channels, h, w)
        for top in range(0, h, rows):
            bottom = min(top + rows, h)
            first, last = max(top - 1, 0), min(bottom + 1, h)  # the band and its halo rows
            band = x[:, :, first:last]
            out[:, :, top:bottom] = torch._nnpack_spatial_convolution(
                band, self.weight, self.bias, [1, 1], [1, 1])[:, :, top - first: bottom - first]
        return out

    def _winograd_applies(self, x: Tensor) -> bool:
        return (fast_float32_enabled() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype == self.weight.dtype == torch.float32 and x.is_contiguous()
                and not reduced_precision(x) and self.padding_mode == "zeros"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and nnpack_available())


def residual(x: Tensor, h: Tensor) -> Tensor:
    """``x + h``, written into the fresh branch output ``h`` when the sum has ``h``'s dtype, shape
    and memory layout (bit for bit the same: float addition commutes exactly; the layout decides
    how later GroupNorms sum in float32); saves a full-size allocation. A forward hook that keeps
    ``h`` (the branch's output) without cloning it sees the sum."""
    if h.dtype == torch.promote_types(h.dtype, x.dtype) and h.shape == x.shape and h.stride() == x.stride():
        return h.add_(x)
    return x + h


def silu_fresh(h: Tensor) -> Tensor:
    """``silu(h)`` of a fresh tensor nothing else reads, in place unless it records a gradient
    (bit for bit the out-of-place result, one allocation less)."""
    return F.silu(h, inplace=not h.requires_grad)


def gelu_fresh(h: Tensor) -> Tensor:
    """``gelu(h)`` (exact, erf form: ``nn.GELU()``'s) of a fresh tensor, as :func:`silu_fresh`. A
    channels-last map is passed to the kernel as its contiguous NHWC view: ATen's GELU takes another,
    2x slower route on a channels-last tensor whose values differ from the NCHW result in the last
    bits; on the view they are the NCHW result bit for bit (the original's layout; docs/speed.md §3)."""
    if h.requires_grad:
        return F.gelu(h)
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        torch.ops.aten.gelu_(h.permute(0, 2, 3, 1))
        return h
    return torch.ops.aten.gelu_(h)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype, optionally followed by SiLU.

    A bfloat16 input on CPU is normalised in float32 and rounded once to bfloat16, without the two
    conversion passes (the same maths; the statistics may be summed in another order, so a value
    can differ by one bfloat16 rounding; docs/speed.md §3): a channels-last map by the C++ kernel,
    which also applies the SiLU in the same pass (:func:`bimacosr.kernels.group_norm`), others by
    ATen's GroupNorm.
    """

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        return self._normalize(x, self.weight, self.bias, silu)

    def modulated(self, x: Tensor, scale: Tensor, shift: Tensor, silu: bool = False) -> Tensor:
        """``self(x) * (1 + scale) + shift``, then SiLU if ``silu`` (the ResBlocks' FiLM; ``scale``,
        ``shift`` ``[B, C, 1, 1]``).

        bf16 on CPU: one GroupNorm whose affine is the product of both (``weight * (1 + scale)``,
        ``bias * (1 + scale) + shift``, in float32, per image), rounded once; the two elementwise
        passes go (docs/speed.md §3). ATen's affine is per channel, so without the kernel only one
        image takes this form. Otherwise the original's operations, in place on the fresh normalised
        tensor unless it records a gradient (the same roundings).
        """
        fold = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        if fold and (x.shape[0] == 1 or kernels.group_norm_applies(x, self.weight, scale, shift)):
            gain = 1 + scale.float().flatten(1)
            bias = torch.addcmul(shift.float().flatten(1), self.bias, gain)
            return self._normalize(x, self.weight * gain, bias, silu)
        h = self(x)
        h = h * (1 + scale) + shift if h.requires_grad else h.mul_(1 + scale).add_(shift)
        return silu_fresh(h) if silu else h

    def _normalize(self, x: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> Tensor:
        """GroupNorm of ``x`` with the affine ``weight``, ``bias`` (``[C]``, or ``[N, C]`` per image
        where the kernel runs), then SiLU if ``silu``."""
        if kernels.group_norm_applies(x, weight, bias):
            return kernels.group_norm(x, self.num_groups, weight, bias, self.eps, silu)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            h = F.group_norm(x, self.num_groups, weight.view(-1), bias.view(-1), self.eps)
        else:
            h = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
        return silu_fresh(h) if silu else h


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]``, cos half first (``f_j = exp(-ln(P) j / half)``).

    ``timesteps`` holds ints or floats (ResShift passes raw step indices 0..T-1). An odd ``dim``
    gets one zero column appended. At ``t = 0`` the sin half is exactly 0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
