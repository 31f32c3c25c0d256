"""One prepared check of every CUDA path, in a few minutes; prints a table (and --json rows).

Checks, each on random weights of the config's architecture (released by default):
``autoencoder_fp16`` the half-precision VQ autoencoder the original runs on GPU (vs fp32) |
``int_mm`` the deploy layers' integer GEMM on the device, shapes inside and outside its limits
(exact vs float) | ``deploy_layers`` every binary layer of a deploy model vs its simulated twin |
``train_step`` one NCCL (gloo on CPU) distillation step, world size 1, ``--batch`` images |
``benchmark`` the interleaved benchmark rows (``scripts/benchmark.py``).

    python scripts/gpu_check.py                           # on a CUDA machine, ~3-5 minutes
    python scripts/gpu_check.py --device cpu --config configs/smoke.yaml --checks int_mm deploy_layers

Exits 2 with one line when CUDA is asked for and absent, 1 when a check fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bimacosr.cli import argument_parser

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("autoencoder_fp16", "int_mm", "deploy_layers", "train_step", "benchmark")


def check_autoencoder_fp16(cfg, device: torch.device, args) -> str:
    from bimacosr import build
    from bimacosr.models.first_stage import decode_first_stage, encode_first_stage
    half_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # fp16 convs need CUDA
    torch.manual_seed(0)
    vq = build.build_autoencoder(cfg, device, weights=False)
    half = build.build_autoencoder(cfg, device, half_dtype, weights=False)
    half.load_state_dict(vq.state_dict())
    y = torch.rand(1, 3, 64, 64, device=device) * 2 - 1
    with torch.inference_mode():
        ref = decode_first_stage(vq, encode_first_stage(vq, y, up_sample=True))
        out = decode_first_stage(half, encode_first_stage(half, y, up_sample=True))
    if not torch.isfinite(out).all():
        raise AssertionError("non-finite output")
    return f"{half_dtype} 64² -> 256², max |half - fp32| = {(out - ref).abs().max().item():.3g}"


def check_int_mm(cfg, device: torch.device, args) -> str:
    from bimacosr.deploy.layers import int_matmul
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 64, 64), (17, 64, 64), (4096, 160, 320), (33, 36, 16), (64, 1440, 8), (3, 5, 7)]
    for m, k, n in shapes:
        a = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8)
        out = int_matmul(a.to(device), b.to(device)).float().cpu()
        if not torch.equal(out, a.float() @ b.float()):
            raise AssertionError(f"int_matmul differs at shape {m}x{k}x{n}")
    return f"{len(shapes)} shapes exact (M<=16 padding, K/N not multiples of 8)"


def check_deploy_layers(cfg, device: torch.device, args) -> str:
    import copy

    from bimacosr import build
    from bimacosr.deploy import to_deploy
    from bimacosr.deploy.check import LAYER_TOLERANCE, layerwise_max_diff
    from bimacosr.smoke import randomize
    torch.manual_seed(0)
    sim = randomize(build.build_denoiser_from_config(cfg, "student")).eval().to(device)
    h, w = 64, 128  # latent = LQ size, non-square
    x, lq = torch.randn(2, 3, h, w, device=device), torch.rand(2, 3, h, w, device=device) * 2 - 1
    t = torch.full((2,), 14, device=device)
    diffs = layerwise_max_diff(sim, to_deploy(copy.deepcopy(sim)), x, t, lq=lq)
    worst = max(diffs.values())
    if worst > LAYER_TOLERANCE["float32"]:
        raise AssertionError(f"deploy layer {max(diffs, key=diffs.get)} differs from its simulated twin by "
                             f"{worst:.3g} (> {LAYER_TOLERANCE['float32']:g})")
    return f"{len(diffs)} binary layers, batch 2, {h}x{w} latent, worst max |deploy - simulated| = {worst:.2g}"


def check_train_step(cfg, device: torch.device, args) -> str:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bimacosr import build
    from bimacosr.smoke import randomize
    from bimacosr.train.distill import distill_loss
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        teacher = build.freeze(randomize(build.build_denoiser_from_config(cfg, "teacher"))).to(device)
        student = randomize(build.build_denoiser_from_config(cfg, "student")).to(device).train()
        model = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
        vq = build.build_autoencoder(cfg, device, build.resolve_precision("auto", device, cfg).autoencoder_dtype,
                                     weights=False)
        schedule = build.build_schedule(cfg, device)
        opt = torch.optim.AdamW(student.parameters(), lr=2e-5)
        size = int(cfg.degradation.gt_size) // schedule.sf
        lq = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
        _sync(device)
        t = time.perf_counter()
        loss, _ = distill_loss(model, teacher, vq, schedule, lq, torch.randn_like(lq), sf=schedule.sf)
        loss.backward()
        opt.step()
        _sync(device)
        if not torch.isfinite(loss):
            raise AssertionError("non-finite loss")
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        return f"batch {args.batch}, {time.perf_counter() - t:.2f} s/step, loss {loss.item():.4g}{peak}"
    finally:
        dist.destroy_process_group()


def check_benchmark(cfg, device: torch.device, args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "benchmark.json"
        cmd = [sys.executable, str(REPO / "scripts/benchmark.py"), "--device", str(device), "--rounds", "3",
               "--config", str(args.config), "--variants", "sinsr", "sinsr_bf16", "deploy", "--sizes", "64", "256",
               "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = json.loads(out.read_text())
    return "; ".join(f"{r['variant']} {r['lr']}²: {r['total']:.3f} s ({r['vs_sinsr']['total']:.2f}x)" for r in rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RUNNERS: dict[str, Callable] = {name: globals()[f"check_{name}"] for name in CHECKS}


def main(argv: list[str] | None = None) -> int:
    p = argument_parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (for a dry run of the small checks)")
    p.add_argument("--config", type=Path, default=REPO / "configs/BiMaCoSR.yaml")
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--batch", type=int, default=8, help="training-step batch")
    p.add_argument("--json", type=Path, help="write the result rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run this on a GPU machine, "
              "or pass --device cpu for a dry run", file=sys.stderr)
        return 2
    from bimacosr.config import load_config
    cfg = load_config(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows, failed = [], 0
    print(f"| check ({name}, torch {torch.__version__}) | status | seconds | result |\n|---|---|---|---|")
    for check in args.checks:
        t = time.perf_counter()
        try:
            status, result = "ok", RUNNERS[check](cfg, device, args)
        except Exception as err:  # a failing check is reported and the others still run
            status, result, failed = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0], failed + 1
        rows.append({"check": check, "status": status, "seconds": time.perf_counter() - t, "result": result,
                     "device": name})
        print(f"| {check} | {status} | {rows[-1]['seconds']:.1f} | {result} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
