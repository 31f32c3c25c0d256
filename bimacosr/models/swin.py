"""The channel-first Swin layer of the ResShift/SinSR UNet (docs/denoiser.md §2.4).

Maps ``[B, C, H, W] -> [B, C, H, W]``; ``H`` and ``W`` must be multiples of the window (docs/quirks.md Q3: the
model never pads). GroupNorm instead of LayerNorm, a 1x1-conv MLP, no residual around the layer
(Q4), and the original's shift mask (Q1, Q2): recomputed from the runtime size, built from row
labels read in transposed order. The stored ``attn_mask`` buffer is kept for state_dict
compatibility but never read.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr import kernels
from bimacosr.models.layers import GroupNorm32, autocast_off, gelu_fresh, reduced_precision, residual
from bimacosr.quant.common import eval_cached


def shift_window_mask(height: int, width: int, window: int, shift: int,
                      device: torch.device | str | None = None) -> Tensor:
    """The original's attention mask ``[nW, ws*ws, ws*ws]`` (0 or -100), windows row-major.

    Image rows get labels 6 / 7 / 8 for ``[0, H-ws)`` / ``[H-ws, H-s)`` / ``[H-s, H)`` (with
    ``s = 0`` every row is 8). Token ``i`` of a window whose top row is ``r0`` takes the label of
    row ``r0 + i % ws`` -- the column-in-window index used as a row offset. Columns play no role.
    """
    labels = torch.full((height,), 8.0, device=device)
    if shift > 0:
        labels[: max(height - window, 0)] = 6.0
        labels[max(height - window, 0): height - shift] = 7.0
    rows = torch.arange(0, height, window, device=device)[:, None] + torch.arange(window, device=device).repeat(window)
    token_labels = labels[rows]  # [H/ws, ws*ws]
    token_labels = token_labels[:, None, :].expand(-1, width // window, -1).reshape(-1, window * window)
    differs = token_labels[:, :, None] != token_labels[:, None, :]
    return differs.float() * -100.0


def relative_position_index(window: int) -> Tensor:
    """``[ws*ws, ws*ws]`` int64: ``(ph - qh + ws - 1) * (2ws - 1) + (pw - qw + ws - 1)``."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, C, H, W] -> [B*nW, ws*ws, C]``; windows ordered batch, row, column; tokens row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def window_merge(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B*nW, ws*ws, C] -> [B, C, H, W]``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, height, width)


def window_order(height: int, width: int, window: int, shift: int,
                 device: torch.device | str | None = None) -> Tensor:
    """``[H*W]`` int64: the row-major image pixel of each token of
    ``window_partition(roll(image, (-shift, -shift)), window)`` (windows row-major, tokens
    row-major), i.e. that roll and partition as one gather of pixels."""
    rows = (torch.arange(height, device=device).view(-1, 1, window, 1) + shift) % height
    cols = (torch.arange(width, device=device).view(1, -1, 1, window) + shift) % width
    return (rows * width + cols).reshape(-1)


def pixels(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H*W, C]``: a view of a channels-last tensor (a copy otherwise)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias.

    Input ``[B', N, E]`` (N = ws*ws tokens), optional mask ``[nW, N, N]`` with ``B' = B*nW``.
    Below float32 (:func:`~bimacosr.models.layers.reduced_precision`) one fused
    ``scaled_dot_product_attention`` with bias and mask summed into one float32 term: the same
    maths, logits and softmax in float32 (docs/speed.md §3); float32 runs the original's operations.
    """

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """The relative-position bias ``[heads, N, N]`` read from the table."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x)
        if reduced_precision(qkv):
            return self.proj(self._fused(qkv, mask))
        qkv = qkv.reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None].to(attn.dtype)
            attn = attn.view(bw, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))

    def _fused(self, qkv: Tensor, mask: Tensor | None) -> Tensor:
        """``softmax(q k^T * scale + bias + mask) v`` of ``qkv [B', N, 3 E]`` (the qkv layer's output)
        as ``[B', N, E]``. The added term is at least float32 on CPU (q, k, v stay in their dtype;
        autocast is off so that it is not rounded), in q's dtype elsewhere. bf16 on a CPU with
        AVX512-BF16, without gradients: the C++ window attention (bimacosr.kernels, docs/kernel.md
        §6), the same sums as PyTorch's CPU flash attention; otherwise that attention."""
        bw, n, e = qkv.shape
        heads = self.num_heads
        dtype = torch.promote_types(qkv.dtype, torch.float32) if qkv.device.type == "cpu" else qkv.dtype
        term = eval_cached(self, f"position_bias_{dtype}", (self.relative_position_bias_table,),
                           lambda: self.position_bias().to(dtype).unsqueeze(0).contiguous())
        if kernels.window_attention_applies(qkv, term, heads):  # window b adds the bias + mask[b % nw]
            return kernels.window_attention(qkv, term[0], mask, heads, self.scale)
        if mask is not None:  # per window: [nw, heads, n, n]; out of place: gradients may flow
            term = term + mask[:, None].to(dtype)
        q, k, v = qkv.reshape(bw, n, 3, heads, e // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None and bw != mask.shape[0]:  # repeated over the batch, contiguous as the kernel reads it
            term = term.repeat(bw // mask.shape[0], 1, 1, 1)
        with autocast_off(q.device.type):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=term, scale=self.scale)
        return out.transpose(1, 2).reshape(bw, n, e // 3)


class ConvMlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with 1x1 convs on ``[B, C, H, W]``. ``act`` is kept for the original's
    module layout; ``forward`` applies the exact GELU itself (``layers.gelu_fresh``), so replacing
    ``act`` changes nothing."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_fresh(self.fc1(x)))  # `act` is kept for the module layout; same GELU


class SwinTransformerBlock(nn.Module):
    """``x + roll(attn(roll(norm1(x))))``, then ``x + mlp(norm2(x))`` on ``[B, E, H, W]``.

    At construction, ``resolution <= window`` shrinks the window to ``resolution`` and disables
    the shift (docs/denoiser.md §2.4). Masks and token orders for each runtime size are computed
    once and cached. On a channels-last map (the deploy UNet's, and every one below float32) each
    roll + partition (and merge + roll back) is one gather of pixel rows; otherwise the original's
    operations run. Residual sums go into the fresh branch output (docs/speed.md §3).
    """

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int,
                 mlp_ratio: float):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        if shift > 0:
            self.register_buffer("attn_mask", shift_window_mask(resolution, resolution, window, shift))
        self.norm1 = GroupNorm32(32, dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = GroupNorm32(32, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self._runtime: dict[tuple, Any] = {}  # masks and token orders per runtime size

    def runtime_mask(self, height: int, width: int, device: torch.device) -> Tensor | None:
        """The mask for a runtime size (``None`` when unshifted: the original's is all zeros)."""
        if self.shift == 0:
            return None
        key = (height, width, device)
        if key not in self._runtime:
            self._runtime[key] = shift_window_mask(height, width, self.window, self.shift, device)
        return self._runtime[key]

    def token_orders(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(order, inverse)`` of :func:`window_order` for a runtime size (cached); ``None`` when
        the partition is the identity (one unshifted window covers the image)."""
        if self.shift == 0 and height == width == self.window:
            return None
        key = ("order", height, width, device)
        if key not in self._runtime:
            order = window_order(height, width, self.window, self.shift, device)
            self._runtime[key] = (order, torch.argsort(order))
        return self._runtime[key]

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if h % self.window or w % self.window:
            raise ValueError(f"Swin block needs H and W divisible by its window {self.window}, got "
                             f"{h}x{w}; pad the input (the pipeline pads LR images to multiples of 64)")
        if reduced_precision(x) or x.is_contiguous(memory_format=torch.channels_last):
            x = self._attend_gathered(x)  # bit for bit the branch below on a channels-last x
        else:
            u = self.norm1(x)
            if self.shift:
                u = torch.roll(u, shifts=(-self.shift, -self.shift), dims=(2, 3))
            a = self.attn(window_partition(u, self.window), self.runtime_mask(h, w, x.device))
            a = window_merge(a, self.window, h, w)
            if self.shift:
                a = torch.roll(a, shifts=(self.shift, self.shift), dims=(2, 3))
            x = residual(x, a)
        return residual(x, self.mlp(self.norm2(x)))

    def _attend_gathered(self, x: Tensor) -> Tensor:
        """``x + roll(merge(attn(partition(roll(norm1(x))))))`` with each roll and partition one
        gather of pixels (:func:`window_order`), channels-last out. For a channels-last ``x`` the
        attention gets the same contiguous tokens and the sum the same layout as in the original's
        operations, so float32 results are unchanged (docs/speed.md §3)."""
        b, c, h, w = x.shape
        n = self.window * self.window
        orders = self.token_orders(h, w, x.device)
        tokens = pixels(self.norm1(x))
        if orders is not None:
            tokens = tokens.index_select(1, orders[0])
        tokens = tokens.reshape(-1, n, c).contiguous()  # a no-op for a channels-last x
        a = self.attn(tokens, self.runtime_mask(h, w, x.device)).view(b, h * w, c)
        if orders is not None:
            a = a.index_select(1, orders[1])
        return residual(pixels(x), a).view(b, h, w, c).permute(0, 3, 1, 2)


class PatchProjection(nn.Module):
    """A 1x1 conv under the key ``proj`` (patch size 1, no norm): ``patch_embed``/``patch_unembed``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """``unembed(blocks(embed(x)))``: ``[B, C, H, W] -> [B, C, H, W]`` (no outer residual, Q4).

    ``depth`` blocks; odd-indexed ones shift by ``window // 2``.
    """

    def __init__(self, in_channels: int, embed_dim: int, num_heads: int, window: int, depth: int,
                 resolution: int, mlp_ratio: float):
        super().__init__()
        self.patch_embed = PatchProjection(in_channels, embed_dim)
        self.patch_unembed = PatchProjection(embed_dim, in_channels)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(embed_dim, resolution, num_heads, window,
                                 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)
