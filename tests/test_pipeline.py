"""SR pipeline: fixtures (one-step plain/chopped, teacher sampling), padding, tiling, blending."""
import pytest
import torch
import torch.nn.functional as F

from bimacosr.parity import check_file
from bimacosr.pipeline import pad_to_multiple, tile_starts
from bimacosr.smoke import downscale, photo
from tests.conftest import FIXTURES


@pytest.mark.parametrize("name", ["a_vq_autoencoder.pt", "b_eta_schedule.pt", "c_one_step_inference.pt",
                                  "c2_one_step_chopped.pt", "d_teacher_multistep.pt"])
def test_pipeline_fixtures(name):
    checks = check_file(FIXTURES / "pipeline" / name)
    assert checks and all(c.passed for c in checks), [c.line() for c in checks if not c.passed]


@pytest.mark.parametrize("h,w", [(40, 48), (33, 64), (64, 64), (65, 70)])
def test_padding_reflects_like_the_original_where_it_can(h, w):
    x = torch.randn(1, 3, h, w)
    out = pad_to_multiple(x, 64)
    want = F.pad(x, (0, -w % 64, 0, -h % 64), mode="reflect")
    assert torch.equal(out, want)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 5), (20, 32), (7, 100)])
def test_padding_works_for_any_size(h, w):
    x = torch.randn(1, 3, h, w)
    out = pad_to_multiple(x, 64)
    assert out.shape[-2] % 64 == 0 and out.shape[-1] % 64 == 0 and torch.equal(out[..., :h, :w], x)


def test_tile_starts_follow_the_original_rule():
    assert tile_starts(200, 256, 224) == [0]
    assert tile_starts(600, 256, 224) == [0, 224, 344]
    assert tile_starts(56, 40, 32) == [0, 16]


def photo_lr() -> torch.Tensor:
    lr = downscale(photo("astronaut"), 4)[:64, :96].copy()
    return torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255


def column_jumps(sr: torch.Tensor) -> torch.Tensor:
    return (sr[0, :, :, 1:] - sr[0, :, :, :-1]).abs().mean(dim=(0, 1))


@pytest.mark.slow
def test_gaussian_blending_leaves_no_seam(tiny_pipeline):
    lr = photo_lr()  # 64 x 96 LR, tiles of 64 every 32: HR seams at columns 128 and 256
    ratios = {}
    for blend in ("average", "gaussian"):
        sr = tiny_pipeline(lr, tile=64, tile_stride=32, blend=blend, generator=torch.Generator().manual_seed(0))
        assert sr.shape == (1, 3, 256, 384) and 0 <= sr.min() and sr.max() <= 1
        jumps = column_jumps(sr)
        ratios[blend] = max(jumps[127], jumps[255]) / jumps.median()
    assert ratios["average"] > 3.0  # the original's uniform averaging shows the tile border
    assert ratios["gaussian"] < 1.5


def test_untiled_equals_single_tile_and_is_seeded(tiny_pipeline):
    lr = photo_lr()[..., :40, :40]
    a = tiny_pipeline(lr, tile=256, generator=torch.Generator().manual_seed(3))
    b = tiny_pipeline(lr, tile=256, generator=torch.Generator().manual_seed(3))
    c = tiny_pipeline(lr, tile=256, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (1, 3, 160, 160)


@pytest.mark.parametrize("size", [(1, 1), (3, 17)])
def test_any_lr_size_works(tiny_pipeline, size):
    sr = tiny_pipeline(torch.rand(1, 3, *size), generator=torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 4 * size[0], 4 * size[1]) and torch.isfinite(sr).all()


def test_bad_tiling_arguments(tiny_pipeline):
    with pytest.raises(ValueError, match="blend"):
        tiny_pipeline(torch.rand(1, 3, 8, 8), blend="median")
    with pytest.raises(ValueError, match="stride"):
        tiny_pipeline(torch.rand(1, 3, 8, 8), tile=16, tile_stride=32)
