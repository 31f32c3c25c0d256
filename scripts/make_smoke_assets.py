"""Write tiny random teacher / SinSR / BiMaCo / VQ-f4 checkpoints and a small HR set cut from
scikit-image photographs into data/smoke/, as configs/smoke.yaml expects.

    python scripts/make_smoke_assets.py
    torchrun --standalone --nproc_per_node=2 main_distill.py --cfg_path configs/smoke.yaml --save_dir experiments/smoke
"""
from pathlib import Path

from bimacosr.cli import argument_parser
from bimacosr.config import load_config
from bimacosr.smoke import write_smoke_assets

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argument_parser(__doc__)
    p.add_argument("--config", type=Path, default=REPO / "configs/smoke.yaml")
    p.add_argument("--root", type=Path, default=Path("."), help="folder the config's relative paths start from")
    p.add_argument("--n_train", type=int, default=8)
    args = p.parse_args()
    weights = write_smoke_assets(load_config(args.config), args.root, n_train=args.n_train)
    for role, path in weights.items():
        print(f"{role:12s} {path}")
    config = args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
    print("next, from the repository folder (tiny random weights: the pictures are noise):\n"
          f"  python inference_quant.py -i examples -o results/smoke --config {config} --ckpt {weights['student']}\n"
          "  torchrun --standalone --nproc_per_node=2 main_distill.py --cfg_path configs/smoke.yaml --save_dir experiments/smoke\n"
          "  python app.py --smoke")
