"""The VQ-f4 autoencoder (latent-diffusion ``VQModelTorch`` as used by ResShift / SinSR / BiMaCoSR).

docs/pipeline.md §2 is the specification. Module names match the original exactly, so the released
``autoencoder_vq_f4.pth`` loads with ``load_state_dict(strict=True)``: top-level ``encoder``,
``decoder``, ``quantize`` (``quantize.embedding.weight``), ``quant_conv``, ``post_quant_conv``.

Images are NCHW in [-1, 1] with 3 channels; the latent has ``embed_dim`` (3) channels at 1/4 of the
image size for ``len(ch_mult) == 3``. ``encode`` never quantises, ``decode`` quantises by default.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr import kernels
from bimacosr.models.layers import (WinogradConv2d, autocast_dtype, autocast_off, faster_forms,
                                    reduced_precision, residual, silu_fresh)
from bimacosr.quant.common import eval_cached


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6, affine (``channels`` must be a multiple of 32)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def norm_swish(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``swish(norm(x))`` with swish(h) = h·sigmoid(h). In float32 the original's two operations;
    below float32 and in :func:`~bimacosr.models.layers.fast_float32` one ``silu`` on the fresh
    normalised tensor, in place unless it records a gradient (one rounding instead of two, one pass
    over memory instead of three: 6-10x faster in float32); a channels-last bf16 map on CPU takes
    both in one C++ pass with the same roundings (:func:`bimacosr.kernels.group_norm`)."""
    if kernels.group_norm_applies(x, norm.weight, norm.bias):
        return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)
    h = norm(x)
    if faster_forms(h):
        return silu_fresh(h)
    return h * torch.sigmoid(h)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus a 1x1 ``nin_shortcut`` when the
    width changes. No timestep embedding (the original builds none: ``temb_channels`` = 0). The
    3x3 convs are :class:`~bimacosr.models.layers.WinogradConv2d` (Winograd in ``fp32-fast``)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = WinogradConv2d(in_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = WinogradConv2d(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_swish(self.norm1, x))
        h = self.conv2(self.dropout(norm_swish(self.norm2, h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return residual(x, h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, scale 1/sqrt(C), residual:
    (B, C, H, W) -> (B, C, H, W).

    On CUDA: ``scaled_dot_product_attention`` (fused, never materialises the (HW)² weights; the
    original uses the equivalent xformers kernel there). Elsewhere in float32: the original's
    exact operation order (qᵀk bmm, then ·C^-½, softmax, bmm with v), split into query blocks of at
    most ``max_weights`` weight entries, which reproduces the reference CPU outputs bit for bit.
    Below float32 (:func:`reduced_precision`) and in ``fp32-fast``: :func:`_attend_tokens` on
    token-major views of q, k and v, in query blocks of at most ``max_weights_reduced`` weight
    entries (a cache-sized block) but at least ``min_queries`` (smaller blocks slowed the GEMMs:
    at 65536 tokens, the default tile's latent, 64-query blocks took 1.5x as long in float32 and
    1.1-1.3x in bf16, docs/speed.md §2), its output
    in the input's memory format. In float32 that is 1.25x (4096 tokens) to 1.5x (16384) faster
    than the original's order.
    """

    max_weights = 1 << 24  # per query block in float32: 64 MiB of weights
    max_weights_reduced = 1 << 22  # per query block below float32: 8 MiB of bf16 weights
    min_queries = 256

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        if faster_forms(x) and not x.is_cuda:
            # (B, C, H, W) -> (B, HW, C) tokens: views (no copy) of channels-last maps
            q, k, v = (m(hn).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
            out = _attend_tokens(q, k, v, max(self.min_queries, self.max_weights_reduced // (h * w)))
            out = out.transpose(1, 2).unflatten(2, (h, w)).contiguous(memory_format=_memory_format(x))
            return residual(x, self.proj_out(out))
        q, k, v = (m(hn).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
        if x.is_cuda:
            # (B, C, HW) -> (B, 1, HW, C): one head, HW tokens
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        else:
            step = max(1, self.max_weights // (h * w))
            out = torch.cat([_attend(qc, k, v) for qc in q.split(step, dim=2)], dim=2)
        return residual(x, self.proj_out(out.reshape(b, c, h, w)))


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, C, n) queries, k/v (B, C, N) -> (B, C, n), in the original's operation order."""
    weights = torch.bmm(q.transpose(1, 2), k) * (int(q.shape[1]) ** (-0.5))  # (B, n, N)
    weights = torch.softmax(weights, dim=2)
    return torch.bmm(v, weights.transpose(1, 2))


def _attend_tokens(q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
    """softmax(q·kᵀ/√C)·v for q (B, n, C), k/v (B, N, C) tokens of one dtype -> (B, n, C), in
    blocks of ``block`` queries, with autocast off (it would turn the softmax to float32 and back).
    Per block: the scaled logits (B, block, N) from one GEMM (float32 accumulation, ·C^-½ applied
    before the one rounding to the tokens' dtype), softmax (accumulated in float32, rounded once),
    then the GEMM with v. The original's maths; only the rounding points differ (the original's
    operations under autocast round the logits both before and after scaling). PyTorch's fused CPU
    attention (``scaled_dot_product_attention``) was 1.9x slower than this at C = 512, one head."""
    scale = int(q.shape[2]) ** (-0.5)
    kt = k.transpose(1, 2).contiguous()  # (B, C, N) row-major, once: a transposed operand is re-packed per block
    zero = q.new_zeros(())
    with autocast_off(q.device.type):
        blocks = [torch.bmm(torch.softmax(torch.baddbmm(zero, qb, kt, beta=0, alpha=scale), dim=2), v)
                  for qb in q.split(block, dim=1)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, 3x3 conv stride 2 without padding (H -> floor(H/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _fold_taps(w: Tensor, dim: int) -> Tensor:
    """The 3 taps (t0, t1, t2) of a 3x3 kernel along ``dim`` -> the 4 taps (t2, t1+t2, t0+t1, t0)
    of a stride-2 transposed convolution (padding 1) equal, along that axis, to nearest x2 then the
    3x3 conv (pad 1): output row 2i reads input rows (i-1, i) with (t0 | t1+t2), transposed taps 3
    and 1; row 2i+1 reads (i, i+1) with (t0+t1 | t2), taps 2 and 0. Plain additions, in ``w``'s
    dtype (autocast leaves them alone)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t2, t1 + t2, t0 + t1, t0), dim)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv (pad 1): (B, C, h, w) -> (B, C, 2h, 2w).

    Below float32 (:func:`reduced_precision`) the same maths in 2.25x fewer multiply-adds and
    without the upsampled copy: output pixel (2i+a, 2j+b) of the conv reads only a 2x2 patch of
    the input, whose weights are the 3x3 taps summed per phase (a, b). That is one stride-2
    transposed convolution (padding 1) with the (C, C, 4, 4) kernel of :func:`_fold_taps` along
    both axes, which writes the four interleaved phases itself; the kernel is summed in float32.
    float32 runs the original's two operations (in ``fp32-fast`` the conv on the upsampled map is
    Winograd's: 1.4-1.8x faster there than this phase form in float32, docs/speed.md §2).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = WinogradConv2d(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        if not reduced_precision(x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        weight, bias = self._kernel(x)
        return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)

    def _kernel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (C_in, C_out, 4, 4) transposed-conv kernel, in the conv weight's memory format, and
        the (C,) bias, in the dtype the conv computes in (the autocast dtype under autocast); kept
        in inference while the weights are unchanged (:func:`~bimacosr.quant.common.eval_cached`)."""
        dtype = autocast_dtype(x.device.type) or x.dtype
        wt = self.conv.weight
        sources = (wt, self.conv.bias)
        weight = eval_cached(self, f"kernel_{dtype}", sources, lambda: _fold_taps(_fold_taps(
            wt.float(), 2), 3).transpose(0, 1).to(dtype, memory_format=_memory_format(wt)))
        bias = eval_cached(self, f"bias_{dtype}", sources, lambda: self.conv.bias.to(dtype))
        return weight, bias


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    """A resolution level holding ``block`` and ``attn`` ModuleLists (original naming)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, z_channels or 2·z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], in_channels: int, resolution: int,
                 z_channels: int, dropout: float = 0.0, double_z: bool = True, **ignore: Any):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = _level(blocks, attns)
            if i != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(norm_swish(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h·2^(L-1), w·2^(L-1)); no tanh.

    ``up`` is indexed by resolution level: ``up.{L-1}`` runs first, ``up.0`` last.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0, **ignore: Any):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, dropout)
        ups: list[nn.Module] = []
        for i in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            up = _level(blocks, attns)
            if i != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (``VectorQuantizer2``: beta 0.25, legacy, no remap); only the
    forward value matters here. Codebook ``embedding.weight`` is (n_embed, embed_dim)."""

    def __init__(self, n_embed: int, embed_dim: int, chunk: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.chunk = chunk  # positions per distance block: (positions x codes) stays cache-sized

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, h, w) -> (z_q (B, D, h, w), indices (B, h, w) int64).

        Distance |z|² + |e|² − 2·z·e in the codebook's dtype whatever z's dtype or an autocast:
        float32, unless the autoencoder itself is half precision (``--precision fp16``, as the
        original on GPU). With 8192 codes of width 3, a bf16 search picks another code than float32
        for a quarter of the positions of a random latent (docs/deviations.md D16). Argmin (first
        index on ties); z_q is the
        straight-through ``z + (e − z).detach()``. The subtraction runs in place (``sub_(...,
        alpha=2)``: ``2·z·e`` is exact, so the rounding is the original's) on blocks of
        ``chunk`` positions (128: a 4 MiB float32 block for 8192 codes, which fits the cache and the
        allocator's reuse): 5-7x faster than the original's three full-size temporaries.
        """
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        with autocast_off(z.device.type):  # the search in the codebook's dtype
            zs = zf.to(e.dtype)
            e_sq = torch.sum(e**2, dim=1)
            blocks = []
            for zc in zs.split(self.chunk):
                dist = torch.sum(zc**2, dim=1, keepdim=True) + e_sq
                blocks.append(torch.argmin(dist.sub_(zc @ e.t(), alpha=2), dim=1))
        idx = torch.cat(blocks)
        zq = self.embedding(idx)
        zq = zf + (zq - zf).detach()
        zq = zq.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return zq, idx.reshape(b, h, w)


class VQAutoencoder(nn.Module):
    """``VQModelTorch(ddconfig, n_embed, embed_dim)``; ``ddconfig`` takes every key of the original
    (``double_z, z_channels, resolution, in_channels, out_ch, ch, ch_mult, num_res_blocks,
    attn_resolutions, dropout, padding_mode`` ...); unused ones are ignored as in the original."""

    def __init__(self, embed_dim: int, n_embed: int, ddconfig: dict[str, Any]):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> unquantised latent h (B, embed_dim, H/4, W/4)."""
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Latent (B, embed_dim, h, w) -> (z_q same shape, code indices (B, h, w) int64)."""
        return self.quantize(h)

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, 3, 4h, 4w), nominally [-1, 1] (not clamped).
        Quantises first unless ``force_not_quantize``."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x), force_not_quantize)
