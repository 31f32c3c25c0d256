"""Export a BiMaCo checkpoint to the packed deploy file (1-bit weights, .safetensors).

    python scripts/export_deploy.py --ckpt weights/BiMaCoSR.pth --config configs/BiMaCoSR.yaml \
        --out weights/BiMaCoSR_deploy.safetensors [--fp16] [--check]

Prints the file size and the ratio to the same architecture in full precision (float32; for
configs/BiMaCoSR.yaml that is FP SinSR, 474.37 MB). ``--fp16`` stores the side branches (LRMB, SMB
values, biases, RPReLU, GroupNorms) as float16. ``--check`` loads the file back, compares every
binary layer with the simulated model's on a random input and prints PASS or FAIL against the
stated tolerance (exit status 1 on FAIL; bimacosr/deploy/check.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bimacosr.build import deployable_denoiser
from bimacosr.checkpoint import CheckpointError
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, ConfigError
from bimacosr.deploy import DeployFileError, export_deploy, load_deploy
from bimacosr.deploy.check import check_export
from bimacosr.weights import MissingWeightsError


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--ckpt", type=Path, required=True, help="BiMaCo checkpoint (.pth/.safetensors)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config the checkpoint was trained with")
    p.add_argument("--out", type=Path, required=True, help="deploy file to write (.safetensors)")
    p.add_argument("--fp16", action="store_true", help="store the side branches as float16")
    p.add_argument("--check", action="store_true", help="load back and compare with the simulated model")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        simulated, params = deployable_denoiser(args.ckpt, args.config)
        info = export_deploy(simulated, params, args.out, fp16=args.fp16)
        print(info.line())
        if args.check:  # the written file against the simulated model it came from
            result = check_export(simulated, load_deploy(info.path), info.side_dtype)
            print(result.line())
            if not result.passed:
                return 1
    except (CheckpointError, ConfigError, DeployFileError, MissingWeightsError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
