"""Networks: the Swin-UNet denoiser (FP or binarized) and the VQ-f4 autoencoder."""
from bimacosr.models.denoiser import build_denoiser, is_binarized, split_params
from bimacosr.models.unet import UNetModelSwin

__all__ = ["build_denoiser", "is_binarized", "split_params", "UNetModelSwin"]
