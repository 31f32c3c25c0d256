"""Small building blocks shared by the UNet and the Swin layer."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]``, cos half first (``f_j = exp(-ln(P) j / half)``).

    ``timesteps`` holds ints or floats (ResShift passes raw step indices 0..T-1). An odd ``dim``
    gets one zero column appended. At ``t = 0`` the sin half is exactly 0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
