"""How much the SR image moves when the pipeline runs in bf16 (or fp32-fast) instead of fp32, on photographs.

Builds the released architecture with random weights (or loads --ckpt / --deploy and the config's
autoencoder when given), super-resolves LR crops of scikit-image photographs once in fp32 and once
in ``--precision`` (bf16 autocast, or ``fp32-fast``: Winograd convolutions) with the same noise,
and prints PSNR and max |difference| of the uint8 images. With random weights this is evidence
about the arithmetic only, not about image quality.

    python scripts/precision_diff.py --size 64 [--photos astronaut coffee chelsea] [--deploy] [--precision fp32-fast]
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from bimacosr import build
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, load_config
from bimacosr.deploy import export_deploy, load_deploy
from bimacosr.imageio import to_uint8
from bimacosr.pipeline import SRPipeline
from bimacosr.smoke import downscale, photo, randomize


def random_pipeline(cfg, deploy: bool, autocast: torch.dtype | None) -> SRPipeline:
    """Random-weight denoiser (simulated, or exported and loaded as a deploy file) + autoencoder."""
    torch.manual_seed(0)
    denoiser = randomize(build.build_denoiser_from_config(cfg, "student")).eval()
    if deploy:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "d.safetensors"
            export_deploy(denoiser, build.plain_params(cfg), path)
            denoiser = load_deploy(path)
    vq = randomize(build.build_autoencoder(cfg, weights=False))
    schedule = build.build_schedule(cfg)
    return SRPipeline(denoiser, vq, schedule, sf=schedule.sf, autocast=autocast)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--size", type=int, default=64, help="LR crop side (pixels)")
    p.add_argument("--photos", nargs="+", default=["astronaut", "coffee", "chelsea"])
    p.add_argument("--deploy", action="store_true", help="the packed 1-bit deploy denoiser")
    p.add_argument("--precision", choices=("bf16", "fp32-fast"), default="bf16", help="compared with fp32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    pipe = random_pipeline(cfg, args.deploy, None)
    print(f"| photo | LR | SR | PSNR {args.precision} vs fp32 (dB) | max abs (of 255) |\n|---|---|---|---|---|")
    for name in args.photos:
        lr_np = downscale(photo(name), 4)[: args.size, : args.size]
        lr = torch.from_numpy(np.ascontiguousarray(lr_np)).permute(2, 0, 1)[None].float() / 255
        outs = []
        for prec_name in ("fp32", args.precision):  # as --precision runs them: autocast, autoencoder layout
            prec = build.resolve_precision(prec_name, torch.device("cpu"))
            pipe.autocast, pipe.fast_float32 = prec.autocast, prec.fast_float32
            pipe.autoencoder.to(memory_format=prec.autoencoder_format)
            outs.append(to_uint8(pipe(lr, generator=torch.Generator().manual_seed(0))))
        diff = int(np.abs(outs[0].astype(int) - outs[1].astype(int)).max())
        print(f"| {name} | {args.size}² | {4 * args.size}² | {psnr(*outs):.1f} | {diff} |")


if __name__ == "__main__":
    main()
