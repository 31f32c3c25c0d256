"""BiMaCoSR inference: a folder (or one file) of low-resolution images -> 4x super-resolved images.

    python inference_quant.py -i inputs/ -o results/ --config configs/BiMaCoSR.yaml --ckpt weights/BiMaCoSR.pth
    torchrun --nproc_per_node=4 inference_quant.py -i big_set/ -o results/     # files split over 4 GPUs
"""
import argparse
import sys
from pathlib import Path

from bimacosr.checkpoint import CheckpointError
from bimacosr.config import ConfigError
from bimacosr.inference import InferenceOptions, run
from bimacosr.deploy import DeployFileError
from bimacosr.weights import MissingWeightsError


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def parse_args() -> InferenceOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--in_path", type=Path, required=True, help="LR image file or folder")
    p.add_argument("-o", "--out_path", type=Path, required=True, help="output folder (created)")
    p.add_argument("--config", type=Path, default=Path("configs/BiMaCoSR.yaml"), help="original YAML config")
    p.add_argument("--ckpt", type=Path, default=Path("weights/BiMaCoSR.pth"), help="denoiser weights")
    p.add_argument("--scale", type=int, default=4, help="SR factor (must match the config)")
    p.add_argument("--seed", type=int, default=12345, help="noise seed (same noise for every image)")
    p.add_argument("--chop_size", type=int, default=256, help="tile size in LR pixels")
    p.add_argument("--chop_stride", type=int, default=None, help="tile stride in LR pixels (default 7/8 of the tile)")
    p.add_argument("--blend", choices=("average", "gaussian"), default="average",
                   help="tile blending: average = the original's (bit-exact), gaussian = seam-free")
    p.add_argument("--one_step", type=str2bool, default=True, help="one-step sampling (false: 15-step)")
    p.add_argument("--ddim", type=str2bool, default=False, help="multi-step: DDIM instead of ancestral")
    p.add_argument("--suffix", default="", help="appended to output file stems")
    p.add_argument("--ext", default="png", choices=("png", "jpg", "webp", "auto"), help="output format")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if present)")
    p.add_argument("--fp32", action="store_true", help="keep the autoencoder in float32 on CUDA")
    p.add_argument("--compare", action="store_true", help="also write <name>_compare.png side-by-side views")
    p.add_argument("--skip_existing", action="store_true", help="skip images whose output exists (resume)")
    p.add_argument("--deploy", type=Path, default=None,
                   help="packed 1-bit file from scripts/export_deploy.py (integer execution; --ckpt unused)")
    p.add_argument("--tile_batch", type=int, default=1, help="tiles sampled together (faster, other noise)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    return InferenceOptions(**vars(p.parse_args()))


if __name__ == "__main__":
    options = parse_args()
    try:
        sys.exit(run(options))
    except (ConfigError, CheckpointError, DeployFileError, MissingWeightsError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
