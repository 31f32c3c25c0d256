"""The parity runner itself: its checks compare every image of a batch."""
import torch

from bimacosr.imageio import to_uint8
from bimacosr.parity.pipeline import _uint8_check


def test_uint8_check_compares_every_image_of_a_batch():
    sr = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    want = torch.stack([torch.from_numpy(to_uint8(image)) for image in sr])
    assert _uint8_check("batch", sr, want).max_diff == 0
    other = want.clone()
    other[1] = 255 - other[1]  # only the second image differs
    assert _uint8_check("batch", sr, other).max_diff > 1
    assert _uint8_check("shape", sr, want[:1]).max_diff == float("inf")
