"""Regenerate examples/: low-resolution inputs made from scikit-image photographs with this
project's Real-ESRGAN second-order degradation, bit for bit.

    python scripts/make_examples.py                 # rewrites examples/*.png
    python scripts/make_examples.py --out /tmp/ex   # somewhere else, e.g. to compare

Each photograph (HR, cropped to a multiple of 4) is degraded as the trainer degrades its GT crops
(``bimacosr.data.degradation.degrade``): blur kernels drawn by the dataset code with the released
config's kernel settings, the config's ``degradation`` section for resizes, noise and JPEG, and the
final resize to 1/4 of the HR size. Every image has its own fixed seeds.
"""
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, REPO_ROOT, load_config, to_plain
from bimacosr.data.datasets import BLUR1, BLUR2
from bimacosr.data.degradation import degrade
from bimacosr.data.kernels import sample_final_sinc
from bimacosr.smoke import photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SEED = 2025


def make_lr(image: np.ndarray, opts: dict, final_sinc_prob: float, seed: int) -> np.ndarray:
    """One degraded LR image: ``image`` HR uint8 [H, W, 3] -> uint8 [H // 4, W // 4, 3] (H, W cut
    to multiples of ``opts['sf']`` first)."""
    sf = int(opts["sf"])
    h, w = image.shape[0] // sf * sf, image.shape[1] // sf * sf
    gt = torch.from_numpy(np.ascontiguousarray(image[:h, :w])).permute(2, 0, 1)[None].float() / 255.0
    np_rng, rng = np.random.default_rng(seed), random.Random(seed)
    kernels = [BLUR1.sample(np_rng, rng), BLUR2.sample(np_rng, rng),
               sample_final_sinc(final_sinc_prob, BLUR2.pad_size, np_rng, rng)]
    k1, k2, sinc = (torch.from_numpy(k).float()[None] for k in kernels)
    lq = degrade(gt, k1, k2, sinc, opts, generator=torch.Generator().manual_seed(seed), rng=rng)
    return (lq[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "examples", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = load_config(DEFAULT_CONFIG)
    opts = to_plain(cfg.degradation)
    final_sinc_prob = float(cfg.data.train.params.final_sinc_prob)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PHOTOS):
        lr = make_lr(photo(name), opts, final_sinc_prob, SEED + i)
        path = args.out / f"{name}.png"
        Image.fromarray(lr).save(path, optimize=True)
        print(f"{path}  {lr.shape[1]}x{lr.shape[0]}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
