"""Networks: the Swin-UNet denoiser (FP or binarized) and the VQ-f4 autoencoder."""
from bimacosr.models.denoiser import (build_denoiser, denoiser_skeleton, is_binarized, recompute_buffers,
                                      split_params)
from bimacosr.models.unet import UNetModelSwin

__all__ = ["build_denoiser", "denoiser_skeleton", "is_binarized", "recompute_buffers", "split_params",
           "UNetModelSwin"]
