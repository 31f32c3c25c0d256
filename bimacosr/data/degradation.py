"""Real-ESRGAN second-order degradation (docs/pipeline.md §6.2) in torch, as the ResShift/SinSR trainer
runs it on a batch: blur, resize, noise, JPEG; optionally a second such pass; then the final resize +
sinc filter + JPEG in random order and rounding to k/255.

All randomness is explicit: batch-level decisions (resize direction / scale / mode, noise type,
branch order) come from a ``random.Random``, per-image values (noise sigma / scale, grey flags, noise,
JPEG qualities) from a ``torch.Generator`` on the images' device. Saving both states is enough to
repeat a batch bit for bit.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bimacosr.data.jpeg import jpeg

RESIZE_MODES = ("area", "bilinear", "bicubic")
# OpenCV's fixed Gaussian weights for small odd sizes when sigma <= 0.
_SMALL_GAUSSIANS = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
                    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}


def filter2d(img: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise-filter ``img`` [B, C, H, W] with one kernel per image [B, k, k] or one shared kernel
    [k, k] / [1, k, k] (k odd; reflect padding k//2, cross-correlation as ``F.conv2d``)."""
    k = kernel.size(-1)
    if k % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {k}")
    b, c, h, w = img.size()
    img = F.pad(img, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    ph, pw = img.size()[-2:]
    if kernel.dim() == 2 or kernel.size(0) == 1:
        return F.conv2d(img.reshape(b * c, 1, ph, pw), kernel.view(1, 1, k, k), padding=0).view(b, c, h, w)
    if kernel.size(0) != b:
        raise ValueError(f"{kernel.size(0)} kernels for a batch of {b} images")
    kernel = kernel.view(b, 1, k, k).repeat(1, c, 1, 1).view(b * c, 1, k, k)
    return F.conv2d(img.reshape(1, b * c, ph, pw), kernel, groups=b * c).view(b, c, h, w)


def gaussian_kernel_1d(size: int, sigma: float = 0.0) -> Tensor:
    """[size] float64 Gaussian weights, sum 1, as OpenCV's ``getGaussianKernel``: ``sigma <= 0``
    means OpenCV's fixed weights for sizes 1-7 (odd) and ``0.3 * ((size - 1) / 2 - 1) + 0.8`` above."""
    if sigma <= 0 and size in _SMALL_GAUSSIANS:
        return torch.tensor(_SMALL_GAUSSIANS[size], dtype=torch.float64)
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(x * x) / (2 * sigma * sigma))
    return weights / weights.sum()


def usm_sharp(img: Tensor, weight: float = 0.5, threshold: float = 10, radius: int = 50) -> Tensor:
    """Unsharp masking (BasicSR ``USMSharp``) of ``img`` [B, C, H, W] in [0, 1].

    Blur with a (radius, rounded up to odd) Gaussian; residual = img - blur; where |residual| * 255 >
    threshold the image is sharpened to clamp(img + weight * residual, 0, 1), blended with a blurred
    version of that mask. Returns [B, C, H, W] in [0, 1].
    """
    size = radius + 1 if radius % 2 == 0 else radius
    g = gaussian_kernel_1d(size)
    kernel = torch.outer(g, g).to(img.dtype).to(img.device)
    residual = img - filter2d(img, kernel)
    mask = (torch.abs(residual) * 255 > threshold).to(img.dtype)
    soft_mask = filter2d(mask, kernel)
    sharp = torch.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def _per_image_uniform(img: Tensor, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    """[B] values ~ U(lo, hi) in the image dtype."""
    return torch.rand(img.size(0), dtype=img.dtype, device=img.device, generator=generator) * (hi - lo) + lo


def _gray_flags(img: Tensor, gray_prob: float, generator: torch.Generator) -> Tensor:
    """[B, 1, 1, 1] 1.0 where an image gets grey (channel-shared) noise, with probability gray_prob."""
    u = torch.rand(img.size(0), dtype=img.dtype, device=img.device, generator=generator)
    return (u < gray_prob).to(img.dtype).view(-1, 1, 1, 1)


def random_add_gaussian_noise_pt(img: Tensor, sigma_range: Sequence[float], gray_prob: float, *,
                                 generator: torch.Generator) -> Tensor:
    """Add Gaussian noise, sigma ~ U(sigma_range) / 255 per image, grey with ``gray_prob``; clamp to
    [0, 1]. The grey noise field is shared by all images of the batch (BasicSR draws one [H, W] field
    and scales it per image). img: [B, C, H, W] in [0, 1]."""
    b, _, h, w = img.size()
    sigma = _per_image_uniform(img, sigma_range[0], sigma_range[1], generator).view(b, 1, 1, 1)
    gray = _gray_flags(img, gray_prob, generator)
    noise_gray = None
    if torch.sum(gray) > 0:
        noise_gray = (torch.randn(h, w, dtype=img.dtype, device=img.device, generator=generator)
                      * sigma / 255.0).view(b, 1, h, w)
    noise = torch.randn(*img.size(), dtype=img.dtype, device=img.device, generator=generator) * sigma / 255.0
    if noise_gray is not None:
        noise = noise * (1 - gray) + noise_gray * gray
    return torch.clamp(img + noise, 0, 1)


def _poisson_noise(img: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(rounded image, Poisson noise) with the per-image number of levels 2^ceil(log2(#unique))."""
    img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    levels = [2 ** math.ceil(math.log2(len(torch.unique(img[i])))) for i in range(img.size(0))]
    vals = img.new_tensor(levels).view(-1, 1, 1, 1)
    return img, torch.poisson(img * vals, generator=generator) / vals - img


def random_add_poisson_noise_pt(img: Tensor, scale_range: Sequence[float], gray_prob: float, *,
                                generator: torch.Generator) -> Tensor:
    """Add Poisson noise scaled by ~ U(scale_range) per image, grey (from the luma 0.2989 R +
    0.587 G + 0.114 B) with ``gray_prob``; clamp to [0, 1]. img: [B, 3, H, W] in [0, 1]."""
    b, _, h, w = img.size()
    scale = _per_image_uniform(img, scale_range[0], scale_range[1], generator).view(b, 1, 1, 1)
    gray = _gray_flags(img, gray_prob, generator)
    noise_gray = None
    if torch.sum(gray) > 0:
        r, g, bl = img.unbind(dim=-3)
        luma = (0.2989 * r + 0.587 * g + 0.114 * bl).to(img.dtype).unsqueeze(-3)
        noise_gray = _poisson_noise(luma, generator)[1].expand(b, 3, h, w)
    noise = _poisson_noise(img, generator)[1]
    if noise_gray is not None:
        noise = noise * (1 - gray) + noise_gray * gray
    return torch.clamp(img + noise * scale, 0, 1)


def _add_noise(out: Tensor, opts: Mapping[str, Any], suffix: str, *, generator: torch.Generator,
               rng: random.Random) -> Tensor:
    """Gaussian with ``gaussian_noise_prob{suffix}`` else Poisson noise (options of one order)."""
    gray_prob = opts[f"gray_noise_prob{suffix}"]
    if rng.random() < opts[f"gaussian_noise_prob{suffix}"]:
        return random_add_gaussian_noise_pt(out, opts[f"noise_range{suffix}"], gray_prob, generator=generator)
    return random_add_poisson_noise_pt(out, opts[f"poisson_scale_range{suffix}"], gray_prob, generator=generator)


def _random_scale(opts: Mapping[str, Any], suffix: str, rng: random.Random) -> float:
    """Resize scale: up ~ U(1, hi), down ~ U(lo, 1) or keep 1, with ``resize_prob{suffix}``."""
    direction = rng.choices(["up", "down", "keep"], opts[f"resize_prob{suffix}"])[0]
    lo, hi = opts[f"resize_range{suffix}"]
    if direction == "up":
        return rng.uniform(1, hi)
    return rng.uniform(lo, 1) if direction == "down" else 1.0


def _jpeg(out: Tensor, quality_range: Sequence[float], generator: torch.Generator) -> Tensor:
    """JPEG with quality ~ U(quality_range) per image, input clamped to [0, 1]."""
    quality = _per_image_uniform(out, quality_range[0], quality_range[1], generator)
    return jpeg(torch.clamp(out, 0, 1), quality)


def _resize(out: Tensor, size: tuple[int, int], rng: random.Random) -> Tensor:
    """Resize to ``size`` with a random mode of RESIZE_MODES."""
    return F.interpolate(out, size=size, mode=rng.choice(RESIZE_MODES))


@torch.no_grad()
def degrade(gt: Tensor, kernel1: Tensor, kernel2: Tensor, sinc_kernel: Tensor, opts: Mapping[str, Any], *,
            generator: torch.Generator, rng: random.Random) -> Tensor:
    """Second-order degradation of a GT batch (docs/pipeline.md §6.2 steps 2-8).

    gt: [B, 3, H, W] in [0, 1]; kernel1 [B, k1, k1], kernel2 [B, k2, k2], sinc_kernel [B, k3, k3] on
    the same device (from RealESRGANDataset). opts: the config's ``degradation`` section (``sf`` an
    int; ``use_sharp`` and ``resize_back`` are the caller's business). Returns the LQ batch
    [B, 3, H // sf, W // sf], values k/255 in [0, 1].
    """
    sf = int(opts["sf"])
    ori_h, ori_w = gt.shape[-2:]
    # first order
    out = filter2d(gt, kernel1)
    out = F.interpolate(out, scale_factor=_random_scale(opts, "", rng), mode=rng.choice(RESIZE_MODES))
    out = _add_noise(out, opts, "", generator=generator, rng=rng)
    out = _jpeg(out, opts["jpeg_range"], generator)
    # second order
    if rng.random() < opts["second_order_prob"]:
        if rng.random() < opts["second_blur_prob"]:
            out = filter2d(out, kernel2)
        scale = _random_scale(opts, "2", rng)
        out = _resize(out, (int(ori_h / sf * scale), int(ori_w / sf * scale)), rng)
        out = _add_noise(out, opts, "2", generator=generator, rng=rng)
    # final resize + sinc filter and JPEG, in random order
    if rng.random() < 0.5:
        out = filter2d(_resize(out, (ori_h // sf, ori_w // sf), rng), sinc_kernel)
        out = _jpeg(out, opts["jpeg_range2"], generator)
    else:
        out = _jpeg(out, opts["jpeg_range2"], generator)
        out = filter2d(_resize(out, (ori_h // sf, ori_w // sf), rng), sinc_kernel)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def paired_random_crop(gt: Tensor, lq: Tensor, gt_size: int, sf: int, rng: random.Random) -> tuple[Tensor, Tensor]:
    """Aligned random crops: GT [.., gt_size, gt_size] and LQ [.., gt_size // sf, gt_size // sf] from
    gt [B, C, H, W] and lq [B, C, H / sf, W / sf] (draws top then left with ``rng`` even when the
    crop is the whole image, as BasicSR)."""
    h_lq, w_lq = lq.shape[-2:]
    h_gt, w_gt = gt.shape[-2:]
    lq_size = gt_size // sf
    if h_gt != h_lq * sf or w_gt != w_lq * sf:
        raise ValueError(f"GT {h_gt}x{w_gt} is not {sf}x the LQ {h_lq}x{w_lq}")
    if h_lq < lq_size or w_lq < lq_size:
        raise ValueError(f"LQ {h_lq}x{w_lq} is smaller than the patch {lq_size}x{lq_size}")
    top = rng.randint(0, h_lq - lq_size)
    left = rng.randint(0, w_lq - lq_size)
    lq = lq[..., top:top + lq_size, left:left + lq_size]
    gt = gt[..., top * sf:top * sf + gt_size, left * sf:left * sf + gt_size]
    return gt, lq
