"""Plot a run's train_log.csv (loss) and val_log.csv (PSNR) into one PNG.

    python scripts/plot_training.py experiments/smoke            # writes experiments/smoke/curves.png
"""
import csv
import sys
from pathlib import Path

from bimacosr.cli import argument_parser


def read(path: Path, column: str) -> tuple[list[int], list[float]]:
    if not path.exists():
        return [], []
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(column)]
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


def main() -> int:
    p = argument_parser(__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default <run_dir>/curves.png)")
    args = p.parse_args()
    steps, loss = read(args.run_dir / "train_log.csv", "loss")
    vsteps, psnr = read(args.run_dir / "val_log.csv", "psnr")
    if not steps:
        sys.exit(f"error: no training log at {args.run_dir / 'train_log.csv'}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if psnr else 1, figsize=(10 if psnr else 5, 3.5), squeeze=False)
    axes[0][0].plot(steps, loss)
    axes[0][0].set(xlabel="step", ylabel="latent MSE", yscale="log", title="training loss")
    if psnr:
        axes[0][1].plot(vsteps, psnr, marker="o")
        axes[0][1].set(xlabel="step", ylabel="PSNR (dB, Y)", title="validation")
    fig.tight_layout()
    out = args.out or args.run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
