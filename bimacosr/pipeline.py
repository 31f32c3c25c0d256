"""LR image -> SR image: padding, tiling and blending, encode, predict, decode (docs/pipeline.md §4).

``SRPipeline`` composes the denoiser, the VQ-f4 autoencoder and the ResShift schedule. Images are
``[B, 3, H, W]`` float in [0, 1]; the result is ``[B, 3, sf*H, sf*W]`` in [0, 1].

Differences from the original, all opt-in or strictly better: any LR size works (the original's
reflect padding crashed for sides <= 32: here padding falls back to edge replication where a
reflection is impossible); tiles can be blended with Gaussian weights (``blend="gaussian"``,
seam-free) instead of the original's uniform average (``blend="average"``, the default, bit-exact);
any tile size / stride (the original accepted only 256/224 and 512/448).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr.diffusion import Schedule, prior_sample, sample_ancestral, sample_ddim, sample_one_step
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.models.first_stage import decode_first_stage, encode_first_stage
from bimacosr.models.layers import fast_float32

NoiseFn = Callable[[Tensor], Tensor]
SAMPLERS = {"one_step": sample_one_step, "ddim": sample_ddim, "ancestral": sample_ancestral}
BLENDS = ("average", "gaussian")


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right up to a multiple: reflect as the original, repeated while the image is
    smaller than the padding, replicate for 1-pixel sides (where no reflection exists)."""
    h, w = x.shape[-2:]
    target_h, target_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    while x.shape[-2] < target_h or x.shape[-1] < target_w:
        h, w = x.shape[-2:]
        pad_h, pad_w = min(target_h - h, h - 1), min(target_w - w, w - 1)
        if (target_h > h and pad_h == 0) or (target_w > w and pad_w == 0):
            return F.pad(x, (0, target_w - w, 0, target_h - h), mode="replicate")
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return x


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: ``[0]`` if it fits, else every ``stride`` with overflowing
    starts moved to ``length - tile`` (duplicates dropped, order kept), as the original."""
    if length <= tile:
        return [0]
    starts = [min(s, length - tile) for s in range(0, length, stride)]
    return list(dict.fromkeys(starts))


def gaussian_window(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Separable Gaussian weights ``[1, 1, H, W]`` (sigma = side / 6), max 1, min ~1e-2."""
    def axis(n: int) -> Tensor:
        coords = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (coords / max(n / 6, 1e-3)) ** 2)
    return (axis(height)[:, None] * axis(width)[None, :])[None, None]


@dataclass
class SRPipeline:
    """One-step (or multi-step) ResShift-style super-resolution in the VQ-f4 latent space.

    ``denoiser(x, t, lq=lq)`` predicts x0; ``sampler`` is ``"one_step"`` (BiMaCoSR/SinSR),
    ``"ddim"`` or ``"ancestral"`` (ResShift). ``min_size`` is the LR multiple each tile is padded
    to (64 for the released UNet: the latent must be a multiple of 64). ``autocast`` runs the
    encoder, denoiser and decoder under ``torch.autocast`` with that dtype (bf16 on CPUs that
    compute it natively; see ``build.resolve_precision``); None keeps the modules' own dtypes.
    ``fast_float32`` runs them inside :func:`~bimacosr.models.layers.fast_float32` (``fp32-fast``).
    """

    denoiser: nn.Module
    autoencoder: VQAutoencoder
    schedule: Schedule
    sampler: str = "one_step"
    sf: int = 4
    min_size: int = 64
    autocast: torch.dtype | None = None
    fast_float32: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {sorted(SAMPLERS)}")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.inference_mode()
    def sample_tile(self, y0: Tensor, noise_fn: NoiseFn) -> Tensor:
        """``y0`` ``[B, 3, h, w]`` in [-1, 1] -> SR ``[B, 3, sf*h, sf*w]`` clamped to [-1, 1].

        Pads to ``min_size``, encodes the bicubic x``sf`` upsampling, draws the prior noise with
        ``noise_fn`` (then the sampler's own draws), runs the sampler, decodes with quantisation
        and crops the padding off.
        """
        h, w = y0.shape[-2:]
        lq = pad_to_multiple(y0, self.min_size)
        dtype = self.autocast or torch.float32
        with (torch.autocast(lq.device.type, dtype=dtype, enabled=self.autocast is not None),
              fast_float32(self.fast_float32)):
            z_y = encode_first_stage(self.autoencoder, lq, up_sample=True, sf=self.sf).float()
            x_t = prior_sample(z_y, self.schedule, noise_fn(z_y))

            def model_fn(x_in: Tensor, t: Tensor) -> Tensor:
                return self.denoiser(x_in, t, lq=lq).float()

            z0 = SAMPLERS[self.sampler](model_fn, x_t, z_y, self.schedule, noise_fn=noise_fn)
            sr = decode_first_stage(self.autoencoder, z0).float()
        return sr[..., : self.sf * h, : self.sf * w].clamp(-1.0, 1.0)

    @torch.inference_mode()
    def __call__(self, lr: Tensor, *, tile: int = 256, tile_stride: int | None = None,
                 blend: str = "average", generator: torch.Generator | None = None,
                 noise_fn: NoiseFn | None = None, progress: Callable[[Iterator], Iterator] | None = None,
                 tile_batch: int = 1) -> Tensor:
        """Super-resolve ``lr`` ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, sf*H, sf*W]`` in [0, 1].

        Images larger than ``tile`` (LR pixels) on a side are split into tiles ``tile_stride``
        apart (default ``tile * 7 // 8``, the original's 256/224); each tile is padded, sampled
        with its own noise and blended into an HR canvas. Noise comes from ``noise_fn(like)`` or
        else ``torch.randn`` with ``generator``. ``progress`` wraps the tile iterator (e.g. tqdm).
        ``tile_batch`` > 1 samples up to that many equal-sized tiles in one batch (faster; the same
        maths, but the noise is drawn per batch, so results differ from ``tile_batch=1``).
        """
        if blend not in BLENDS:
            raise ValueError(f"unknown blend {blend!r}; use one of {BLENDS}")
        if tile < 1:
            raise ValueError(f"tile size must be positive, got {tile}")
        stride = tile_stride or max(tile * 7 // 8, 1)
        if not 0 < stride <= tile:
            raise ValueError(f"tile stride must be in 1..{tile} (the tile size), got {stride}")
        noise_fn = noise_fn or (lambda like: torch.randn(like.shape, generator=generator,
                                                         device=like.device, dtype=like.dtype))
        y0 = (lr.to(self.device, torch.float32) - 0.5) / 0.5
        b, _, h, w = y0.shape
        boxes = [(top, left) for top in tile_starts(h, tile, stride) for left in tile_starts(w, tile, stride)]
        if len(boxes) == 1:
            return self.sample_tile(y0, noise_fn) * 0.5 + 0.5
        s = self.sf
        canvas = y0.new_zeros(b, 3, s * h, s * w)
        weight = y0.new_zeros(1, 1, s * h, s * w)
        for group in (progress(iter(_batches(boxes, y0, tile, tile_batch))) if progress
                      else _batches(boxes, y0, tile, tile_batch)):
            patches = torch.cat([y0[..., top: top + tile, left: left + tile] for top, left in group])
            outs = self.sample_tile(patches, noise_fn).split(b)
            for (top, left), out in zip(group, outs):
                ph, pw = out.shape[-2:]
                wgt = gaussian_window(ph, pw, out.device) if blend == "gaussian" else out.new_ones(1, 1, ph, pw)
                canvas[..., s * top: s * top + ph, s * left: s * left + pw] += out * wgt
                weight[..., s * top: s * top + ph, s * left: s * left + pw] += wgt
        return (canvas / weight) * 0.5 + 0.5


def _batches(boxes: list[tuple[int, int]], y0: Tensor, tile: int, size: int) -> list[list[tuple[int, int]]]:
    """Consecutive tiles of equal shape, at most ``size`` per group (visiting order kept)."""
    h, w = y0.shape[-2:]
    groups: list[list[tuple[int, int]]] = []
    for top, left in boxes:
        shape = (min(tile, h - top), min(tile, w - left))
        last = groups[-1] if groups else None
        if last and len(last) < size and (min(tile, h - last[0][0]), min(tile, w - last[0][1])) == shape:
            last.append((top, left))
        else:
            groups.append([(top, left)])
    return groups
