"""Seconds and peak memory per image of the one-step BiMaCoSR pipeline, split encode / UNet / decode.

Released architecture (full-size BiMaCo UNet + VQ-f4) with random weights: speed does not depend
on the values. Each LR size runs in a fresh process so its peak memory is its own (peak RSS on
CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    python scripts/benchmark.py --sizes 64 256 --device cpu --json bench.json
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def measure(size: int, device: str, repeat: int, fp16: bool) -> dict:
    """Time the three stages on one ``size x size`` LR image (best of ``repeat``)."""
    from bimacosr.config import load_config, to_plain
    from bimacosr.diffusion import Schedule, prior_sample, sample_one_step
    from bimacosr.models import build_denoiser
    from bimacosr.models.autoencoder import VQAutoencoder
    from bimacosr.models.first_stage import decode_first_stage, encode_first_stage
    from bimacosr.pipeline import pad_to_multiple

    cfg = load_config(REPO / "configs/BiMaCoSR.yaml")
    dev = torch.device(device)
    unet = build_denoiser(to_plain(cfg.model.params)).to(dev).eval()
    vq = VQAutoencoder(**to_plain(cfg.autoencoder.params)).to(dev).eval()
    vq = vq.half() if fp16 else vq
    schedule = Schedule.from_config(to_plain(cfg.diffusion.params)).to(dev)
    lq = pad_to_multiple(torch.rand(1, 3, size, size, device=dev) * 2 - 1, 64)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    best = {"encode": float("inf"), "unet": float("inf"), "decode": float("inf")}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(repeat):
            sync(); t0 = time.perf_counter()
            z_y = encode_first_stage(vq, lq, up_sample=True)
            sync(); t1 = time.perf_counter()
            x_T = prior_sample(z_y, schedule, torch.randn_like(z_y))
            z0 = sample_one_step(lambda x, t: unet(x, t, lq=lq), x_T, z_y, schedule)
            sync(); t2 = time.perf_counter()
            decode_first_stage(vq, z0)
            sync(); t3 = time.perf_counter()
            for key, value in (("encode", t1 - t0), ("unet", t2 - t1), ("decode", t3 - t2)):
                best[key] = min(best[key], value)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"lr": size, "sr": 4 * size, "device": device, **best, "total": sum(best.values()),
            "peak_mib": peak / 2**20, "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="LR sides")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--fp32", action="store_true", help="float32 autoencoder on CUDA (default fp16 as released)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    fp16 = args.device.startswith("cuda") and not args.fp32
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.repeat, fp16)))
        return 0
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), "--device", args.device, "--repeat", str(args.repeat)]
        out = subprocess.run(cmd + (["--fp32"] if args.fp32 else []), capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"| LR -> SR | device | encode s | UNet s | decode s | total s | UNet share | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']}² -> {r['sr']}² | {r['device']} ({r['threads']} thr) | {r['encode']:.2f} | {r['unet']:.2f} | "
              f"{r['decode']:.2f} | {r['total']:.2f} | {r['unet'] / r['total']:.0%} | {r['peak_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
