"""Export a BiMaCo checkpoint to the packed deploy file (1-bit weights, .safetensors).

    python scripts/export_deploy.py --ckpt weights/bimacosr.pth --config configs/BiMaCoSR.yaml \
        --out weights/bimacosr_deploy.safetensors [--fp16] [--check]

Prints the file size and the ratio to the FP SinSR denoiser in float32 (474.37 MB). ``--fp16``
stores the side branches (LRMB, SMB values, biases, RPReLU, GroupNorms) as float16. ``--check``
loads the file back and compares it with the simulated model on a random input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bimacosr.checkpoint import CheckpointError
from bimacosr.config import ConfigError
from bimacosr.build import export_checkpoint
from bimacosr.deploy import DeployFileError, load_deploy
from bimacosr.weights import MissingWeightsError


def check(ckpt: Path, config: Path, out: Path, size: int = 64) -> tuple[float, float]:
    """``(max per-layer diff, whole-model diff)`` of the loaded file vs the simulated model on
    one random latent/LR pair (t = 0). Per layer, each deploy layer gets its simulated twin's
    input; the whole-model number can be large on random weights (sign flips of near-zero
    activations, see bimacosr/deploy/check.py), not on trained ones."""
    from bimacosr.build import InferenceFiles, build_inference_denoiser
    from bimacosr.config import load_config
    from bimacosr.deploy.check import layerwise_max_diff, model_max_diff

    simulated = build_inference_denoiser(load_config(config), InferenceFiles(None, ckpt=ckpt))
    deployed = load_deploy(out)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)
    lq = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    t = torch.zeros(1, dtype=torch.long)
    per_layer = max(layerwise_max_diff(simulated, deployed, x, t, lq=lq).values())
    return per_layer, model_max_diff(simulated, deployed, x, t, lq=lq)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="BiMaCo checkpoint (.pth/.safetensors)")
    p.add_argument("--config", type=Path, default=REPO / "configs/BiMaCoSR.yaml")
    p.add_argument("--out", type=Path, required=True, help="deploy file to write (.safetensors)")
    p.add_argument("--fp16", action="store_true", help="store the side branches as float16")
    p.add_argument("--check", action="store_true", help="load back and compare with the simulated model")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        info = export_checkpoint(args.ckpt, args.config, args.out, fp16=args.fp16)
        print(info.line())
        if args.check:
            per_layer, whole = check(args.ckpt, args.config, args.out)
            print(f"max |deploy - simulated| on a random 64x64 input: per layer {per_layer:.3g}, "
                  f"whole model {whole:.3g}")
    except (CheckpointError, ConfigError, DeployFileError, MissingWeightsError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
