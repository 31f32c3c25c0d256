"""JPEG compression artefacts in torch: BasicSR's ``DiffJPEG(differentiable=False)``, op for op.

The image (zero-padded bottom/right to multiples of 16) is scaled to [0, 255], converted to YCbCr
(JPEG matrix, chroma shifted by 128), its chroma 2x2-average-pooled, every plane cut into 8x8 blocks,
DCT-transformed, divided by the standard luminance/chrominance tables times a quality factor,
rounded, multiplied back, inverse-transformed, merged, chroma upsampled by repetition, converted
back to RGB, clamped to [0, 255], divided by 255 and cropped. The float32 operations (``tensordot``
order, table products) follow the original so results match it to rounding.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_Y_TABLE = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float32).T
_C_TABLE = np.full((8, 8), 99, dtype=np.float32)
_C_TABLE[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]).T
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       dtype=np.float32).T
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]], dtype=np.float32).T


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> dict[str, Tensor]:
    """float32 tables on ``device``: quantisation tables [8, 8], colour matrices [3, 3] and shifts
    [3], DCT / inverse-DCT tensors [8, 8, 8, 8] with their scales [8, 8]."""
    x, y, u, v = np.meshgrid(*[np.arange(8)] * 4, indexing="ij")
    dct = np.cos((2 * x + 1) * u * np.pi / 16) * np.cos((2 * y + 1) * v * np.pi / 16)
    idct = np.cos((2 * u + 1) * x * np.pi / 16) * np.cos((2 * v + 1) * y * np.pi / 16)
    alpha = np.outer(*[np.array([1.0 / np.sqrt(2)] + [1] * 7)] * 2)
    arrays = {"y_table": _Y_TABLE, "c_table": _C_TABLE, "rgb_to_ycc": _RGB_TO_YCC, "ycc_to_rgb": _YCC_TO_RGB,
              "dct": dct, "dct_scale": alpha * 0.25, "idct": idct, "idct_alpha": alpha}
    out = {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device) for k, a in arrays.items()}
    out["ycc_shift"] = torch.tensor([0.0, 128.0, 128.0], device=device)
    out["rgb_shift"] = torch.tensor([0.0, -128.0, -128.0], device=device)
    return out


def quality_to_factor(quality: float | Tensor) -> float | Tensor:
    """JPEG quality (1..100) -> table multiplier: 5000/q/100 below 50, else (200 - 2q)/100
    (element-wise in the tensor's dtype for a tensor, in double for a Python number)."""
    if isinstance(quality, Tensor):
        return torch.where(quality < 50, 5000.0 / quality, 200.0 - quality * 2) / 100.0
    return (5000.0 / quality if quality < 50 else 200.0 - quality * 2) / 100.0


def _table(base: Tensor, factor: float | Tensor) -> Tensor:
    """Quantisation table times factor: [8, 8] for a scalar, [B, 1, 8, 8] for a [B] tensor."""
    if isinstance(factor, Tensor):
        b = factor.size(0)
        return base.expand(b, 1, 8, 8) * factor.view(b, 1, 1, 1)
    return base * factor


def _blocks(plane: Tensor) -> Tensor:
    """[B, H, W] -> [B, H*W/64, 8, 8] blocks in row-major block order."""
    b, h = plane.shape[:2]
    return plane.view(b, h // 8, 8, -1, 8).permute(0, 1, 3, 2, 4).contiguous().view(b, -1, 8, 8)


def _merge(blocks: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``_blocks``: [B, H*W/64, 8, 8] -> [B, H, W]."""
    b = blocks.shape[0]
    return blocks.view(b, height // 8, width // 8, 8, 8).permute(0, 1, 3, 2, 4).contiguous().view(b, height, width)


def _upsample2(plane: Tensor) -> Tensor:
    """[B, h, w] -> [B, 2h, 2w], every value repeated 2x2."""
    h, w = plane.shape[1:3]
    return plane.unsqueeze(-1).repeat(1, 1, 2, 2).view(-1, h * 2, w * 2)


def jpeg(img: Tensor, quality: float | Tensor) -> Tensor:
    """JPEG-compress and decode ``img`` [B, 3, H, W] (float32, RGB, [0, 1]).

    quality: one value for all images or a [B] tensor (one per image), 1..100.
    Returns [B, 3, H, W] in [0, 1] (not rounded to k/255). Not differentiable (hard rounding).
    """
    c = _constants(img.device)
    factor = quality_to_factor(quality)
    h, w = img.shape[-2:]
    x = F.pad(img, (0, -w % 16, 0, -h % 16), mode="constant", value=0)
    hp, wp = x.shape[-2:]

    image = (x * 255).permute(0, 2, 3, 1)
    ycc = (torch.tensordot(image, c["rgb_to_ycc"], dims=1) + c["ycc_shift"]).view(image.shape)
    chroma = ycc.permute(0, 3, 1, 2).clone()
    planes = {"y": ycc[:, :, :, 0]}
    for i, name in ((1, "cb"), (2, "cr")):
        pooled = F.avg_pool2d(chroma[:, i, :, :].unsqueeze(1), kernel_size=2, stride=(2, 2), count_include_pad=False)
        planes[name] = pooled.permute(0, 2, 3, 1).squeeze(3)

    decoded = {}
    for name, plane in planes.items():
        table = _table(c["y_table"] if name == "y" else c["c_table"], factor)
        coeffs = c["dct_scale"] * torch.tensordot(_blocks(plane) - 128, c["dct"], dims=2)
        coeffs = torch.round(coeffs.float() / table) * table
        pixels = 0.25 * torch.tensordot(coeffs * c["idct_alpha"], c["idct"], dims=2) + 128
        size = (hp, wp) if name == "y" else (int(hp / 2), int(wp / 2))
        decoded[name] = _merge(pixels, *size)

    ycc = torch.cat([decoded["y"].unsqueeze(3), _upsample2(decoded["cb"]).unsqueeze(3),
                     _upsample2(decoded["cr"]).unsqueeze(3)], dim=3)
    rgb = torch.tensordot(ycc + c["rgb_shift"], c["ycc_to_rgb"], dims=1).view(ycc.shape).permute(0, 3, 1, 2)
    return (rgb.clamp(0, 255) / 255)[:, :, :h, :w]
