"""Swin-UNet: manifests at full size, fixture parity, runtime sizes, shift mask, LQ resizing."""
import json

import pytest
import torch
import torch.nn.functional as F

from bimacosr.config import load_config, to_plain
from bimacosr.parity import check_file
from bimacosr.models import build_denoiser
from bimacosr.quant import QUANT_KEYS
from bimacosr.models.swin import SwinTransformerBlock, shift_window_mask
from tests.conftest import FIXTURES, REFERENCE, REPO, fixture_denoiser

TINY = dict(image_size=16, in_channels=6, model_channels=32, out_channels=3, cond_lq=True,
            attention_resolutions=[16], dropout=0, channel_mult=[1, 1], num_res_blocks=[1, 1],
            num_head_channels=16, use_scale_shift_norm=True, swin_depth=2, swin_embed_dim=32,
            window_size=8, mlp_ratio=2)


def manifest_of(model) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("section,manifest", [("model_teacher", "unet_fp_realsr.json"),
                                              ("model", "unet_bimacosr.json")])
def test_full_size_state_dict_equals_manifest(section, manifest):
    params = to_plain(load_config(REPO / "configs/BiMaCoSR.yaml")[section].params)
    with torch.device("meta"):
        model = build_denoiser(params)
    expected = json.loads((REFERENCE / "manifests" / manifest).read_text())
    got = manifest_of(model)
    assert got == expected
    assert list(got) == list(expected)  # same registration order as the released files


@pytest.mark.parametrize("name", ["fp_unet_forward.pt", "bimaco_unet_forward.pt"])
def test_forward_fixtures(name):
    checks = check_file(FIXTURES / "denoiser" / name)
    assert checks and all(c.passed for c in checks), [c.line() for c in checks if not c.passed]


@pytest.fixture(scope="module")
def fp_fixture():
    return fixture_denoiser("denoiser/fp_unet_forward.pt")


def reference_mask(h: int, w: int, ws: int, s: int) -> torch.Tensor:
    """docs/denoiser.md §2.4 written out with loops, independently of the vectorised version."""
    label = [8] * h if s == 0 else [6 if r < h - ws else 7 if r < h - s else 8 for r in range(h)]
    windows = []
    for wr in range(h // ws):
        for _ in range(w // ws):
            tok = [label[wr * ws + (i % ws)] for i in range(ws * ws)]
            windows.append([[0.0 if a == b else -100.0 for b in tok] for a in tok])
    return torch.tensor(windows)


@pytest.mark.parametrize("h,w,ws,s", [(16, 16, 8, 4), (32, 16, 8, 4), (16, 48, 8, 4), (8, 8, 8, 4), (64, 64, 8, 0)])
def test_shift_mask_is_the_originals(h, w, ws, s):
    assert torch.equal(shift_window_mask(h, w, ws, s), reference_mask(h, w, ws, s))


def test_standard_swin_mask_would_differ():
    # the quirky mask masks only the last window-row, the standard one also the last column
    mask = shift_window_mask(16, 16, 8, 4)
    assert mask[0].abs().sum() == 0 and mask[1].abs().sum() == 0 and mask[3].abs().sum() > 0


def test_runtime_size_differs_from_image_size_and_non_square(fp_fixture):
    model, data = fp_fixture
    torch.manual_seed(0)
    x, lq = torch.randn(1, 3, 32, 48), torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = model(x, torch.tensor([3]), lq=lq)
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()
    shifted = [m for m in model.modules() if isinstance(m, SwinTransformerBlock) and m.shift]
    assert shifted and all(torch.equal(m.runtime_mask(32, 48, x.device), shift_window_mask(32, 48, 8, 4))
                           for m in shifted)
    # the stored buffer is the construction-size mask, and it is not what the forward uses
    assert torch.equal(shifted[0].attn_mask, shift_window_mask(16, 16, 8, 4))


def test_input_not_multiple_of_window_raises(fp_fixture):
    model, _ = fp_fixture
    with pytest.raises(ValueError, match="divisible by its window"):
        model(torch.randn(1, 3, 24, 24), torch.tensor([1]), lq=torch.randn(1, 3, 24, 24))


def test_lq_at_quarter_size_is_nearest_upsampled(fp_fixture):
    model, data = fp_fixture
    x, t = data["inputs"]["x"], data["inputs"]["timesteps"]
    small = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        got = model(x, t, lq=small)
        want = model(x, t, lq=F.interpolate(small, scale_factor=4, mode="nearest"))
    assert torch.equal(got, want)


def test_lq_at_double_size_is_pixel_unshuffled():
    torch.manual_seed(1)
    model = build_denoiser({**TINY, "in_channels": 15}).eval()
    x, big = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = model(x, torch.tensor([2]), lq=big)
        want = model(x, torch.tensor([2]), lq=F.pixel_unshuffle(big, 2))
    assert torch.equal(got, want)


def test_timestep_zero_runs_fp_and_binary():
    torch.manual_seed(2)
    released = to_plain(load_config(REPO / "configs/BiMaCoSR.yaml").model.params)
    quant = {k: v for k, v in released.items() if k in QUANT_KEYS}
    for params in (TINY, {**TINY, **quant}):
        model = build_denoiser(params).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 14]), lq=torch.randn(2, 3, 16, 16))
        assert torch.isfinite(out).all()


def test_unknown_param_key_is_an_error():
    with pytest.raises(ValueError, match="unknown key.*num_res_block"):
        build_denoiser({**TINY, "num_res_block": 2})
