"""The UNet's forms below float32 (docs/speed.md §3): each is the original's maths, float32 keeps
the original's operations, and the in-place forms are bit for bit the out-of-place ones."""
import pytest
import torch
import torch.nn.functional as F

from bimacosr.models.layers import GroupNorm32
from bimacosr.models.swin import WindowAttention, shift_window_mask
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
        qkv = attn.qkv(x).reshape(batch * 4, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
        got = attn.proj(attn._fused(qkv, mask))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_group_norm_on_bf16_is_one_rounding_of_the_float32_route():
    norm = randomized(GroupNorm32(32, 64))
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).bfloat16()
    got = norm(x)
    want = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)  # within one bf16 rounding


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
