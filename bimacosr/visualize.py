"""Side-by-side comparison pictures (``inference_quant.py --compare``): people look before they read
numbers.

A panel has two rows, each tile under a small text label, tiles and rows split by thin white
separators::

    LR nearest xs | bicubic xs | SR
    the same detail crop of each of the three, zoomed x2 (nearest)

The crop is the window of the SR (a quarter of its area by default) with the most detail: the
largest mean gradient magnitude of its luma.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from bimacosr.imageio import write_image

__all__ = ["LABEL_H", "SEP", "ZOOM", "compare_panel", "detail_window", "save_compare"]

LABEL_H = 12  # height of the label strip above each tile (px)
SEP = 2  # width of the separators between tiles and rows (px)
ZOOM = 2  # nearest-neighbour zoom of the crops
BACKGROUND = 1.0  # label strips and separators are white; labels are black
_FONT = ImageFont.load_default()


def _rgb(x: Tensor, name: str) -> Tensor:
    """[1, 3, h, w] -> float32 CPU [3, h, w] clamped to [0, 1]."""
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"{name} must be [1, 3, H, W], got {tuple(x.shape)}")
    return x[0].detach().to("cpu", torch.float32).clamp(0.0, 1.0)


def detail_window(sr: Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (y, x) of the ``size`` = (h, w) window of ``sr`` ([3, H, W], [0, 1]) with the
    largest mean gradient magnitude (|dx| + |dy| of the BT.601 luma); the first one on ties."""
    luma = torch.tensordot(torch.tensor([0.299, 0.587, 0.114]), sr, dims=1).double()
    energy = torch.zeros_like(luma)
    energy[:, :-1] += (luma[:, 1:] - luma[:, :-1]).abs()
    energy[:-1, :] += (luma[1:, :] - luma[:-1, :]).abs()
    integral = F.pad(energy.cumsum(0).cumsum(1), (1, 0, 1, 0))
    (h, w), (big_h, big_w) = size, luma.shape
    ny, nx = big_h - h + 1, big_w - w + 1
    sums = (integral[h:, w:] - integral[:ny, w:] - integral[h:, :nx] + integral[:ny, :nx])
    y, x = divmod(int(sums.argmax()), nx)
    return y, x


def _label(text: str, width: int) -> Tensor:
    """A [3, LABEL_H, width] white strip with ``text`` in black (clipped to the width)."""
    strip = Image.new("L", (width, LABEL_H), 255)
    ImageDraw.Draw(strip).text((2, 0), text, fill=0, font=_FONT)
    return torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).expand(3, -1, -1)


def _row(tiles: list[tuple[str, Tensor]]) -> Tensor:
    """Labelled tiles ([3, h, w_i] each, same h) side by side with SEP-wide separators."""
    parts = []
    for i, (text, img) in enumerate(tiles):
        if i:
            parts.append(torch.full((3, LABEL_H + img.shape[1], SEP), BACKGROUND))
        parts.append(torch.cat([_label(text, img.shape[2]), img], dim=1))
    return torch.cat(parts, dim=2)


def _stack(rows: list[Tensor]) -> Tensor:
    """Rows stacked top to bottom with SEP-high separators, right-padded to the widest."""
    width = max(r.shape[2] for r in rows)
    parts = []
    for i, r in enumerate(rows):
        if i:
            parts.append(torch.full((3, SEP, width), BACKGROUND))
        parts.append(F.pad(r, (0, width - r.shape[2]), value=BACKGROUND))
    return torch.cat(parts, dim=1)


def compare_panel(lr: Tensor, sr: Tensor, *, crop: int | None = None) -> Tensor:
    """Build the comparison panel: [3, H, W] float32 in [0, 1], ready for ``write_image``.

    lr: [1, 3, h, w] in [0, 1]; sr: [1, 3, s*h, s*w] in [0, 1] for an integer scale s (4 for
    BiMaCoSR). Top row: LR nearest xs | bicubic xs (torch, clamped) | SR, each s*h x s*w. Bottom
    row: the same window of each, zoomed x``ZOOM``; the window is ``crop`` x ``crop`` SR pixels
    (clipped to the image), by default half the SR height by half its width, placed by
    ``detail_window``. Tiles sit under LABEL_H-high labels, separated by SEP px of white.
    """
    low, high = _rgb(lr, "lr"), _rgb(sr, "sr")
    (h, w), (big_h, big_w) = low.shape[1:], high.shape[1:]
    s = big_h // h
    if s < 1 or (big_h, big_w) != (s * h, s * w):
        raise ValueError(f"sr {big_h}x{big_w} is not an integer upscale of lr {h}x{w}")
    if crop is not None and crop < 1:
        raise ValueError(f"crop must be >= 1, got {crop}")
    nearest = F.interpolate(low[None], size=(big_h, big_w), mode="nearest")[0]
    bicubic = F.interpolate(low[None], size=(big_h, big_w), mode="bicubic",
                            align_corners=False)[0].clamp(0.0, 1.0)
    ch, cw = (max(1, big_h // 2), max(1, big_w // 2)) if crop is None else (
        min(crop, big_h), min(crop, big_w))
    y, x = detail_window(high, (ch, cw))
    columns = [(f"LR nearest x{s}", nearest), (f"bicubic x{s}", bicubic), ("SR", high)]
    zoomed = [(f"{name.split()[0]} crop x{ZOOM}",
               img[:, y:y + ch, x:x + cw].repeat_interleave(ZOOM, 1).repeat_interleave(ZOOM, 2))
              for name, img in columns]
    return _stack([_row(columns), _row(zoomed)])


def save_compare(path: str | os.PathLike, lr: Tensor, sr: Tensor, *,
                 crop: int | None = None) -> Path:
    """Atomically write ``compare_panel(lr, sr, crop=crop)`` to ``path`` (format by extension)."""
    return write_image(path, compare_panel(lr, sr, crop=crop))
