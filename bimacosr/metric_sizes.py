"""The image sizes each Table 1 metric can score, read from pyiqa 0.1.16's code and checked by
running its architectures (docs/pipeline.md §7.2).

An image outside a metric's limit gets no value for that metric, only a note such as
``too small for NIQE: 64×64 < 96 px``; the other metrics still score it. Sizes are W×H.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeLimit:
    """What one metric needs of an image: both sides >= ``min_side`` px and, with
    ``max_aspect``, longer side / shorter side < ``max_aspect``. ``why``: the cause in pyiqa."""

    min_side: int = 1
    max_aspect: float | None = None
    why: str = "any size"

    def note(self, label: str, width: int, height: int) -> str | None:
        """Why metric ``label`` cannot score a ``width``×``height`` image; None when it can."""
        if min(width, height) < self.min_side:
            return f"too small for {label}: {width}×{height} < {self.min_side} px"
        if self.max_aspect is not None and max(width, height) >= self.max_aspect * min(width, height):
            return f"too elongated for {label}: {width}×{height}, sides ≥ {self.max_aspect:g}:1"
        return None


_CLIP_RN50 = SizeLimit(31, why="CLIP RN50 downsamples 32x with floor rounding: a side of 30 px "
                               "ends at 0 px before the attention pooling")
SIZE_LIMITS: dict[str, SizeLimit] = {
    "psnr": SizeLimit(),
    "ssim": SizeLimit(11, why="11×11 Gaussian window, valid filtering (no padding)"),
    "lpips": SizeLimit(31, why="AlexNet (conv 11/4, three 3×3/2 max-pools) ends at 0 px below 31 px"),
    "dists": SizeLimit(why="VGG16 with padded L2 pooling: any size"),
    "fid": SizeLimit(why="every image is resized to 299×299 (clean mode): any size"),
    "niqe": SizeLimit(96, why="the image is cut into whole 96×96 blocks; a side under 96 px leaves none"),
    "musiq": SizeLimit(max_aspect=448, why="the longer side is resized to 224 px; the shorter one "
                                           "rounds to 0 px at 448:1"),
    "maniqa-pipal": SizeLimit(why="a shorter side <= 224 px is upsampled (bilinear) to 225 px before "
                                  "the 224×224 crops: any size"),
    "clipiqa": _CLIP_RN50,
    "clipiqa+": _CLIP_RN50,
}
"""Per ``evaluation.METRICS`` name (the same keys, checked by tests/test_metric_sizes.py)."""
