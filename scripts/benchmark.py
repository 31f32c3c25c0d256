"""Speed, peak memory and file size of the SR pipeline variants, on the same random weights/inputs.

Variants (released architecture, random weights: speed does not depend on the values):
``resshift`` FP UNet, 15 ancestral steps | ``sinsr`` FP UNet, one step | ``sim`` BiMaCo UNet as
trained (simulated binarization), one step | ``deploy`` packed 1-bit file, integer execution.
Each (variant, LR size) runs in a fresh process, so its peak memory is its own (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). Times are split encode / UNet / decode.

    python scripts/benchmark.py --sizes 64 256 --variants deploy            # per-stage table (LR 64², 256²)
    python scripts/benchmark.py --variants resshift sinsr sim deploy --json bench.json --plot bench.png
    python scripts/benchmark.py --variants deploy --sizes 1024 --tile 256   # memory flat with tiling
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("resshift", "sinsr", "sim", "deploy")


def export_random_deploy(path: Path) -> None:
    """The packed file of a random-weight BiMaCo UNet (built here, so the measured processes
    never hold the simulated model)."""
    from bimacosr.config import load_config, to_plain
    from bimacosr.deploy import export_deploy
    from bimacosr.models import build_denoiser
    from bimacosr.smoke import randomize

    torch.manual_seed(0)
    params = to_plain(load_config(REPO / "configs/BiMaCoSR.yaml").model.params)
    export_deploy(randomize(build_denoiser(params)).eval(), params, path)  # no all-zero (untrained) layers


def measure(variant: str, size: int, device: str, tile: int, repeat: int, deploy_file: Path | None) -> dict:
    """Seconds per stage (best of ``repeat``) for one ``size x size`` LR image."""
    from bimacosr.config import load_config, to_plain
    from bimacosr.deploy import load_deploy
    from bimacosr.diffusion import Schedule
    from bimacosr.models import build_denoiser, split_params
    from bimacosr.models.autoencoder import VQAutoencoder
    from bimacosr.pipeline import SRPipeline

    torch.manual_seed(0)
    cfg, dev = load_config(REPO / "configs/BiMaCoSR.yaml"), torch.device(device)
    params = to_plain(cfg.model.params)
    if variant == "deploy":
        unet, size_bytes = load_deploy(deploy_file, device=dev), deploy_file.stat().st_size
    else:
        unet = build_denoiser(split_params(params)[0] if variant in ("resshift", "sinsr") else params).eval()
        size_bytes = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
    vq = VQAutoencoder(**to_plain(cfg.autoencoder.params)).eval().to(dev)
    vq = vq.half() if dev.type == "cuda" else vq
    schedule = Schedule.from_config(to_plain(cfg.diffusion.params))
    pipe = SRPipeline(unet.to(dev), vq, schedule.to(dev), sampler="ancestral" if variant == "resshift" else "one_step")
    stages = {"encode": 0.0, "unet": 0.0, "decode": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            stages[name] += time.perf_counter() - t0
            return out
        return wrapper

    vq.encode, vq.decode, pipe.denoiser.forward = timed("encode", vq.encode), timed("decode", vq.decode), \
        timed("unet", pipe.denoiser.forward)
    lr = torch.rand(1, 3, size, size)
    best = None
    for _ in range(repeat):
        stages.update(encode=0.0, unet=0.0, decode=0.0)
        t0 = time.perf_counter()
        pipe(lr, tile=tile, generator=torch.Generator(dev).manual_seed(0))
        total = time.perf_counter() - t0
        if best is None or total < best["total"]:
            best = {**stages, "total": total}
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "lr": size, "device": device, "threads": torch.get_num_threads(), **best,
            "peak_mib": peak / 2**20, "file_mb": size_bytes / 1e6}


def table(rows: list[dict]) -> str:
    base = {r["lr"]: r for r in rows if r["variant"] == "sinsr"}
    lines = ["| variant | LR -> SR | device | encode s | UNet s | decode s | end-to-end s | UNet vs SinSR | "
             "e2e vs SinSR | peak MiB | file MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base.get(r["lr"])
        ratio = (lambda k: f"{ref[k] / r[k]:.2f}x" if ref else "-")
        lines.append(f"| {r['variant']} | {r['lr']}² -> {4 * r['lr']}² | {r['device']} ({r['threads']} thr) | "
                     f"{r['encode']:.2f} | {r['unet']:.2f} | {r['decode']:.2f} | {r['total']:.2f} | "
                     f"{ratio('unet')} | {ratio('total')} | {r['peak_mib']:.0f} | {r['file_mb']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\n{r['lr']}²" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(axes, ("unet", "total", "file_mb"), ("UNet s", "end-to-end s", "file MB")):
        ax.bar(labels, [r[key] for r in rows], color="#4878a8")
        ax.set_title(title)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[64], help="LR sides")
    p.add_argument("--tile", type=int, default=256, help="tile size in LR pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="bar-chart PNG")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        deploy = Path(args.one[2]) if args.one[2] != "-" else None
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.device, args.tile, args.repeat, deploy)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        deploy = Path(tmp) / "bimacosr_deploy.safetensors"
        if "deploy" in args.variants:
            export_random_deploy(deploy)
        for size in args.sizes:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--one", variant, str(size), str(deploy) if variant == "deploy" else "-",
                       "--device", args.device, "--tile", str(args.tile), "--repeat", str(args.repeat)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
