"""Seconds per training iteration and peak memory at the released architecture, split into
degradation / teacher target (15 DDIM passes) / the rest (encode, student forward+backward, AdamW).

Random weights (speed does not depend on them), a synthetic HR batch of the released size; the
step is the trainer's own ``distill_loss`` with parts from ``bimacosr.build``.

    python scripts/benchmark_train.py --batch 8 --device cuda      # the issue's setting (one GPU)
    python scripts/benchmark_train.py --batch 1 --gt_size 256       # what a CPU can do
"""
from __future__ import annotations

import random
import resource
import sys
import time

import numpy as np
import torch

from bimacosr import build
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, load_config
from bimacosr.cpu import describe
from bimacosr.data.datasets import BLUR1, BLUR2
from bimacosr.data.degradation import degrade
from bimacosr.data.kernels import sample_final_sinc
from bimacosr.train.distill import distill_loss


def main() -> int:
    p = argument_parser(__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gt_size", type=int, default=256)
    p.add_argument("--iters", type=int, default=2, help="timed iterations (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    print(describe() + (f"; GPU: {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""), flush=True)
    cfg = load_config(DEFAULT_CONFIG)
    torch.manual_seed(0)
    teacher = build.freeze(build.build_denoiser_from_config(cfg, "teacher")).to(dev)
    student = build.build_denoiser_from_config(cfg, "student").to(dev).train()
    vq = build.build_autoencoder(cfg, dev, build.resolve_precision("auto", dev, cfg).autoencoder_dtype, weights=False)
    schedule = build.build_schedule(cfg, dev)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    np_rng, rng = np.random.default_rng(0), random.Random(0)

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    teacher_s = [0.0]
    forward = teacher.forward

    def timed_teacher(*a, **kw):
        t = sync()
        out = forward(*a, **kw)
        teacher_s[0] += sync() - t
        return out

    teacher.forward = timed_teacher
    times = {"degradation": 0.0, "teacher": 0.0, "rest": 0.0}
    for it in range(args.iters + 1):
        gt = torch.rand(args.batch, 3, args.gt_size, args.gt_size, device=dev)
        k1 = torch.stack([torch.from_numpy(BLUR1.sample(np_rng, rng)).float() for _ in range(args.batch)]).to(dev)
        k2 = torch.stack([torch.from_numpy(BLUR2.sample(np_rng, rng)).float() for _ in range(args.batch)]).to(dev)
        sinc = torch.stack([torch.from_numpy(sample_final_sinc(0.8, BLUR2.pad_size, np_rng, rng)).float()
                            for _ in range(args.batch)]).to(dev)
        t0 = sync()
        lq = degrade(gt, k1, k2, sinc, cfg.degradation, generator=torch.Generator(dev).manual_seed(it), rng=rng) * 2 - 1
        t1 = sync()
        teacher_s[0] = 0.0
        noise = torch.randn(args.batch, 3, args.gt_size // 4, args.gt_size // 4, device=dev)
        loss, _ = distill_loss(student, teacher, vq, schedule, lq, noise, sf=schedule.sf)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = sync()
        if it:  # the first iteration warms up allocators and kernels
            for key, value in (("degradation", t1 - t0), ("teacher", teacher_s[0]), ("rest", t2 - t1 - teacher_s[0])):
                times[key] += value / args.iters
    total = sum(times.values())
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print("| device | batch | GT | degradation s | teacher (15 DDIM) s | encode + student fwd/bwd + AdamW s | s/iter "
          "| teacher share | peak MiB |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.device} ({torch.get_num_threads()} thr) | {args.batch} | {args.gt_size}² | {times['degradation']:.2f} | "
          f"{times['teacher']:.2f} | {times['rest']:.2f} | {total:.2f} | {times['teacher'] / total:.0%} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
