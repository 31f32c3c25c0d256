"""``--precision fp32-fast`` (docs/deviations.md D16): inside ``fast_float32`` the autoencoder's
3x3 convolutions run NNPACK's Winograd transforms and its swish is one ``silu``, the same maths
within float32 rounding; outside it, and for every input the route does not take, float32 is the
original's operations bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bimacosr.models import autoencoder, layers
from bimacosr.models.autoencoder import ResnetBlock, Upsample, VQAutoencoder, norm_swish
from bimacosr.models.layers import WinogradConv2d, fast_float32, fast_float32_enabled
from tests.models.test_autoencoder import SMALL

pytestmark = pytest.mark.skipif(not layers.nnpack_available(),
                                reason="NNPACK needs x86-64 with AVX2 and FMA3, or ARM NEON")


def _spy(monkeypatch) -> list[tuple]:
    """Record the shapes NNPACK's convolution is called with (it still runs)."""
    calls: list[tuple] = []
    real = torch._nnpack_spatial_convolution

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", spy)
    return calls


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).square().mean().sqrt() / b.double().square().mean().sqrt()).item()


@pytest.mark.parametrize("shape", [(1, 64, 40, 40), (2, 32, 13, 9), (1, 16, 1, 1), (3, 8, 2, 3)])
def test_winograd_conv_is_the_convolution_within_float32_rounding(monkeypatch, shape):
    """Odd sizes, a 1x1 map, batches: Winograd's result lies as close to the float64 convolution as
    float32 rounding allows (measured rel. rms 3e-7 to 4e-6, the direct conv's 1e-7 to 1e-6);
    outside the context the module is ``nn.Conv2d`` bit for bit."""
    gen = torch.Generator().manual_seed(sum(shape))
    conv = WinogradConv2d(shape[1], 24).eval().requires_grad_(False)
    x = torch.randn(shape, generator=gen)
    calls = _spy(monkeypatch)
    plain = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.equal(conv(x), plain) and calls == []
    with fast_float32():
        assert fast_float32_enabled()
        y = conv(x)
    assert not fast_float32_enabled() and calls == [shape]
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert _rel_rms(y, ref) < 2e-5
    with fast_float32():
        assert torch.equal(conv(x), y)  # the same machine and input: the same bits


def test_a_large_map_is_convolved_in_bands_with_halo_rows(monkeypatch):
    """Above ``band_elements`` the rows go to NNPACK in bands (its workspace is ~3.6x its input);
    each band reads its neighbour rows, so no row, the bands' edges included, is off by more than
    float32 rounding. The bands are 16 rows here (at least 16, whatever the budget)."""
    conv = WinogradConv2d(16, 8).eval().requires_grad_(False)
    x = torch.randn(2, 16, 50, 37, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(WinogradConv2d, "band_elements", 1)
    calls = _spy(monkeypatch)
    with fast_float32():
        y = conv(x)
    assert calls == [(2, 16, 17, 37), (2, 16, 18, 37), (2, 16, 18, 37), (2, 16, 3, 37)]
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    row_err = (y.double() - ref).abs().amax(dim=(0, 1, 3)) / ref.abs().max()
    assert y.shape == ref.shape and row_err.max() < 2e-5  # a missing halo row would be off by ~1e-1
    assert _rel_rms(y, ref) < 2e-5


def test_winograd_conv_leaves_every_other_input_to_the_original(monkeypatch):
    """Gradients, a channels-last map, bf16, autocast, no NNPACK: ``nn.Conv2d``'s result, bit for bit."""
    conv = WinogradConv2d(16, 16).eval()
    x = torch.randn(1, 16, 12, 12)
    calls = _spy(monkeypatch)
    with fast_float32():
        xg = x.clone().requires_grad_(True)
        y = conv(xg)
        assert y.requires_grad and torch.equal(y, F.conv2d(xg, conv.weight, conv.bias, padding=1))
        y.sum().backward()
        assert xg.grad is not None
        with torch.no_grad():
            xc = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(conv(xc), F.conv2d(xc, conv.weight, conv.bias, padding=1))
            half = WinogradConv2d(16, 16).bfloat16().eval()
            assert conv(x).dtype == torch.float32 and half(x.bfloat16()).dtype == torch.bfloat16
            assert calls == [(1, 16, 12, 12)]  # only the plain float32 call above
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert conv(x).dtype == torch.bfloat16
            monkeypatch.setattr(layers, "nnpack_available", lambda: False)
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert calls == [(1, 16, 12, 12)]


def test_a_failing_nnpack_call_falls_back_with_one_notice(monkeypatch, capsys):
    conv = WinogradConv2d(8, 8).eval().requires_grad_(False)
    x = torch.randn(1, 8, 6, 6)

    def fail(*_):
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", fail)
    monkeypatch.setattr(layers, "_nnpack_failure", None)
    with fast_float32():
        outs = [conv(x), conv(x)]
    plain = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert all(torch.equal(o, plain) for o in outs)
    err = capsys.readouterr().err
    assert err.count("NNPACK's Winograd convolution failed") == 1 and "oneDNN" in err


def test_norm_swish_is_one_silu_in_fast_float32():
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    x = torch.randn(2, 32, 6, 5)
    kept = x.clone()
    with torch.no_grad(), fast_float32():
        out = norm_swish(norm, x)
    assert torch.equal(x, kept) and torch.equal(out, F.silu(norm(x)))
    h = norm(x)
    torch.testing.assert_close(out, h * torch.sigmoid(h), rtol=0, atol=4e-7)  # measured 2e-7 at most
    assert torch.equal(norm_swish(norm, x), h * torch.sigmoid(h))  # outside: the original's two operations


def test_fast_float32_autoencoder_is_float32_within_its_rounding(monkeypatch):
    """A tiny random autoencoder (two Upsamples, two mid attentions): every ResnetBlock and
    Upsample conv goes through NNPACK (the attention hands them NCHW maps), the attention runs in
    query blocks, and encode / decode stay within float32 rounding of the original's operations
    (released size at 256²: rel. rms ~1e-6, 111-119 dB PSNR; the fixture's outputs move by
    up to 6.5e-5, bf16 by ~0.1)."""
    torch.manual_seed(12)
    vq = VQAutoencoder(**SMALL).eval().requires_grad_(False)
    convs = sum(isinstance(m, WinogradConv2d) for m in vq.modules())
    assert convs == sum(isinstance(m, ResnetBlock) for m in vq.modules()) * 2 + sum(
        isinstance(m, Upsample) for m in vq.modules())
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    calls = _spy(monkeypatch)
    attends = []
    real_attend = autoencoder._attend_tokens
    monkeypatch.setattr(autoencoder, "_attend_tokens", lambda *a: attends.append(1) or real_attend(*a))
    with torch.inference_mode():
        ref_h = vq.encode(x)
        ref_y = vq.decode(ref_h)
        assert calls == []
        with fast_float32():
            h = vq.encode(x)
            y = vq.decode(ref_h)
    assert len(calls) == convs and len(attends) == 2
    assert _rel_rms(h, ref_h) < 1e-5 and _rel_rms(y, ref_y) < 1e-5
    assert (y - ref_y).abs().max() < 1e-4

