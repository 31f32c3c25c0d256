"""BiMaCoSR inference: a folder (or one file) of low-resolution images -> 4x super-resolved images.

    python inference_quant.py -i examples/ -o results/
    python inference_quant.py -i photo.jpg -o results/ --suffix out --compare --ref_path gt/
    python inference_quant.py -i examples/ -o results/smoke --smoke    # no weights needed: tiny random ones
    torchrun --nproc_per_node=4 inference_quant.py -i big_set/ -o results/     # files split over 4 GPUs

Flags of the original (--task, --steps, --infer_steps, --ref_path, ...) are accepted; docs/cli.md §2
lists each and what it does here.
"""
import argparse
import sys
from pathlib import Path

from bimacosr.build import PRECISIONS
from bimacosr.checkpoint import CheckpointError
from bimacosr.cli import argument_parser
from bimacosr.config import ConfigError
from bimacosr.deploy import DeployFileError
from bimacosr.evaluation import EvaluationError
from bimacosr.inference import InferenceOptions, default, run


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> InferenceOptions:
    p = argument_parser(__doc__)

    def add(*names: str, **kw) -> None:  # an option whose default lives in InferenceOptions
        p.add_argument(*names, **kw, default=default(names[-1].lstrip("-")))

    p.add_argument("-i", "--in_path", type=Path, required=True, help="LR image file or folder")
    p.add_argument("-o", "--out_path", type=Path, required=True, help="output folder (created)")
    add("--config", type=Path, help="original YAML config")
    add("--ckpt", type=Path, help="BiMaCoSR checkpoint (scripts/download_weights.py inference)")
    add("--deploy", type=Path, help="packed 1-bit file from scripts/export_deploy.py (used instead of --ckpt)")
    add("--task", help="the original's task name; this model does real-world x4 SR")
    add("--scale", type=int, help="SR factor (must match the config)")
    add("-s", "--outscale", type=float, help="final scale as Real-ESRGAN's -s: SR x4, then an antialiased "
                                             "bicubic resize to this factor of the input, e.g. 2 or 3.5")
    add("--seed", type=int, help="noise seed (same noise for every image)")
    add("--one_step", type=str2bool, help="one-step sampling (false: multi-step)")
    add("--ddim", type=str2bool, help="multi-step: DDIM instead of ancestral")
    add("--steps", type=int, help="diffusion steps of the schedule (default: the config's)")
    add("--infer_steps", type=int, help="multi-step sampling steps (respacing; default: all)")
    add("-t", "--tile", "--chop_size", dest="chop_size", type=int,
        help="tile size in LR pixels (raised to the model's minimum, 64); -t/--tile as in Real-ESRGAN")
    add("--chop_stride", type=int, help="tile stride in LR pixels (default 7/8 of the tile)")
    add("--blend", choices=("average", "gaussian"), help="tile blending: average = the original's, gaussian = seam-free")
    add("--tile_batch", type=int, help="tiles sampled together (faster, other noise)")
    add("--ref_path", type=Path, help="GT folder: score the outputs with the paper's metrics afterwards")
    add("--suffix", help="output name suffix: a.png -> a_<suffix>.png")
    add("--ext", choices=("png", "jpg", "webp", "auto"), help="output format (auto: the input's)")
    add("--device", help="cpu, cuda, cuda:1, ... (default: CUDA if present)")
    add("--precision", choices=PRECISIONS, help="auto: fp16 autoencoder on CUDA, bf16 on CPUs that have it, "
        "else fp32-fast (Winograd convolutions); fp32: the original's operations")
    p.add_argument("--fp32", action="store_true", help="same as --precision fp32")
    p.add_argument("--compare", action="store_true", help="also write <name>_compare.png side-by-side views")
    p.add_argument("--skip_existing", action="store_true", help="skip images whose output exists (resume)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--smoke", action="store_true",
                   help="try it without the released weights: tiny random weights (configs/smoke.yaml), noise out")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return InferenceOptions(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    options = parse_args()
    try:
        sys.exit(run(options))
    except (ConfigError, CheckpointError, DeployFileError, EvaluationError, OSError, ValueError) as exc:
        if options.debug:
            raise
        sys.exit(f"error: {exc}")
