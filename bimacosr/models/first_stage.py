"""How the diffusion pipeline enters and leaves the autoencoder's latent space (docs/pipeline.md §2.5).

ResShift's ``GaussianDiffusion.encode_first_stage`` / ``decode_first_stage`` as pure functions. The
autoencoder may run in another dtype than the caller (fp16 on GPU in the released config): inputs
are cast to the autoencoder's parameter dtype and results cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bimacosr.models.autoencoder import VQAutoencoder


def _dtype(vq: VQAutoencoder) -> torch.dtype:
    return next(vq.parameters()).dtype


def encode_first_stage(vq: VQAutoencoder, y: Tensor, up_sample: bool, scale_factor: float = 1.0,
                       sf: int = 4) -> Tensor:
    """Image y (B, 3, H, W) in [-1, 1] -> latent (B, 3, H', W') in y's dtype, unquantised.

    With ``up_sample`` y is first bicubically upsampled x``sf`` (align_corners False, no antialias,
    no clamp, in y's dtype), so for sf 4 the latent has y's own size (H' = H, W' = W); otherwise
    H' = H/4. The latent is multiplied by ``scale_factor`` in the autoencoder's dtype. No gradient.
    """
    ori_dtype = y.dtype
    if up_sample:
        y = F.interpolate(y, scale_factor=sf, mode="bicubic")
    with torch.no_grad():
        z = vq.encode(y.to(_dtype(vq))) * scale_factor
    return z.to(ori_dtype)


def decode_first_stage(vq: VQAutoencoder, z: Tensor, scale_factor: float = 1.0) -> Tensor:
    """Latent z (B, 3, h, w) -> image (B, 3, 4h, 4w), nominally [-1, 1] but NOT clamped, in z's dtype.

    z / scale_factor (in z's dtype) is cast to the autoencoder's dtype and decoded **with**
    quantisation. Gradients are not blocked (as in the original; callers use ``torch.no_grad``).
    """
    ori_dtype = z.dtype
    z = (1 / scale_factor * z).to(_dtype(vq))
    return vq.decode(z).to(ori_dtype)
