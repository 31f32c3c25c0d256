"""Seconds per training iteration and peak memory at the released architecture, split into
degradation / teacher target (15 DDIM passes) / student forward+backward+AdamW.

Random weights (speed does not depend on them), a synthetic HR batch of the released size.

    python scripts/benchmark_train.py --batch 8 --device cuda      # the issue's setting (one GPU)
    python scripts/benchmark_train.py --batch 1 --gt_size 256       # what a CPU can do
"""
import argparse
import random
import resource
import sys
import time
from pathlib import Path

import torch

from bimacosr.config import load_config, to_plain
from bimacosr.data.degradation import degrade
from bimacosr.data.datasets import BLUR1, BLUR2
from bimacosr.data.kernels import sample_final_sinc
from bimacosr.diffusion import Schedule, predict_x0, prior_sample
from bimacosr.models import build_denoiser
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.models.first_stage import encode_first_stage
from bimacosr.train.distill import teacher_target

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gt_size", type=int, default=256)
    p.add_argument("--iters", type=int, default=2, help="timed iterations (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    cfg = load_config(REPO / "configs/BiMaCoSR.yaml")
    teacher = build_denoiser(to_plain(cfg.model_teacher.params)).to(dev).eval().requires_grad_(False)
    student = build_denoiser(to_plain(cfg.model.params)).to(dev).train()
    vq = VQAutoencoder(**to_plain(cfg.autoencoder.params)).to(dev).eval().requires_grad_(False)
    vq = vq.half() if dev.type == "cuda" else vq
    schedule = Schedule.from_config(to_plain(cfg.diffusion.params)).to(dev)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    np_rng, rng = __import__("numpy").random.default_rng(0), random.Random(0)

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    times = {"degradation": 0.0, "teacher": 0.0, "student": 0.0}
    for it in range(args.iters + 1):
        gt = torch.rand(args.batch, 3, args.gt_size, args.gt_size, device=dev)
        k1 = torch.stack([torch.from_numpy(BLUR1.sample(np_rng, rng)).float() for _ in range(args.batch)]).to(dev)
        k2 = torch.stack([torch.from_numpy(BLUR2.sample(np_rng, rng)).float() for _ in range(args.batch)]).to(dev)
        sinc = torch.stack([torch.from_numpy(sample_final_sinc(0.8, BLUR2.pad_size, np_rng, rng)).float() for _ in range(args.batch)]).to(dev)
        t0 = sync()
        lq = degrade(gt, k1, k2, sinc, cfg.degradation, generator=torch.Generator(dev).manual_seed(it), rng=rng) * 2 - 1
        t1 = sync()
        z_y = encode_first_stage(vq, lq, up_sample=True)
        x_T = prior_sample(z_y, schedule, torch.randn_like(z_y))
        target = teacher_target(teacher, x_T, z_y, lq, schedule)
        t2 = sync()
        pred = predict_x0(lambda x, t: student(x, t, lq=lq), x_T, schedule.num_timesteps - 1, schedule)
        loss = ((pred - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = sync()
        if it:  # the first iteration warms up allocators and kernels
            for key, value in (("degradation", t1 - t0), ("teacher", t2 - t1), ("student", t3 - t2)):
                times[key] += value / args.iters
    total = sum(times.values())
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(f"| device | batch | GT | degradation s | teacher (15 DDIM) s | student fwd+bwd+AdamW s | s/iter | teacher share | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.device} ({torch.get_num_threads()} thr) | {args.batch} | {args.gt_size}² | {times['degradation']:.2f} | "
          f"{times['teacher']:.2f} | {times['student']:.2f} | {total:.2f} | {times['teacher'] / total:.0%} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
