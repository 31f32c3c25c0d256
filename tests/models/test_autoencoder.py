"""VQ-f4 autoencoder: fixture parity, released-config structure, shapes, quantiser."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bimacosr.models import autoencoder
from bimacosr.parity import check_file
from bimacosr.models.autoencoder import (AttnBlock, ResnetBlock, Upsample, VQAutoencoder, VectorQuantizer, norm_swish,
                                         reduced_precision, residual)
from bimacosr.models.first_stage import decode_first_stage, encode_first_stage
from tests.conftest import FIXTURES

RELEASED = dict(embed_dim=3, n_embed=8192, ddconfig=dict(
    double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0, padding_mode="zeros"))

SMALL = dict(embed_dim=3, n_embed=16, ddconfig=dict(
    double_z=False, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0))


def test_fixture_a_passes() -> None:
    checks = check_file(FIXTURES / "pipeline" / "a_vq_autoencoder.pt")
    assert len(checks) == 9
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)


def test_released_config_structure() -> None:
    with torch.device("meta"):
        vq = VQAutoencoder(**RELEASED)
    n_params = sum(p.numel() for p in vq.parameters())
    assert abs(n_params / 1e6 - 55.3) <= 0.05, n_params
    keys = set(vq.state_dict())
    assert {"quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias",
            "post_quant_conv.weight", "post_quant_conv.bias", "encoder.conv_in.weight",
            "encoder.mid.attn_1.proj_out.weight", "decoder.conv_out.weight",
            "encoder.down.0.downsample.conv.weight", "decoder.up.2.upsample.conv.weight"} <= keys
    assert tuple(vq.state_dict()["quantize.embedding.weight"].shape) == (8192, 3)
    assert all(k.split(".")[0] in {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
               for k in keys)
    assert not any("temb_proj" in k or "conv_shortcut" in k for k in keys)
    assert not any(k.startswith("encoder.down.2.downsample") or k.startswith("decoder.up.0.upsample")
                   for k in keys)
    shortcuts = {k.rsplit(".nin_shortcut.", 1)[0] for k in keys if ".nin_shortcut." in k}
    assert shortcuts == {"encoder.down.1.block.0", "encoder.down.2.block.0",
                         "decoder.up.1.block.0", "decoder.up.0.block.0"}
    assert {k for k in keys if k.startswith("decoder.up.0.block.")} >= {
        f"decoder.up.0.block.{j}.conv1.weight" for j in range(3)}


def test_shapes_and_first_stage() -> None:
    torch.manual_seed(0)
    vq = VQAutoencoder(**SMALL).eval()
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        h = vq.encode(x)
        assert h.shape == (1, 3, 16, 12)
        assert vq.decode(h).shape == (1, 3, 64, 48)
        assert vq.decode(h, force_not_quantize=True).shape == (1, 3, 64, 48)
        lr = torch.rand(1, 3, 10, 14) * 2 - 1
        z = encode_first_stage(vq, lr, up_sample=True)
        assert z.shape == (1, 3, 10, 14) and z.dtype == torch.float32
        torch.testing.assert_close(encode_first_stage(vq, x, up_sample=False, scale_factor=2.0),
                                   2 * h, rtol=0, atol=0)
        torch.testing.assert_close(decode_first_stage(vq, 2 * h, scale_factor=2.0), vq.decode(h))
        # a float64 caller gets float64 back; the model stays float32
        assert encode_first_stage(vq, lr.double(), up_sample=True).dtype == torch.float64


def test_quantiser_picks_nearest_code() -> None:
    torch.manual_seed(1)
    vq = VQAutoencoder(**SMALL).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    codes = vq.quantize.embedding.weight.detach()
    z = torch.randn(2, 3, 5, 7)
    zq, idx = vq.quantize_latent(z)
    assert idx.shape == (2, 5, 7) and idx.dtype == torch.int64
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3).double()
    brute = torch.stack([((codes.double() - p) ** 2).sum(1).argmin() for p in flat]).reshape(2, 5, 7)
    assert torch.equal(idx, brute)
    torch.testing.assert_close(zq, codes[idx].permute(0, 3, 1, 2), rtol=0, atol=1e-6)
    # chunked distance computation gives the same answer; ties go to the first index
    vq.quantize.chunk = 4
    assert torch.equal(vq.quantize_latent(z)[1], idx)
    with torch.no_grad():
        vq.quantize.embedding.weight[5] = vq.quantize.embedding.weight[2]
    z_tie = codes[2].reshape(1, 3, 1, 1).clone()
    assert vq.quantize_latent(z_tie)[1].item() == 2


def test_code_search_is_float32_under_bf16_autocast() -> None:
    """A bf16 latent under autocast gets the codes float32 finds for the same values (the released
    codebook's size and width: 8192 codes of 3; a bf16 search picks other codes for many)."""
    torch.manual_seed(2)
    quantizer = VectorQuantizer(8192, 3)
    z = torch.randn(1, 3, 32, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = quantizer(z)[1]
        z_bf16_search = z.permute(0, 2, 3, 1).reshape(-1, 3) @ quantizer.embedding.weight.t()
    assert torch.equal(idx, quantizer(z.float())[1])
    e = quantizer.embedding.weight.detach()
    bf16_idx = ((e**2).sum(1) - 2 * z_bf16_search.float()).argmin(1)  # what autocast's product would pick
    assert z_bf16_search.dtype == torch.bfloat16 and (bf16_idx != idx.flatten()).sum() > 50


def test_straight_through_gradient() -> None:
    vq = VQAutoencoder(**SMALL)
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    zq, _ = vq.quantize_latent(z)
    zq.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_attention_blocks_match_unblocked() -> None:
    torch.manual_seed(2)
    attn = AttnBlock(32).eval()
    x = torch.randn(1, 32, 9, 11)
    with torch.no_grad():
        full = attn(x)
        attn.max_weights = 99 * 10  # 10 queries per block
        blocked = attn(x)
        ref = x + attn.proj_out(torch.nn.functional.scaled_dot_product_attention(
            *(m(attn.norm(x)).flatten(2).transpose(1, 2) for m in (attn.q, attn.k, attn.v))
        ).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(blocked, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-5)


def _sdpa_reference(attn: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The attention block in float64 through scaled_dot_product_attention (tokens (B, 1, HW, C))."""
    a = AttnBlock(x.shape[1]).double().eval()
    a.load_state_dict(attn.state_dict())
    xd = x.double()
    q, k, v = (m(a.norm(xd)).flatten(2).transpose(1, 2).unsqueeze(1) for m in (a.q, a.k, a.v))
    out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(x.shape)
    return xd + a.proj_out(out)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attention_below_float32_matches_sdpa_within_bf16_rounding(layout, monkeypatch) -> None:
    """bf16 (autocast): query blocks of token-major GEMMs equal SDPA to bf16 rounding, with any
    block size, at most the error of the original's operations under autocast; float32 never
    takes that path (the original's operations, bit for bit)."""
    torch.manual_seed(9)
    attn = AttnBlock(64).eval().requires_grad_(False).to(memory_format=layout)
    with torch.no_grad():
        for m in (attn.q, attn.k):
            m.weight.mul_(4.0)  # peaked weights: logits of a few units, as in the released model
    x = torch.randn(2, 64, 7, 9).contiguous(memory_format=layout)
    ref = _sdpa_reference(attn, x)
    outs = []
    attn.min_queries = 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for max_weights in (63 * 5, 63 * 16, 1 << 22):  # 5 and 16 queries per block, one block
            attn.max_weights_reduced = max_weights
            outs.append(attn(x))
        with monkeypatch.context() as m:
            m.setattr(autoencoder, "reduced_precision", lambda t: False)
            stock = attn(x)  # the original's operations under autocast
    err_stock = (stock.double() - ref).abs()
    for out in outs:
        assert out.shape == x.shape and out.dtype == torch.float32  # the residual sum with the float32 input
        err = (out.double() - ref).abs()
        assert err.max() <= 1.5 * err_stock.max() and err.square().mean() <= 1.2 * err_stock.square().mean()
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0.02)
    monkeypatch.setattr(autoencoder, "_attend_tokens", lambda *a: pytest.fail("float32 took the bf16 path"))
    with torch.no_grad():
        f32 = attn(x)
    torch.testing.assert_close(f32.double(), ref, rtol=0, atol=1e-5)


def test_attention_tokens_are_sdpa() -> None:
    """_attend_tokens in float32 (the path forced) equals SDPA to float rounding; in bf16 the
    logits are scaled before their one rounding and the weights rounded once."""
    torch.manual_seed(10)
    q, k, v = (torch.randn(2, 23, 32) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(autoencoder._attend_tokens(q, k, v, 4), ref, rtol=0, atol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref_b = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double())
    for block in (1, 7, 23):
        out = autoencoder._attend_tokens(qb, kb, vb, block)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref_b, rtol=0, atol=0.02)


def _original_upsample(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    return up.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_phase_convolution_is_the_same_maths(layout, monkeypatch) -> None:
    """The stride-2 transposed convolution of summed taps equals nearest-x2 + 3x3 conv: in float32
    (path forced) to float rounding, odd sizes, batch 2, either layout; the output keeps the
    input's layout."""
    torch.manual_seed(3)
    up = Upsample(32).eval().requires_grad_(False)
    x = torch.randn(2, 32, 7, 10).contiguous(memory_format=layout)
    ref = _original_upsample(up, x)
    assert torch.equal(up(x), ref)  # float32: the original's operations, bit for bit
    monkeypatch.setattr(autoencoder, "reduced_precision", lambda t: True)
    y = up(x)
    assert y.shape == (2, 32, 14, 20) and y.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6)


def test_upsample_under_bf16_matches_float32_within_bf16_rounding() -> None:
    """The phase form under bf16 is as far from float32 as the stock bf16 route, by rms: 1.0x with
    native bf16 (oneDNN's transposed conv rounds once); ~1.41x where PyTorch's own transposed conv
    runs (AVX2 only: each of the 4 phase taps' partial sums is rounded to bf16 before they are
    added, sqrt(2) by theory and measured 1.40-1.46x). A wrong fold is O(1) off. Max errors are
    not compared: both are about one bf16 ulp of the output and jump by whole ulps between CPUs."""
    torch.manual_seed(4)
    up = Upsample(64).eval().requires_grad_(False)
    x = torch.randn(1, 64, 8, 9)
    ref = _original_upsample(up, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = up(x)
        stock = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert fast.dtype == torch.bfloat16

    def rms(y: torch.Tensor) -> float:
        return (y.float() - ref).pow(2).mean().sqrt().item()

    assert rms(fast) <= 2 * rms(stock)
    assert (fast.float() - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert torch.equal(up(x.bfloat16()), fast)  # bf16 input without autocast: the same path


def test_upsample_in_a_half_precision_model() -> None:
    """The original's GPU setting (the whole autoencoder in float16), run here on CPU: kernels
    summed in float32 from the half weights, error of the order of the stock half path's. By rms:
    PyTorch's CPU transposed conv rounds each phase's partial sums to half before adding them,
    1.54-1.61x the stock rms over 12 seeds; the max ratio spread 1.7-2.8x over the same seeds."""
    torch.manual_seed(8)
    up = Upsample(32).eval().requires_grad_(False)
    x = torch.randn(1, 32, 6, 7)
    ref = _original_upsample(up, x)
    half = Upsample(32).eval().requires_grad_(False)
    half.load_state_dict(up.state_dict())
    half.half()
    with torch.no_grad():
        fast = half(x.half())
        stock = half.conv(F.interpolate(x.half(), scale_factor=2.0, mode="nearest"))
    assert fast.dtype == torch.float16 and fast.shape == (1, 32, 12, 14)

    def rms(y: torch.Tensor) -> float:
        return (y.float() - ref).pow(2).mean().sqrt().item()

    assert rms(fast) <= 2 * rms(stock)
    assert (fast.float() - ref).abs().max().item() < 0.005 * ref.abs().max().item()


def test_upsample_phase_kernels_follow_weight_changes() -> None:
    torch.manual_seed(5)
    up = Upsample(16).eval().requires_grad_(False)
    x = torch.randn(1, 16, 5, 6, dtype=torch.float64)
    x16 = x.to(torch.bfloat16)
    with torch.no_grad():
        first = up(x16)
        kept = up._eval_cache["kernel_torch.bfloat16"][1]
        assert torch.equal(up(x16), first)
        assert up._eval_cache["kernel_torch.bfloat16"][1] is kept  # built once, reused
        up.conv.weight.mul_(-1.0)
        up.conv.bias.mul_(-1.0)
        torch.testing.assert_close(up(x16), -first, rtol=0, atol=0)  # in-place change seen
        up.load_state_dict({k: v * 0.5 for k, v in up.state_dict().items()})
        torch.testing.assert_close(up(x16), -first / 2, rtol=0, atol=0)  # new values seen


def test_upsample_phase_path_gradient_equals_the_original(monkeypatch) -> None:
    """With trainable weights the phase kernels are rebuilt per call inside the graph (never kept),
    so the weight gradient is the original's."""
    torch.manual_seed(6)
    up = Upsample(8)
    x = torch.randn(1, 8, 5, 4)
    _original_upsample(up, x).square().sum().backward()
    ref = up.conv.weight.grad.clone()
    up.zero_grad()
    monkeypatch.setattr(autoencoder, "reduced_precision", lambda t: True)
    up(x).square().sum().backward()
    assert not getattr(up, "_eval_cache", {})  # nothing kept while recording gradients
    torch.testing.assert_close(up.conv.weight.grad, ref, rtol=1e-5, atol=1e-5)


def test_reduced_precision_and_norm_swish() -> None:
    x = torch.randn(2, 32, 6, 5)
    assert not reduced_precision(x) and not reduced_precision(x.double())
    assert reduced_precision(x.half()) and reduced_precision(x.bfloat16())
    assert not reduced_precision(torch.empty(2, device="meta"))  # no autocast there: no error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reduced_precision(x)
    with torch.autocast("cpu", enabled=False):
        assert not reduced_precision(x)
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    h = norm(x)
    assert torch.equal(norm_swish(norm, x), h * torch.sigmoid(h))  # float32: bit for bit
    xb = x.bfloat16()
    kept = xb.clone()
    with torch.no_grad():
        out = norm_swish(norm.bfloat16(), xb)
    assert torch.equal(xb, kept)  # the input is never touched; only the fresh normalised tensor
    assert torch.equal(out, F.silu(norm.bfloat16()(xb)))
    xg = xb.clone().requires_grad_(True)
    norm_swish(norm.bfloat16(), xg).float().sum().backward()  # not in place while recording
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_residual_in_place_is_the_plain_sum() -> None:
    torch.manual_seed(7)
    x, h = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    ref = x + h
    out = residual(x, h.clone())
    assert torch.equal(out, ref)
    hb = h.bfloat16()
    kept = hb.clone()
    mixed = residual(x, hb)  # the sum is float32: a new tensor, the bf16 branch output untouched
    assert mixed.dtype == torch.float32 and torch.equal(mixed, x + kept) and torch.equal(hb, kept)
    block = ResnetBlock(32, 64)
    xg = torch.randn(1, 32, 4, 4, requires_grad=True)
    block(xg).square().sum().backward()
    grad = xg.grad.clone()
    xg.grad = None
    plain = block.nin_shortcut(xg) + block.conv2(norm_swish(block.norm2, block.conv1(norm_swish(block.norm1, xg))))
    plain.square().sum().backward()
    assert torch.equal(xg.grad, grad)  # the in-place sum keeps the gradient exact


def test_bf16_autoencoder_matches_float32_within_bf16_rounding(monkeypatch) -> None:
    """A tiny random autoencoder (mid attention, two Upsamples): under bf16 autocast with
    channels-last weights the fast forms run and land as close to float32 as the original's
    operations under autocast; float32 takes none of them."""
    torch.manual_seed(11)
    vq = VQAutoencoder(**SMALL).eval().requires_grad_(False)
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    calls = {"attend": 0, "transposed": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(autoencoder, "_attend_tokens", spy("attend", autoencoder._attend_tokens))
    monkeypatch.setattr(autoencoder.F, "conv_transpose2d", spy("transposed", F.conv_transpose2d))
    with torch.no_grad():
        ref_h = vq.encode(x)
        ref_y = vq.decode(ref_h, force_not_quantize=True)
        assert calls == {"attend": 0, "transposed": 0}  # float32: the original's operations
        vq.to(memory_format=torch.channels_last)
        outs = {}
        for name in ("fast", "stock"):
            with monkeypatch.context() as m:
                if name == "stock":
                    m.setattr(autoencoder, "reduced_precision", lambda t: False)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    outs[name] = (vq.encode(x), vq.decode(ref_h, force_not_quantize=True))
            if name == "fast":
                assert calls == {"attend": 2, "transposed": 2}

    def rel_rms(a, b):
        return ((a.float() - b).square().mean().sqrt() / b.square().mean().sqrt()).item()

    for (fast, stock, ref) in zip(outs["fast"], outs["stock"], (ref_h, ref_y)):
        assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
        assert rel_rms(fast, ref) <= 1.2 * rel_rms(stock, ref) and rel_rms(fast, ref) < 0.05


def test_attention_query_blocks_hold_at_least_min_queries(monkeypatch) -> None:
    """The weight budget sets the block, but never below ``min_queries`` (smaller blocks slowed
    the GEMMs at the default tile's 65536 tokens)."""
    attn = AttnBlock(32).eval().requires_grad_(False)
    blocks = []
    real = autoencoder._attend_tokens
    monkeypatch.setattr(autoencoder, "_attend_tokens",
                        lambda q, k, v, block: blocks.append(block) or real(q, k, v, block))
    x = torch.randn(1, 32, 16, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
        attn.max_weights_reduced = 320 * 10
        attn(x)
    assert blocks == [(1 << 22) // 320, 256]
