"""Side-by-side comparison pictures (``inference_quant.py --compare``): people look before they read
numbers.

A panel has two rows, each tile under a text label, tiles and rows split by thin white
separators::

    LR nearest xs | bicubic xs | SR            (a red box marks where the crop comes from)
    the same detail crop of each of the three, zoomed x2 (nearest), its SR pixel window in the label

The crop is the window of the SR (a quarter of its area by default) with the most detail: the
largest mean gradient magnitude of its luma. Labels grow with the panel (:func:`label_height`), so
they stay readable when a large panel is shown scaled down to a screen. :func:`panel` lays out any
rows of labelled tiles (the trainer's validation grids use it too).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from bimacosr.imageio import write_image

__all__ = ["LABEL_H", "SEP", "ZOOM", "BOX", "compare_panel", "detail_window", "label_height", "panel",
           "save_compare"]

LABEL_H = 22  # height of the label strip above each tile (px) in panels up to SCREEN_W wide
SCREEN_W = 1280  # wider panels get labels LABEL_H * width / SCREEN_W high: the same size once fitted to it
FONT_PER_LABEL_H = 16 / 22  # font size (px) per px of label strip
SEP = 2  # width of the separators between tiles and rows (px)
ZOOM = 2  # nearest-neighbour zoom of the crops
BOX = 2  # line width of the red box marking the crop on the full views (px)
BACKGROUND = 1.0  # label strips and separators are white; labels are black


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


def label_height(width: int) -> int:
    """Height (px) of the label strips of a panel ``width`` px wide: ``LABEL_H`` up to ``SCREEN_W``,
    then in proportion (a 3076 px wide panel of a 256² input gets 53 px, 38 px text)."""
    return max(LABEL_H, round(LABEL_H * width / SCREEN_W))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(text: str, width: int, height: int) -> Tensor:
    """A [3, height, width] white strip with ``text`` in black (clipped to the width)."""
    strip = Image.new("L", (width, height), 255)
    font = _font(round(height * FONT_PER_LABEL_H))
    ImageDraw.Draw(strip).text((max(2, height // 11), 0), text, fill=0, font=font)
    return torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).expand(3, -1, -1)


def panel(rows: list[list[tuple[str | None, Tensor]]]) -> Tensor:
    """Rows of labelled tiles ``(label or None, [3, h, w] in [0, 1])`` -> one ``[3, H, W]`` image:
    tiles of a row share their height and sit side by side under label strips of
    :func:`label_height` (of the panel's width; blank for a None label; no strips in a row without
    labels); SEP px of white between tiles and between rows, rows right-padded."""
    width = max(sum(img.shape[2] for _, img in tiles) + SEP * (len(tiles) - 1) for tiles in rows)
    strip_h = label_height(width)
    built = []
    for tiles in rows:
        labelled = any(text is not None for text, _ in tiles)
        parts = []
        for i, (text, img) in enumerate(tiles):
            tile = torch.cat([_label(text or "", img.shape[2], strip_h), img], dim=1) if labelled else img
            if i:
                parts.append(torch.full((3, tile.shape[1], SEP), BACKGROUND))
            parts.append(tile)
        built.append(torch.cat(parts, dim=2))
    out = []
    for i, r in enumerate(built):
        if i:
            out.append(torch.full((3, SEP, width), BACKGROUND))
        out.append(F.pad(r, (0, width - r.shape[2]), value=BACKGROUND))
    return torch.cat(out, dim=1)


def draw_box(img: Tensor, y: int, x: int, h: int, w: int, width: int = BOX) -> Tensor:
    """A copy of ``img`` ([3, H, W]) with a red ``width``-px outline inside the window."""
    out = img.clone()
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    for top, left, hh, ww in ((y, x, width, w), (y + h - width, x, width, w),
                              (y, x, h, width), (y, x + w - width, h, width)):
        out[:, max(top, 0):top + hh, max(left, 0):left + ww] = red
    return out


def compare_panel(lr: Tensor, sr: Tensor, *, crop: int | None = None) -> Tensor:
    """Build the comparison panel: [3, H, W] float32 in [0, 1], ready for ``write_image``.

    lr: [1, 3, h, w] in [0, 1]; sr: [1, 3, s*h, s*w] in [0, 1] for an integer scale s (4 for
    BiMaCoSR). Top row: LR nearest xs | bicubic xs (torch, clamped) | SR, each s*h x s*w. Bottom
    row: the same window of each, zoomed x``ZOOM``; the window is ``crop`` x ``crop`` SR pixels
    (clipped to the image), by default half the SR height by half its width, placed by
    ``detail_window`` and outlined in red (BOX px, inside the window) on the top row; the crops'
    labels name the window in SR pixels (``x 6-29, y 40-71``). Tiles sit under labels of
    :func:`label_height`, separated by SEP px of white.
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
    window = f"x {x}-{x + cw - 1}, y {y}-{y + ch - 1}"
    zoomed = [(f"{name.split()[0]} crop x{ZOOM} ({window})",
               img[:, y:y + ch, x:x + cw].repeat_interleave(ZOOM, 1).repeat_interleave(ZOOM, 2))
              for name, img in columns]
    marked = [(name, draw_box(img, y, x, ch, cw)) for name, img in columns]
    return panel([marked, zoomed])


def save_compare(path: str | os.PathLike, lr: Tensor, sr: Tensor, *,
                 crop: int | None = None) -> Path:
    """Atomically write ``compare_panel(lr, sr, crop=crop)`` to ``path`` (format by extension)."""
    return write_image(path, compare_panel(lr, sr, crop=crop))
