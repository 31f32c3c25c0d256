"""Speed of the SR pipeline variants on the same random weights and inputs, interleaved.

Variants (released architecture, random weights: speed does not depend on the values):
``resshift`` FP UNet, 15 ancestral steps, fp32 | ``sinsr`` FP UNet, one step, fp32 (the reference,
as the original runs it on CPU) | ``sinsr_bf16`` the same under bf16 autocast (the best plain FP
option) | ``sim`` BiMaCo UNet as trained (simulated binarization) | ``deploy`` the packed 1-bit file
with this project's defaults (``--precision auto``: bf16 where native, else ``fp32-fast``; the
fused kernel when it builds) |
``realesrgan`` Real-ESRGAN x4plus (RRDBNet, 23 blocks, from ``spandrel``), what users would pick
instead, in the best precision this CPU has (bf16 channels-last where bf16 is native, else fp32);
its network time is in the UNet column.

All variants live in one process and run **interleaved**: each round runs every variant once, in
an order rotated by one per round, after one warm-up round. A shared, noisy machine slows every
variant of a round alike, so the ratios (from the same rounds) stay meaningful. Per stage
(encode / UNet / decode / total) the table gives the median and min-max wall seconds and the
process CPU seconds; the JSON rows keep ``variant, lr, encode, unet, decode, total`` (medians).
``--memory`` instead runs each variant once in a fresh process and reports its peak memory.

    python scripts/benchmark.py --sizes 64 --rounds 5 --json bench.json
    python scripts/benchmark.py --variants sinsr deploy --sizes 64 128 --memory
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bimacosr import build
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, load_config
from bimacosr.cpu import describe
from bimacosr.deploy import export_deploy, load_deploy
from bimacosr.pipeline import SRPipeline
from bimacosr.smoke import randomize

VARIANTS = ("resshift", "sinsr", "sinsr_bf16", "sim", "deploy", "realesrgan")
STAGES = ("encode", "unet", "decode", "total")


def precision_of(variant: str, cfg, device: torch.device) -> build.Precision:
    """``deploy``: this project's default (``auto``: ``fp32-fast`` on CPUs without native bf16);
    ``realesrgan``: ``auto`` as PyTorch runs it (bf16 where native, else plain fp32);
    ``sinsr_bf16``: bf16; the others fp32."""
    name = "auto" if variant in ("deploy", "realesrgan") else "bf16" if variant == "sinsr_bf16" else "fp32"
    prec = build.resolve_precision(name, device, cfg)
    return build.resolve_precision("fp32", device) if variant == "realesrgan" and prec.fast_float32 else prec


class RealESRGAN:
    """Real-ESRGAN x4plus as a pipeline: ``(lr [B, 3, H, W] in [0, 1]) -> sr [B, 3, 4H, 4W]``,
    the whole image at once (the LR sizes here are one tile), under ``autocast`` if given."""

    def __init__(self, device: torch.device, autocast: torch.dtype | None) -> None:
        from spandrel.architectures.ESRGAN import ESRGAN

        self.autocast, self.autoencoder = autocast, None
        self.denoiser = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).eval().to(device)
        if autocast is not None:
            self.denoiser = self.denoiser.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, lr: torch.Tensor, **_: object) -> torch.Tensor:
        x = lr.to(next(self.denoiser.parameters()).device)
        x = x.to(memory_format=torch.channels_last) if self.autocast is not None else x
        with torch.autocast(x.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
            return self.denoiser(x).float().clamp(0, 1)


def build_variant(variant: str, cfg, device: torch.device, deploy_file: Path) -> SRPipeline | RealESRGAN:
    """The pipeline of ``variant`` with random weights (seeded: every variant sees the same)."""
    torch.manual_seed(0)
    prec = precision_of(variant, cfg, device)
    if variant == "realesrgan":
        return RealESRGAN(device, prec.autocast)
    if variant == "deploy":
        denoiser = load_deploy(deploy_file, device=device)
    else:
        role = "student" if variant == "sim" else "fp"
        denoiser = randomize(build.build_denoiser_from_config(cfg, role)).eval().to(device)
    vq = build.build_autoencoder(cfg, device, prec.autoencoder_dtype, weights=False,
                                 memory_format=prec.autoencoder_format)
    schedule = build.build_schedule(cfg, device)
    return SRPipeline(denoiser, vq, schedule, sampler="ancestral" if variant == "resshift" else "one_step",
                      sf=schedule.sf, autocast=prec.autocast, fast_float32=prec.fast_float32)


def export_random_deploy(cfg, path: Path) -> None:
    """The packed file of a random-weight BiMaCo UNet (no all-zero, untrained output layers)."""
    torch.manual_seed(0)
    export_deploy(randomize(build.build_denoiser_from_config(cfg, "student")).eval(), build.plain_params(cfg), path)


class StageTimer:
    """Wraps ``vq.encode`` / ``vq.decode`` / ``denoiser.forward`` of a pipeline to add up their
    wall and process CPU seconds per call of the pipeline."""

    def __init__(self, pipe: SRPipeline | RealESRGAN, sync: Callable[[], None]):
        self.sync, self.wall, self.cpu = sync, dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
        vq = pipe.autoencoder
        if vq is not None:
            vq.encode, vq.decode = self.wrap("encode", vq.encode), self.wrap("decode", vq.decode)
        pipe.denoiser.forward = self.wrap("unet", pipe.denoiser.forward)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            self.sync()
            self.wall[stage] += time.perf_counter() - wall
            self.cpu[stage] += time.process_time() - cpu
            return out
        return timed

    def run(self, fn: Callable[[], object]) -> tuple[dict[str, float], dict[str, float]]:
        """Call ``fn`` once; its per-stage (wall, cpu) seconds."""
        self.wall, self.cpu = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
        self.wrap("total", fn)()
        return dict(self.wall), dict(self.cpu)


def interleaved(variants: list[str], size: int, rounds: int, cfg, device: torch.device, deploy_file: Path) -> list[dict]:
    """One row per variant: median / min / max wall and median CPU seconds per stage over
    ``rounds`` interleaved rounds (order rotated each round; one warm-up round not counted)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timers = {}
    for v in variants:
        pipe = build_variant(v, cfg, device, deploy_file)
        timers[v] = (pipe, StageTimer(pipe, sync))
    lr = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    walls = {v: [] for v in variants}
    cpus = {v: [] for v in variants}
    for r in range(rounds + 1):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            pipe, timer = timers[v]
            wall, cpu = timer.run(lambda: pipe(lr, tile=max(size, 64), generator=torch.Generator(device).manual_seed(0)))
            if r:
                walls[v].append(wall)
                cpus[v].append(cpu)
    rows = []
    for v in variants:
        med = {s: statistics.median(w[s] for w in walls[v]) for s in STAGES}
        rows.append({"variant": v, "lr": size, **med, "device": str(device), "threads": torch.get_num_threads(),
                     "precision": precision_of(v, cfg, device).name,
                     "rounds": rounds, "min": {s: min(w[s] for w in walls[v]) for s in STAGES},
                     "max": {s: max(w[s] for w in walls[v]) for s in STAGES},
                     "cpu": {s: statistics.median(c[s] for c in cpus[v]) for s in STAGES}})
    ref = next((r for r in rows if r["variant"] == "sinsr"), None)
    esr = next((r for r in rows if r["variant"] == "realesrgan"), None)
    for row in rows:
        row["vs_sinsr"] = {s: ref[s] / row[s] if row[s] else None for s in STAGES} if ref else None
        row["times_realesrgan"] = row["total"] / esr["total"] if esr else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | LR -> SR | precision | encode s | UNet s | decode s | total s (min-max) | CPU s | "
             "UNet vs SinSR | total vs SinSR | total / Real-ESRGAN |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(stage: str) -> str:
            return f"{r['vs_sinsr'][stage]:.2f}x" if r["vs_sinsr"] and r["vs_sinsr"][stage] else "-"
        esr = f"{r['times_realesrgan']:.2f}x" if r["times_realesrgan"] else "-"
        lines.append(f"| {r['variant']} | {r['lr']}² -> {4 * r['lr']}² | {r['precision']} | {r['encode']:.3f} | "
                     f"{r['unet']:.3f} | {r['decode']:.3f} | {r['total']:.3f} ({r['min']['total']:.3f}-"
                     f"{r['max']['total']:.3f}) | {r['cpu']['total']:.2f} | {ratio('unet')} | {ratio('total')} | {esr} |")
    return "\n".join(lines)


def peak_memory(variant: str, size: int, cfg, device: torch.device, deploy_file: Path) -> dict:
    """Peak memory (RSS on CPU, allocated on CUDA) of building and running ``variant`` once."""
    pipe = build_variant(variant, cfg, device, deploy_file)
    pipe(torch.rand(1, 3, size, size), tile=max(size, 64), generator=torch.Generator(device).manual_seed(0))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    file_mb = (deploy_file.stat().st_size if variant == "deploy" else
               sum(t.numel() * t.element_size() for t in pipe.denoiser.state_dict().values())) / 1e6
    return {"variant": variant, "lr": size, "peak_mib": peak / 2**20, "file_mb": file_mb}


def main() -> int:
    p = argument_parser(__doc__)
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   default=["sinsr", "sinsr_bf16", "deploy"] if build.native_bf16() else ["sinsr", "deploy"],
                   help="default: sinsr, deploy, and sinsr_bf16 where this CPU has native bf16 (emulated bf16 "
                        "is >10x slower than fp32)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64], help="LR sides (one tile each)")
    p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="architecture (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default here: %(default)s)")
    p.add_argument("--memory", action="store_true", help="peak memory per variant, each in a fresh process")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device, cfg = torch.device(args.device), load_config(args.config)
    if args.one:
        print(json.dumps(peak_memory(args.one[0], int(args.one[1]), cfg, device, Path(args.one[2]))))
        return 0
    machine = describe() + (f"; GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    print(machine, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        deploy_file = Path(tmp) / "bimacosr_deploy.safetensors"
        if "deploy" in args.variants:
            export_random_deploy(cfg, deploy_file)
        for size in args.sizes:
            if args.memory:
                for v in args.variants:
                    cmd = [sys.executable, __file__, "--one", v, str(size), str(deploy_file), "--device", args.device,
                           "--threads", str(args.threads), "--config", str(args.config)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
                    print(f"| {v} | {size}² | peak {rows[-1]['peak_mib']:.0f} MiB | file {rows[-1]['file_mb']:.1f} MB |",
                          flush=True)
            else:
                rows += interleaved(args.variants, size, args.rounds, cfg, device, deploy_file)
                print(table([r for r in rows if r["lr"] == size]), flush=True)
    if args.json:
        args.json.write_text(json.dumps([{**row, "machine": machine} for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
