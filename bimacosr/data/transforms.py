"""Geometric transforms of one training image [C, H, W] (docs/pipeline.md §6.1): flips, OpenCV-style
reflect-101 padding, random square crops and area (box-coverage) downscaling."""
from __future__ import annotations

import random

import torch
from torch import Tensor


def augment(img: Tensor, hflip: bool, rotation: bool, rng: random.Random) -> Tensor:
    """BasicSR ``augment``: horizontal flip with p 1/2 if ``hflip``; if ``rotation``, vertical flip and
    transpose (90-degree rotation with the flip), each with p 1/2. img: [C, H, W]."""
    do_hflip = hflip and rng.random() < 0.5
    do_vflip = rotation and rng.random() < 0.5
    do_rot90 = rotation and rng.random() < 0.5
    if do_hflip:
        img = img.flip(-1)
    if do_vflip:
        img = img.flip(-2)
    if do_rot90:
        img = img.transpose(-1, -2)
    return img


def reflect101_index(n: int, total: int) -> Tensor:
    """[total] source indices of a length-``n`` axis extended at the end with OpenCV's
    BORDER_REFLECT_101 (``abcd`` -> ``abcdcbab...``, edge not repeated; ``n == 1`` repeats)."""
    if n == 1:
        return torch.zeros(total, dtype=torch.long)
    idx = torch.arange(total) % (2 * (n - 1))
    return torch.where(idx < n, idx, 2 * (n - 1) - idx)


def pad_to_square(img: Tensor, size: int) -> Tensor:
    """Pad [C, H, W] bottom/right with reflect-101 until both sides are >= ``size`` (each round by at
    most the current side, as the original's cv2.copyMakeBorder loop)."""
    h, w = img.shape[-2:]
    while h < size or w < size:
        pad_h, pad_w = min(max(0, size - h), h), min(max(0, size - w), w)
        img = img[:, reflect101_index(h, h + pad_h)][:, :, reflect101_index(w, w + pad_w)]
        h, w = img.shape[-2:]
    return img


def random_crop(img: Tensor, size: int, rng: random.Random) -> Tensor:
    """A random [C, size, size] crop of [C, H, W] (H, W >= size; top then left drawn only when the
    image is larger than ``size`` on some side)."""
    h, w = img.shape[-2:]
    if h == size and w == size:
        return img
    top = rng.randint(0, h - size)
    left = rng.randint(0, w - size)
    return img[:, top:top + size, left:left + size]


def area_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float64 weights of area downscaling: output pixel ``o`` averages the input
    interval [o s, (o + 1) s), s = n_in / n_out, each input pixel weighted by its covered length."""
    scale = n_in / n_out
    start = torch.arange(n_out, dtype=torch.float64)[:, None] * scale
    pixel = torch.arange(n_in, dtype=torch.float64)[None]
    covered = torch.minimum(start + scale, pixel + 1) - torch.maximum(start, pixel)
    return covered.clamp(min=0) / scale


def area_resize(img: Tensor, size: int) -> Tensor:
    """Area-downscale [C, H, W] to [C, size, size] (H, W >= size), as OpenCV's INTER_AREA: exact box
    coverage, also for non-integer factors. Computed in float64, returned in the input dtype."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"area_resize only shrinks: {h}x{w} -> {size}x{size}")
    out = area_matrix(h, size) @ img.double() @ area_matrix(w, size).T
    return out.to(img.dtype)
