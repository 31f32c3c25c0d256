"""Distill a binary one-step BiMaCoSR student from the full-precision ResShift teacher.

    python main_distill.py --cfg_path configs/BiMaCoSR.yaml --save_dir experiments/bimacosr
    torchrun --standalone --nproc_per_node=8 main_distill.py --cfg_path configs/BiMaCoSR.yaml --save_dir experiments/bimacosr
    python main_distill.py --cfg_path configs/BiMaCoSR.yaml --save_dir experiments/bimacosr --resume   # latest checkpoint
"""
import sys
from pathlib import Path

from bimacosr.cli import argument_parser
from bimacosr.train.trainer import TrainOptions, train


def parse_args() -> TrainOptions:
    p = argument_parser(__doc__)
    p.add_argument("--cfg_path", type=Path, required=True, help="original YAML training config")
    p.add_argument("--save_dir", type=Path, required=True, help="run folder: checkpoints, logs, validation grids")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue a run: alone = the newest checkpoint in --save_dir that loads (newer broken "
                        "ones are skipped with a warning), or PATH = a checkpoints/step_* folder")
    p.add_argument("--steps", type=int, default=None, help="override diffusion.params.steps (teacher steps)")
    p.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one error line")
    return TrainOptions(**vars(p.parse_args()))


if __name__ == "__main__":
    sys.exit(train(parse_args()))
