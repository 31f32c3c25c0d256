"""Real-ESRGAN degradation: fixture f parity, kernels, filtering, noise, JPEG, the full second-order
pipeline (sizes, range, quantisation, determinism) and the paired crop."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bimacosr.data.datasets import BLUR1, BLUR2
from bimacosr.data.degradation import (
    degrade,
    filter2d,
    gaussian_kernel_1d,
    paired_random_crop,
    random_add_gaussian_noise_pt,
    random_add_poisson_noise_pt,
    usm_sharp,
)
from bimacosr.data.jpeg import jpeg, quality_to_factor
from bimacosr.data.kernels import (
    KERNEL_TYPES,
    circular_lowpass_kernel,
    kernel_from_params,
    sample_final_sinc,
)
from bimacosr.parity import check_file
from tests.conftest import FIXTURES, REPO

OPTS = OmegaConf.load(REPO / "configs/BiMaCoSR.yaml").degradation


def smooth_images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[b, 3, size, size] smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").clamp(0, 1)


def batch_kernels(b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    np_rng, rng = np.random.default_rng(seed), random.Random(seed)
    k1 = [BLUR1.sample(np_rng, rng) for _ in range(b)]
    k2 = [BLUR2.sample(np_rng, rng) for _ in range(b)]
    sinc = [sample_final_sinc(0.8, 15, np_rng, rng) for _ in range(b)]
    return tuple(torch.from_numpy(np.stack(k)).float() for k in (k1, k2, sinc))


def run_degrade(gt: torch.Tensor, seed: int) -> torch.Tensor:
    k1, k2, sinc = batch_kernels(gt.size(0), seed)
    return degrade(gt, k1, k2, sinc, OPTS, generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))


def test_fixture_f_passes() -> None:
    checks = check_file(FIXTURES / "pipeline/f_degradation_ops.pt")
    assert len(checks) == 12 and all(c.passed for c in checks), "\n".join(c.line() for c in checks)


@pytest.mark.parametrize("kind", KERNEL_TYPES + ("gen_iso", "gen_aniso"))
def test_kernels_sum_to_one_and_are_symmetric(kind: str) -> None:
    k = kernel_from_params(kind, 11, 2.0, 0.8, 0.4, 1.5)
    assert k.shape == (11, 11) and abs(k.sum() - 1) < 1e-12 and (k > 0).all()
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point symmetric: conv2d == convolution
    if not kind.endswith("aniso"):
        np.testing.assert_allclose(k, k.T, atol=1e-15)


def test_unknown_kernel_type_and_missing_beta() -> None:
    with pytest.raises(ValueError, match="unknown kernel type 'box'"):
        kernel_from_params("box", 5, 1, 1, 0)
    with pytest.raises(ValueError, match="needs beta"):
        kernel_from_params("plateau_iso", 5, 1, 1, 0)


def test_sinc_kernel_padding_and_centre() -> None:
    k = circular_lowpass_kernel(np.pi / 2, 7, pad_to=13)
    assert k.shape == (13, 13) and abs(k.sum() - 1) < 1e-12 and k[6, 6] == k.max()
    assert (k[:3] == 0).all() and (k[:, -3:] == 0).all()


def test_sampled_kernels_sizes_sums_and_determinism() -> None:
    k1, k2, sinc = batch_kernels(24, seed=1)
    assert k1.shape == (24, 21, 21) and k2.shape == (24, 15, 15) and sinc.shape == (24, 15, 15)
    for k in (k1, k2, sinc):
        torch.testing.assert_close(k.double().sum((1, 2)), torch.ones(24, dtype=torch.float64), atol=1e-5, rtol=0)
    assert any((s == torch.eye(15)[7:8].T @ torch.eye(15)[7:8]).all() for s in sinc)  # some deltas (p 0.2)
    assert all(torch.equal(a, b) for a, b in zip(batch_kernels(24, 1), (k1, k2, sinc)))
    assert not torch.equal(batch_kernels(24, 2)[0], k1)


def test_filter2d_delta_is_identity_and_shared_equals_per_image() -> None:
    img = smooth_images(2, 32)
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    torch.testing.assert_close(filter2d(img, delta), img, atol=0, rtol=0)
    k = torch.from_numpy(kernel_from_params("aniso", 9, 2.0, 0.5, 0.3)).float()
    torch.testing.assert_close(filter2d(img, k), filter2d(img, k.expand(2, 9, 9)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="odd"):
        filter2d(img, torch.ones(4, 4))
    with pytest.raises(ValueError, match="3 kernels for a batch of 2"):
        filter2d(img, k.expand(3, 9, 9))


def test_gaussian_kernel_follows_opencv_sigma_rule() -> None:
    g = gaussian_kernel_1d(51)
    x = torch.arange(51, dtype=torch.float64) - 25
    want = torch.exp(-x**2 / (2 * 8.0**2))  # sigma = 0.3 * (25 - 1) + 0.8 = 8
    torch.testing.assert_close(g, want / want.sum(), atol=1e-15, rtol=0)
    assert gaussian_kernel_1d(5).tolist() == [0.0625, 0.25, 0.375, 0.25, 0.0625]


def test_usm_sharp_keeps_flat_images_and_range() -> None:
    flat = torch.full((1, 3, 60, 60), 0.4)
    torch.testing.assert_close(usm_sharp(flat), flat, atol=1e-6, rtol=0)
    sharp = usm_sharp(smooth_images(1, 60))
    assert 0 <= sharp.min() and sharp.max() <= 1


def test_jpeg_sizes_quality_and_scalar_vs_tensor() -> None:
    img = smooth_images(2, 40)[..., :37]
    out = jpeg(img, torch.tensor([90.0, 90.0]))
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, jpeg(img, 90.0), atol=1e-6, rtol=0)
    err = [(jpeg(img, q) - img).abs().mean().item() for q in (30.0, 60.0, 95.0)]
    assert err[0] > err[1] > err[2]
    assert quality_to_factor(25.0) == 2.0 and quality_to_factor(75.0) == 0.5
    quality = torch.tensor([25.0, 75.0])
    torch.testing.assert_close(quality_to_factor(quality), torch.tensor([2.0, 0.5]))
    jpeg(img, quality)
    assert quality.tolist() == [25.0, 75.0]  # unlike the original, the argument is not overwritten


@pytest.mark.parametrize("add", [
    lambda x, g: random_add_gaussian_noise_pt(x, (5, 20), 1.0, generator=g),
    lambda x, g: random_add_poisson_noise_pt(x, (0.5, 2.0), 1.0, generator=g),
])
def test_grey_noise_keeps_grey_images_grey(add) -> None:
    grey = smooth_images(2, 32)[:, :1].expand(2, 3, 32, 32)
    out = add(grey, torch.Generator().manual_seed(0))
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 1] == out[:, 2]).all()
    assert not torch.equal(out, grey) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(add(grey, torch.Generator().manual_seed(0)), out, atol=0, rtol=0)


def test_degrade_sizes_range_quantisation_and_determinism() -> None:
    gt = smooth_images(2, 64)
    for seed in range(6):  # different seeds walk different branches (second order, final order)
        lq = run_degrade(gt, seed)
        assert lq.shape == (2, 3, 16, 16) and torch.isfinite(lq).all()
        assert 0 <= lq.min() and lq.max() <= 1
        torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)
        torch.testing.assert_close(run_degrade(gt, seed), lq, atol=0, rtol=0)
    assert not torch.equal(run_degrade(gt, 0), run_degrade(gt, 1))


def test_degrade_leaves_global_rngs_alone() -> None:
    torch.manual_seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    run_degrade(smooth_images(1, 64), 3)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_paired_random_crop() -> None:
    gt, lq = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 16, 16)
    rng = random.Random(0)
    state = rng.getstate()
    g2, l2 = paired_random_crop(gt, lq, 64, 4, rng)
    assert torch.equal(g2, gt) and torch.equal(l2, lq) and rng.getstate() != state  # draws like BasicSR
    g3, l3 = paired_random_crop(gt, lq, 32, 4, random.Random(1))
    assert g3.shape[-2:] == (32, 32) and l3.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="is not 4x"):
        paired_random_crop(gt, lq[..., :15], 32, 4, rng)
