"""The ResShift / SinSR Swin-UNet denoiser (docs/denoiser.md §2), state_dict-compatible with
``resshift_realsrx4_s15_v1.pth`` and ``SinSR_v1.pth``.

``model(x, timesteps, lq=lq)``: ``x`` latent ``[B, 3, H, W]`` (H, W multiples of 64 for the
released config), ``timesteps`` ``[B]`` step indices, ``lq`` the LR image ``[B, 3, H, W]`` in
[-1, 1]; returns the predicted clean latent ``[B, out_channels, H, W]``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bimacosr.models.layers import GroupNorm32, reduced_precision, residual, timestep_embedding
from bimacosr.models.swin import BasicLayer


class ResBlock(nn.Module):
    """Pre-norm residual block with FiLM timestep conditioning: ``[B, C, H, W] -> [B, C', H, W]``."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        film = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, film))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[2](self.in_layers[0](x, silu=True))
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        norm = self.out_layers[0]
        if self.use_scale_shift_norm:
            h = norm.modulated(h, *e.chunk(2, dim=1), silu=True)
        else:
            h = norm(h + e, silu=True)
        h = self.out_layers[3](self.out_layers[2](h))
        return residual(self.skip_connection(x), h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (key ``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Passes ``emb`` to the ResBlocks of the sequence and only ``x`` to the rest."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModelSwin(nn.Module):
    """The Swin-UNet; constructor arguments are the original's ``model.params`` keys.

    ``attention_resolutions`` are values of the running resolution (``image_size`` halved at each
    downsample), not factors. ``image_size`` only fixes each Swin block's window/shift choice and
    the size of the stored ``attn_mask`` buffers; the runtime size may differ.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int],
                 dropout: float = 0.0, channel_mult: Sequence[int] = (1, 2, 4, 8),
                 conv_resample: bool = True, dims: int = 2, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 swin_depth: int = 2, swin_embed_dim: int = 96, window_size: int = 8,
                 mlp_ratio: float = 2.0, patch_norm: bool = False, cond_lq: bool = True,
                 lq_size: int | None = None):
        super().__init__()
        unsupported = {"dims": (dims, 2), "use_fp16": (use_fp16, False), "conv_resample": (conv_resample, True),
                       "resblock_updown": (resblock_updown, False), "patch_norm": (patch_norm, False)}
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"model.params.{key}={value!r} is not supported (only {supported!r}, "
                                 f"as in every released config)")
        if lq_size is not None and lq_size != image_size:
            raise ValueError(f"model.params.lq_size={lq_size} != image_size={image_size}: the LQ feature "
                             f"extractor of ResShift's other tasks is not part of this model")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError(f"model.params.num_res_blocks has {len(num_res_blocks)} entries but "
                             f"channel_mult has {len(channel_mult)}")
        self.model_channels, self.cond_lq = model_channels, cond_lq
        heads = swin_embed_dim // num_head_channels if num_head_channels != -1 else num_heads
        emb_dim = 4 * model_channels

        def swin(channels: int, ds: int) -> BasicLayer:
            return BasicLayer(channels, swin_embed_dim, heads, window_size, swin_depth, ds, mlp_ratio)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = input_ch = int(channel_mult[0] * model_channels)
        ds, chans = image_size, [ch]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        for level, mult in enumerate(channel_mult):
            for j in range(num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions and j == 0:
                    layers.append(swin(ch, ds))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds //= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), swin(ch, ds), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [res(ch + chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions and i == 0:
                    layers.append(swin(ch, ds))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: Tensor, timesteps: Tensor, lq: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        if lq is not None:
            if not self.cond_lq:
                raise ValueError("this model was built with cond_lq=False and takes no lq")
            if lq.shape[2:] != x.shape[2:]:  # docs/quirks.md Q6: only the height decides
                lq = F.pixel_unshuffle(lq, 2) if lq.shape[2] > x.shape[2] else F.interpolate(lq, scale_factor=4, mode="nearest")
            h = torch.cat([x, lq], dim=1)
        to_channels_last = reduced_precision(h) and not h.is_contiguous(memory_format=torch.channels_last)
        if to_channels_last:  # channels-last activations throughout, below float32 (docs/speed.md §3)
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out[2](self.out[0](h, silu=True))
        return out.contiguous() if to_channels_last else out
