"""The UNet's forms below float32 (docs/speed.md §3): each is the original's maths, float32 keeps
the original's operations, and the in-place forms are bit for bit the out-of-place ones."""
import pytest
import torch
import torch.nn.functional as F

from bimacosr.models.layers import GroupNorm32, gelu_fresh, residual
from bimacosr.models.swin import (ConvMlp, SwinTransformerBlock, WindowAttention, pixels, shift_window_mask,
                                  window_merge, window_order, window_partition)
from bimacosr.models.unet import ResBlock, UNetModelSwin

TINY = dict(image_size=16, in_channels=6, model_channels=32, out_channels=3, cond_lq=True,
            attention_resolutions=[16], dropout=0, channel_mult=[1, 1], num_res_blocks=[1, 1],
            num_head_channels=16, use_scale_shift_norm=True, swin_depth=2, swin_embed_dim=32,
            window_size=8, mlp_ratio=2)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialised output convs and bias tables included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shifted", [False, True])
def test_fused_window_attention_is_the_originals_maths(batch, shifted):
    attn = randomized(WindowAttention(32, 8, 2)).double()
    mask = shift_window_mask(16, 16, 8, 4).double() if shifted else None
    x = torch.randn(batch * 4, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = attn(x, mask)  # float64 is not below float32: the original's operations
        got = attn.proj(attn._fused(attn.qkv(x), mask))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _flash_and_exact(qkv: torch.Tensor, term: torch.Tensor, heads: int, scale: float):
    """PyTorch's CPU attention on bf16 ``qkv [B', N, 3C]`` with ``term [T, heads, N, N]`` repeated
    over the windows; the same in float64; and how far a result may lie from PyTorch's, all
    ``[B', N, C]``: one bf16 rounding of the result, and one of each exponential (rounded to bf16
    before the product with v, as there) weighed by its |v|: ``2^-8 softmax @ |v|``."""
    bw, n, e = qkv.shape
    q, k, v = qkv.reshape(bw, n, 3, heads, e // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    full = term.repeat(bw // term.shape[0], 1, 1, 1)
    flash = F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale)
    q, k, v, full = (t.double() for t in (q, k, v, full))
    weights = (q @ k.transpose(-1, -2) * scale + full).softmax(-1)
    exact, spread = weights @ v, weights @ v.abs()
    flash, exact, spread = (t.transpose(1, 2).reshape(bw, n, e // 3) for t in (flash, exact, spread))
    ulp = torch.exp2(torch.floor(torch.log2(flash.double().abs().clamp_min(2.0 ** -126))) - 7)
    return flash, exact, ulp + 2.0 ** -8 * spread


@pytest.mark.parametrize("masks", [0, 4])
def test_window_attention_kernel_sums_as_pytorchs_flash_attention(fused, masks):
    """The C++ window attention (run on every CPU: with vdpbf16ps where there is one, written out
    otherwise) against PyTorch's bf16 CPU attention given bias + mask as one float32 term: as close
    to the float64 result, and within one bf16 rounding of PyTorch's result and of each exponential
    of it (not bit for bit: PyTorch's exp and blocking differ, and by CPU); window b adds mask[b % T] (8 windows: no mask, or the 4 windows of a shifted image's mask
    with its -100, repeated over 2 images)."""
    gen = torch.Generator().manual_seed(masks)
    heads, n, d = 6, 64, 32
    qkv = (torch.randn(8, n, 3 * heads * d, generator=gen) * 1.5).bfloat16()
    bias = torch.randn(heads, n, n, generator=gen)
    mask = -100.0 * (torch.rand(masks, n, n, generator=gen) < 0.3) if masks else None
    term = bias[None] if mask is None else bias[None] + mask[:, None]
    got = torch.ops.bimacosr.window_attention(qkv, bias, torch.empty(0) if mask is None else mask, heads, d ** -0.5)
    flash, exact, bound = _flash_and_exact(qkv, term, heads, d ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (8, n, heads * d)
    error, flash_error = (got.double() - exact).abs(), (flash.double() - exact).abs()
    assert error.max() <= 1.25 * flash_error.max() and error.mean() <= 1.1 * flash_error.mean()
    assert ((got.double() - flash.double()).abs() <= bound).all()


def test_window_attention_kernel_checks_its_inputs(fused):
    qkv, none = torch.zeros(2, 64, 3 * 64, dtype=torch.bfloat16), torch.empty(0)
    with pytest.raises(RuntimeError, match="no instance for N = 64, D = 16"):
        torch.ops.bimacosr.window_attention(qkv, torch.zeros(4, 64, 64), none, 4, 0.25)
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        torch.ops.bimacosr.window_attention(qkv, torch.zeros(2, 64, 32), none, 2, 0.25)
    with pytest.raises(RuntimeError, match="mask must be empty or contiguous float32"):
        torch.ops.bimacosr.window_attention(qkv, torch.zeros(2, 64, 64), torch.zeros(4, 64, 32), 2, 0.25)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        torch.ops.bimacosr.window_attention(qkv.float(), torch.zeros(2, 64, 64), none, 2, 0.25)


def _block_attention_in_bf16(windows: int, mask: torch.Tensor | None, seed: int):
    """A released-size block attention (C = 192, 6 heads, 8 x 8 windows) in inference under bf16
    autocast on ``windows`` random windows: ``(attn, qkv, bias [1, heads, N, N] float32, whether
    the C++ kernel applies, the attention's output)``."""
    from bimacosr import kernels
    attn = randomized(WindowAttention(192, 8, 6))
    x = torch.randn(windows, 64, 192, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = attn.qkv(x)
        bias = attn.position_bias().float().unsqueeze(0)
        return attn, qkv, bias, kernels.window_attention_applies(qkv, bias, 6), attn._fused(qkv, mask)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_under_bf16_takes_the_kernel_where_the_cpu_has_bf16_pairs(shifted):
    """In inference under bf16 autocast the block's attention runs the C++ kernel on a CPU with
    AVX512-BF16 (window and head size 64 x 32, as released), PyTorch's attention elsewhere and
    whenever gradients are wanted; either is PyTorch's bf16 result within the bound of _flash_and_exact."""
    from bimacosr import kernels
    mask = shift_window_mask(16, 16, 8, 4) if shifted else None
    attn, qkv, bias, used, got = _block_attention_in_bf16(8, mask, seed=2)
    term = bias + (mask[:, None] if shifted else 0)
    flash, _, bound = _flash_and_exact(qkv, term, 6, attn.scale)
    assert used == (kernels.available() and torch.ops.bimacosr.side_pairs() == kernels.NATIVE_PAIRS)
    assert ((got.double() - flash.double()).abs() <= bound).all()
    assert used or torch.equal(got, flash)
    qkv_grad = qkv.clone().requires_grad_(True)
    assert not kernels.window_attention_applies(qkv_grad, bias, 6)


def test_window_attention_is_pytorchs_with_bimacosr_attention_torch(monkeypatch):
    """``BIMACOSR_ATTENTION=torch`` keeps PyTorch's attention in the blocks, bit for bit."""
    from bimacosr import kernels
    monkeypatch.setenv(kernels.ATTENTION_ENV, "torch")
    attn, qkv, bias, used, got = _block_attention_in_bf16(2, None, seed=4)
    assert not used
    assert torch.equal(got, _flash_and_exact(qkv, bias, 6, attn.scale)[0])


def test_fused_window_attention_trains_under_bf16_autocast():
    """Gradients through the fused form (below float32: train.amp=bf16) reach the bias table and
    the input, as the original's operations' do (the mask term was once built with out=, which
    autograd refuses)."""
    fused = randomized(WindowAttention(32, 8, 2)).train()
    plain = randomized(WindowAttention(32, 8, 2)).train()
    mask = shift_window_mask(16, 16, 8, 4)
    x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for attn, dtype in ((fused, torch.bfloat16), (plain, torch.float32)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is torch.bfloat16):
            attn(xi, mask).float().square().sum().backward()
        grads.append((attn.relative_position_bias_table.grad, xi.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.1 * want.abs().max().item())


def test_window_attention_falls_back_where_the_kernels_cannot_build(monkeypatch):
    """Without the compiled kernels (no compiler, BIMACOSR_KERNEL=off) the block runs PyTorch's
    attention, and asking for the kernel directly names why it cannot."""
    from bimacosr import kernels
    monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "RuntimeError: g++: command not found",
                                            "line": "bimacosr: fused 1-bit kernel unavailable"})
    attn, qkv, bias, used, got = _block_attention_in_bf16(2, None, seed=3)
    assert not used
    with pytest.raises(RuntimeError, match="g\\+\\+: command not found"):
        kernels.window_attention(qkv, bias[0], None, 6, attn.scale)
    assert torch.equal(got, _flash_and_exact(qkv, bias, 6, attn.scale)[0])


def test_group_norm_on_bf16_is_one_rounding_of_the_float32_route():
    norm = randomized(GroupNorm32(32, 64))
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).bfloat16()
    got = norm(x)
    want = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)  # within one bf16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_modulated_group_norm(batch, dtype):
    norm = randomized(GroupNorm32(32, 64))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 64, 8, 8, generator=gen).to(dtype, memory_format=torch.channels_last)
    scale, shift = (torch.randn(batch, 64, 1, 1, generator=gen).to(dtype) for _ in range(2))
    got = norm.modulated(x, scale, shift)
    if batch == 2 or dtype == torch.float32:  # the original's operations, in place
        assert torch.equal(got, norm(x) * (1 + scale) + shift)
    else:  # one GroupNorm with the modulation in its affine: one bf16 rounding of the exact value
        want = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
        want = want * (1 + scale.double()) + shift.double()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-5)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step at each value of ``v`` (float64): 2^(floor(log2 |v|) - 7)."""
    return torch.exp2(torch.floor(torch.log2(v.double().abs().clamp_min(2.0 ** -126))) - 7)


def _group_norm_inputs(shape, groups, offset, seed):
    """A channels-last bf16 map ``shape`` (values ~3 · N(0, 1) + ``offset``) and a per-image affine."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 3 + offset).to(torch.bfloat16, memory_format=torch.channels_last)
    return x, torch.randn(n, c, generator=gen), torch.randn(n, c, generator=gen)


# (shape, groups): whole vectors; a partial last vector with 16 lanes; one with 8 and 16 lanes; many pixels
GROUP_NORM_SHAPES = [((2, 64, 8, 8), 32), ((1, 40, 5, 7), 8), ((1, 36, 3, 5), 4), ((1, 96, 33, 33), 32)]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape, groups", GROUP_NORM_SHAPES)
def test_group_norm_kernel_rounds_as_atens_group_norm_and_silu(fused, shape, groups, silu):
    """The C++ GroupNorm (+ SiLU) of a channels-last bf16 map (norm.cpp, run on every CPU: its
    vector widths are the build's) against ATen's GroupNorm and SiLU on bf16, image by image (the
    affine is per image): every value within one bf16 rounding of ATen's (two with the SiLU: of its
    input and its output; the statistics are summed in another order), nearly all identical, and
    the layout kept."""
    from bimacosr import kernels
    x, weight, bias = _group_norm_inputs(shape, groups, 0.5, seed=sum(shape))
    got = kernels.group_norm(x, groups, weight, bias, 1e-5, silu)
    norm = torch.cat([F.group_norm(x[i:i + 1], groups, weight[i], bias[i], 1e-5) for i in range(shape[0])])
    want = F.silu(norm) if silu else norm
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    bound = _bf16_ulp(want) + (_bf16_ulp(norm) if silu else 0)
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert (got == want).double().mean() > 0.99


def test_group_norm_kernel_statistics_keep_a_large_mean(fused):
    """Values far from 0 (mean 200, spread 3): the statistics are summed from each channel's first
    value, so the variance does not cancel; the result is one bf16 rounding of the float64 GroupNorm."""
    from bimacosr import kernels
    x, weight, bias = _group_norm_inputs((2, 64, 16, 16), 32, 200.0, seed=5)
    got = kernels.group_norm(x, 32, weight, bias, 1e-5)
    exact = torch.cat([F.group_norm(x[i:i + 1].double(), 32, weight[i].double(), bias[i].double(), 1e-5)
                       for i in range(2)])
    assert ((got.double() - exact).abs() <= _bf16_ulp(exact) / 2 + 1e-4 * exact.abs() + 1e-6).all()


def test_group_norm_kernel_checks_its_inputs(fused):
    from bimacosr import kernels
    x, weight, bias = _group_norm_inputs((1, 64, 4, 4), 32, 0.0, seed=1)
    with pytest.raises(RuntimeError, match="channels-last bfloat16"):
        torch.ops.bimacosr.group_norm(x.contiguous(), 32, weight, bias, 1e-5, False)
    with pytest.raises(RuntimeError, match="channels-last bfloat16"):
        torch.ops.bimacosr.group_norm(x.float(), 32, weight, bias, 1e-5, False)
    with pytest.raises(RuntimeError, match="64 channels are not 24 equal groups"):
        torch.ops.bimacosr.group_norm(x, 24, weight, bias, 1e-5, False)
    with pytest.raises(RuntimeError, match=r"weight and bias must be contiguous float32 \[N, C\]"):
        torch.ops.bimacosr.group_norm(x, 32, weight[:, :32], bias, 1e-5, False)
    empty = x[:, :, :0]
    assert kernels.group_norm(empty, 32, weight, bias, 1e-5).shape == empty.shape


@pytest.mark.parametrize("modulated", [False, True])
def test_group_norm_kernel_runs_in_the_resblocks_without_gradients(fused, monkeypatch, modulated):
    """GroupNorm32 on a channels-last bf16 map takes the kernel with its SiLU (the FiLM folded into
    a per-image affine: a batch too), ATen's operations when gradients are wanted or with
    ``BIMACOSR_NORM=torch``; both within one bf16 rounding of each operation of the other."""
    from bimacosr import kernels
    calls = []
    op = kernels.group_norm
    monkeypatch.setattr(kernels, "group_norm", lambda *a, **k: calls.append(a[0].shape) or op(*a, **k))
    norm = randomized(GroupNorm32(32, 64))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 64, 8, 8, generator=gen).to(torch.bfloat16, memory_format=torch.channels_last)
    scale, shift = (torch.randn(2, 64, 1, 1, generator=gen).bfloat16() for _ in range(2))

    def run() -> torch.Tensor:
        return norm.modulated(x, scale, shift, silu=True) if modulated else norm(x, silu=True)

    with torch.no_grad():
        got = run()
        monkeypatch.setenv(kernels.NORM_ENV, "torch")
        aten = run()
    assert calls == [x.shape]
    monkeypatch.delenv(kernels.NORM_ENV)
    assert torch.equal(run().detach(), aten)  # gradients wanted: ATen's operations
    assert calls == [x.shape]
    if modulated:  # ATen's route for a batch: GroupNorm, FiLM and SiLU, each rounded to bf16
        exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
        exact = F.silu(exact * (1 + scale.double()) + shift.double())
        assert ((got.double() - exact).abs() <= 2 * _bf16_ulp(exact) + 1e-6).all()
    else:
        assert ((got.double() - aten.double()).abs() <= 2 * _bf16_ulp(aten)).all()


def test_group_norm_falls_back_where_the_kernels_cannot_build(monkeypatch):
    """Without the compiled kernels GroupNorm32 runs ATen's GroupNorm and SiLU, bit for bit, and
    asking for the kernel directly names why it cannot."""
    from bimacosr import kernels
    monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "RuntimeError: g++: command not found",
                                            "line": "bimacosr: fused 1-bit kernel unavailable"})
    norm = randomized(GroupNorm32(32, 64))
    x, weight, bias = _group_norm_inputs((1, 64, 4, 4), 32, 0.0, seed=2)
    with torch.no_grad():
        got = norm(x, silu=True)
    assert torch.equal(got, F.silu(F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)))
    with pytest.raises(RuntimeError, match="g\\+\\+: command not found"):
        kernels.group_norm(x, 32, weight, bias, 1e-5)


def test_residual_keeps_the_layout_of_the_original_sum():
    x = torch.randn(1, 32, 4, 4)
    h = torch.randn(1, 32, 4, 4).to(memory_format=torch.channels_last)
    kept = h.clone()
    out = residual(x, h)  # x + h is laid out as x: a new tensor, h untouched
    assert torch.equal(out, x + kept) and out.is_contiguous() and torch.equal(h, kept)
    same = residual(x.to(memory_format=torch.channels_last), h)
    assert same.data_ptr() == h.data_ptr() and torch.equal(same, x + kept)


@pytest.mark.parametrize("grad", [False, True])
def test_resblock_in_place_forms_are_the_plain_operations(grad):
    block = randomized(ResBlock(32, 128, 64, 0.0, use_scale_shift_norm=True))
    x = torch.randn(2, 32, 8, 8, requires_grad=grad)
    emb = torch.randn(2, 128)
    with torch.set_grad_enabled(grad):
        got = block(x, emb)
        h = block.in_layers(x)
        scale, shift = block.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        norm, rest = block.out_layers[0], block.out_layers[1:]
        want = block.skip_connection(x) + rest(norm(h) * (1 + scale) + shift)
    assert torch.equal(got, want)
    if grad:
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
        (g_want,) = torch.autograd.grad(want.square().sum(), x)
        assert torch.equal(g_got, g_want)


def test_unet_below_float32_runs_channels_last_and_returns_contiguous():
    model = randomized(UNetModelSwin(**TINY))
    gen = torch.Generator().manual_seed(2)
    x, lq = torch.randn(1, 3, 16, 16, generator=gen), torch.randn(1, 3, 16, 16, generator=gen)
    t = torch.zeros(1, dtype=torch.long)
    seen = []
    hook = model.input_blocks[1][0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        want = model(x, t, lq=lq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t, lq=lq)
    hook.remove()
    assert not seen[0].is_contiguous(memory_format=torch.channels_last)  # float32: as the original
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and got.is_contiguous()
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("h,w,ws,s", [(16, 16, 8, 4), (16, 24, 8, 4), (8, 8, 8, 0), (16, 8, 8, 0)])
def test_window_order_is_roll_and_partition_as_one_gather(h, w, ws, s):
    x = torch.randn(2, 5, h, w).to(memory_format=torch.channels_last)
    order = window_order(h, w, ws, s)
    want = window_partition(torch.roll(x, shifts=(-s, -s), dims=(2, 3)), ws)
    assert torch.equal(pixels(x).index_select(1, order).view(-1, ws * ws, 5), want)
    assert pixels(x).data_ptr() == x.data_ptr()  # a view of a channels-last tensor
    back = want.view(2, h * w, 5).index_select(1, torch.argsort(order))
    merged = torch.roll(window_merge(want, ws, h, w), shifts=(s, s), dims=(2, 3))
    assert torch.equal(back, pixels(merged))


@pytest.mark.parametrize("shift,h,w", [(4, 16, 16), (4, 16, 24), (0, 8, 16), (0, 8, 8)])  # 8x8: no gather
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_gathered_attention_is_the_original_sequence_bit_for_bit(shift, h, w, layout):
    block = randomized(SwinTransformerBlock(32, 16, 2, 8, shift, 2.0)).bfloat16()
    x = torch.randn(2, 32, h, w, dtype=torch.bfloat16).to(memory_format=layout)
    with torch.no_grad():
        got = block._attend_gathered(x)
        u = torch.roll(block.norm1(x), shifts=(-shift, -shift), dims=(2, 3))
        tokens = window_partition(u, 8).contiguous()  # (a strided view when one window covers the image)
        a = block.attn(tokens, block.runtime_mask(h, w, x.device))
        want = x + torch.roll(window_merge(a, 8, h, w), shifts=(shift, shift), dims=(2, 3))
    assert torch.equal(got, want)
    if layout == torch.channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_fresh_on_a_channels_last_map_is_the_nchw_result_in_place(dtype):
    """ATen's GELU takes another route on a channels-last tensor, whose values differ from the NCHW
    (the original's) result in the last bits: in 161 of these 256 float32 values with torch 2.14.1 on
    an AMD Zen 4. gelu_fresh gives the NCHW values, in place, in the channels-last layout."""
    x = (torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    h = x.contiguous(memory_format=torch.channels_last)
    pointer = h.data_ptr()
    out = gelu_fresh(h)
    assert out.data_ptr() == pointer and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, F.gelu(x))


def test_mlp_gelu_in_place_is_the_plain_gelu():
    mlp = randomized(ConvMlp(16, 32))
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


@pytest.mark.parametrize("shift,h,w", [(4, 16, 16), (4, 16, 24), (0, 8, 16), (0, 8, 8)])
def test_float32_channels_last_block_is_the_originals_operations_bit_for_bit(shift, h, w):
    block = randomized(SwinTransformerBlock(32, 16, 2, 8, shift, 2.0))
    x = torch.randn(2, 32, h, w).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = block(x)
        u = block.norm1(x)
        if shift:
            u = torch.roll(u, shifts=(-shift, -shift), dims=(2, 3))
        a = block.attn(window_partition(u, 8), block.runtime_mask(h, w, x.device))
        a = torch.roll(window_merge(a, 8, h, w), shifts=(shift, shift), dims=(2, 3))
        want = x + a
        want = want + block.mlp(block.norm2(want))
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)


def test_bf16_blocks_run_on_the_meta_device():
    """Shape-only runs (ops_count counts a model on "meta") of the forms below float32: the
    autocast switches they make are skipped where the device has no autocast."""
    from bimacosr.models.autoencoder import AttnBlock, VectorQuantizer

    with torch.device("meta"):
        attn = AttnBlock(64).bfloat16()
        block = SwinTransformerBlock(32, 16, 2, 8, 4, 2.0).bfloat16()
        quantizer = VectorQuantizer(16, 3)
        outs = [attn(torch.empty(2, 64, 4, 4, dtype=torch.bfloat16)),
                block(torch.empty(2, 32, 16, 16, dtype=torch.bfloat16)),
                quantizer(torch.empty(2, 3, 4, 4, dtype=torch.bfloat16))[0]]
    assert [tuple(o.shape) for o in outs] == [(2, 64, 4, 4), (2, 32, 16, 16), (2, 3, 4, 4)]
    assert all(o.device.type == "meta" for o in outs)
