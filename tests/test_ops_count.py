"""Parameter / MAC counts against docs/denoiser.md §5 (full-size models on the meta device)."""
import pytest
import torch

from bimacosr.build import build_autoencoder, build_denoiser_from_config
from bimacosr.config import load_config
from bimacosr.ops_count import (
    complete_rule,
    count_autoencoder,
    count_denoiser,
    paper_rule,
)
from tests.conftest import REPO

CFG = load_config(REPO / "configs/BiMaCoSR.yaml")


@pytest.fixture(scope="module")
def fp():
    return count_denoiser(build_denoiser_from_config(CFG, "teacher", meta=True), 64)


@pytest.fixture(scope="module")
def bimaco():
    return count_denoiser(build_denoiser_from_config(CFG, "student", meta=True), 64)


def test_fp_unet(fp):
    assert fp.total_params == 118_593_583
    assert fp.binary_layers == 0
    assert fp.mac("fp_conv") == pytest.approx(46.885e9, rel=1e-3)
    assert fp.mac("fp_linear") == pytest.approx(3.239e9, rel=1e-3)
    assert fp.mac("attention") == pytest.approx(0.538e9, rel=1e-3)
    assert complete_rule(fp).ops == pytest.approx(50.66e9, rel=0.01)
    assert paper_rule(fp).params == complete_rule(fp).params == 118_593_583


def test_bimaco_parameter_categories(bimaco):
    assert bimaco.binary_layers == 178
    assert bimaco.total_params == 120_255_183
    assert bimaco.params == {
        "binary_weight": 118_421_504, "lrmb": 1_241_856, "smb_values": 202_880,
        "smb_indices": 405_760, "binary_bias": 78_912, "rprelu": 140_544, "move0": 54_528,
        "channel_threshold": 21_792, "groupnorm": 55_744, "rel_tables": 24_300, "fp_conv": 13_123}
    assert bimaco.alpha == 78_912


def test_bimaco_macs(bimaco):
    assert bimaco.mac("binary") == pytest.approx(50.071e9, rel=5e-3)
    assert bimaco.mac("fp_conv", "lora_conv") == pytest.approx(0.785e9, rel=5e-3)
    assert bimaco.mac("lora_linear") == pytest.approx(0.202e9, rel=5e-3)
    assert bimaco.mac("smb") == pytest.approx(0.160e9, rel=5e-3)
    assert bimaco.mac("attention") == pytest.approx(0.538e9, rel=5e-3)


def test_rules(bimaco):
    paper = paper_rule(bimaco)
    assert paper.params == pytest.approx(4.980e6, abs=1e3)
    assert paper.ops == pytest.approx(1.77e9, rel=5e-3)
    # docs/denoiser.md §5 storage table (no alpha there) and OPs with everything executed
    assert complete_rule(bimaco, include_alpha=False).params == pytest.approx(5.940e6, abs=1e3)
    lean = complete_rule(bimaco, index_bits=16, include_unused=False, include_alpha=False)
    assert lean.params == pytest.approx(5.661e6, abs=1e3)
    assert complete_rule(bimaco).params == pytest.approx(5.940e6 + 78_912, abs=1e3)
    assert complete_rule(bimaco).ops == pytest.approx(2.47e9, rel=5e-3)


def test_autoencoder_split_covers_every_parameter():
    with torch.device("meta"):
        vq = build_autoencoder(CFG, "meta", weights=False)
    encoder, decoder = count_autoencoder(vq, 64)
    total = sum(p.numel() for p in vq.parameters())
    assert encoder.total_params + decoder.total_params == total
    assert decoder.params["codebook"] == 8192 * 3
    # mid-block attention over all (64/4)^2 = 256 positions at 512 channels, in both stages
    assert encoder.mac("attention") == decoder.mac("attention") == 2 * 256**2 * 512
    assert decoder.mac("codebook") == 256 * 3 * 8192
