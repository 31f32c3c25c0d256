"""One UNet step at a square latent (released architecture, random weights), variants interleaved.

Variants: ``fp32`` the FP (SinSR) UNet in float32 | ``fp_bf16`` the same under
``torch.autocast("cpu", bfloat16)`` | ``deploy_int`` the deploy UNet on the stock PyTorch int8
path | ``deploy_float`` its float path (a float conv / matmul of ``s * sign(x)`` with the ±1
weight) | ``deploy_fused`` the deploy UNet on the fused 1-bit kernel (skipped, with the reason, when
the kernel cannot be built) | ``deploy_bf16`` the same with its FP parts (attention, norms, the
two FP convs) under bf16 autocast, as ``--precision bf16`` runs it | twins of those two, the same
model with one C++ kernel of the FP parts switched off: ``*_torch_attention`` PyTorch's attention
instead of the C++ window attention (``BIMACOSR_ATTENTION=torch``, docs/kernel.md §6),
``*_torch_norm`` ATen's GroupNorm and SiLU instead of the C++ GroupNorm
(``BIMACOSR_NORM=torch``, §7). All live in one process and
run in rounds, the order rotating each round, so a shared machine's load hits every variant
alike; wall and process CPU time are reported as min / median / max, and the ratios come from
the same rounds.

    python scripts/benchmark_unet.py                          # 64² latent, 2 threads, 5 rounds
    python scripts/benchmark_unet.py --rounds 9 --json unet.json
    python scripts/benchmark_unet.py --profile deploy_fused    # where that variant's time goes
    python scripts/benchmark_unet.py --kernel-rates --json rates.json  # each kernel call vs the bound probe

``--kernel-rates`` records every fused-kernel call of one step of ``deploy_bf16`` (``deploy_fused``
where bf16 is not native: the project's defaults) and replays each beside the bound probe, the
plain XOR-popcount GEMM at the layer's K (bimacosr/deploy/rates.py): per layer the
kernel's and the bound's G binary MAC/s, and over the step the summed kernel / bound time; then
where the kernel's time goes: the calls replayed whole, without the SMB, without the LRMB and
with neither (the binary part), beside the bound, by layer kind.
"""
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bimacosr.cli import argument_parser  # noqa: E402
from bimacosr.cpu import describe  # noqa: E402
from bimacosr.kernels import ATTENTION_ENV, NORM_ENV  # noqa: E402

TWINS = {"_torch_attention": ATTENTION_ENV, "_torch_norm": NORM_ENV}  # suffix -> the switch it sets to "torch"
VARIANTS = ("fp32", "fp_bf16", "deploy_int", "deploy_float", "deploy_fused", "deploy_bf16",
            *(base + suffix for suffix in TWINS for base in ("fp_bf16", "deploy_bf16")))
BF16 = ("fp_bf16", "deploy_bf16")  # default only where the CPU has native bf16
DEFAULT = VARIANTS[:6]


def twin_of(name: str) -> tuple[str, str | None]:
    """``(variant whose model it runs, the switch it sets to "torch")``; ``(name, None)`` for a
    variant that is not a twin."""
    for suffix, switch in TWINS.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), switch
    return name, None


def switched(name: str) -> contextlib.AbstractContextManager:
    """The environment a variant's steps run in: a twin's switch set to ``torch``, nothing else."""
    switch = twin_of(name)[1]
    return mock.patch.dict(os.environ, {switch: "torch"} if switch else {})


def build_variants(names: list[str]) -> dict[str, tuple[torch.nn.Module, torch.dtype | None]]:
    """``name -> (UNet, autocast dtype or None)``; ``deploy_fused`` is left out (with a notice)
    when the fused kernel is unavailable."""
    from bimacosr.build import build_denoiser_from_config
    from bimacosr.config import load_config
    from bimacosr import kernels
    from bimacosr.deploy import set_mode, to_deploy
    from bimacosr.smoke import randomize

    twins = {n: twin_of(n)[0] for n in names if twin_of(n)[1]}  # twin -> the variant whose model it runs
    names_built = [n for n in names if n not in twins] + list(twins.values())
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/BiMaCoSR.yaml")
    out: dict[str, tuple[torch.nn.Module, torch.dtype | None]] = {}
    if {"fp32", "fp_bf16"} & set(names_built):
        fp = randomize(build_denoiser_from_config(cfg, "fp")).eval().requires_grad_(False)
        out.update({n: (fp, torch.bfloat16 if n == "fp_bf16" else None) for n in ("fp32", "fp_bf16") if n in names_built})
    if {"deploy_int", "deploy_float", "deploy_fused", "deploy_bf16"} & set(names_built):
        student = randomize(build_denoiser_from_config(cfg, "student")).eval().requires_grad_(False)
        deploy = to_deploy(student)
        if "deploy_int" in names_built:
            out["deploy_int"] = (set_mode(copy.deepcopy(deploy), "int"), None)
        if "deploy_float" in names_built:
            out["deploy_float"] = (set_mode(copy.deepcopy(deploy), "float"), None)
        fused = [n for n in ("deploy_fused", "deploy_bf16") if n in names_built]
        if fused and kernels.available():
            model = set_mode(copy.deepcopy(deploy), "fused")
            out.update({n: (model, torch.bfloat16 if n == "deploy_bf16" else None) for n in fused})
        elif fused:
            print(f"{', '.join(fused)} skipped: {kernels.status()}", file=sys.stderr)
    out.update({n: out[base] for n, base in twins.items() if base in out})
    return {n: out[n] for n in names if n in out}


def step(model: torch.nn.Module, autocast: torch.dtype | None, x: torch.Tensor, t: torch.Tensor,
         lq: torch.Tensor) -> torch.Tensor:
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return model(x, t, lq=lq).float()


def inputs(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's ``(x, t, lq)``: a noisy latent, timestep 0 and an LR image in [-1, 1], seeded."""
    gen = torch.Generator().manual_seed(1)
    x, lq = torch.randn(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    return x, torch.zeros(batch, dtype=torch.long), lq


def run(names: list[str], size: int, rounds: int, batch: int) -> dict:
    variants = build_variants(names)
    x, t, lq = inputs(size, batch)

    def run_step(name: str) -> None:
        with switched(name):
            step(*variants[name], x, t, lq)

    for name in variants:  # warm-up: caches, kernel build, allocator
        run_step(name)
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    order = list(variants)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            w0, c0 = time.perf_counter(), time.process_time()
            run_step(name)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    rows = {}
    for name in variants:
        rows[name] = {"wall_min": min(wall[name]), "wall_median": statistics.median(wall[name]),
                      "wall_max": max(wall[name]), "cpu_median": statistics.median(cpu[name])}
        for ref in ("fp32", "fp_bf16"):
            if ref in wall:  # ratio per round, then the median: both timed under the same load
                rows[name][f"speedup_vs_{ref}"] = statistics.median(a / b for a, b in zip(wall[ref], wall[name]))
    return {"size": size, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "variants": rows}


def profile(name: str, size: int, batch: int, top: int) -> str:
    """The torch.profiler table (self CPU time) of one step of ``name``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    model, autocast = build_variants([name])[name]
    x, t, lq = inputs(size, batch)
    with switched(name):
        step(model, autocast, x, t, lq)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            step(model, autocast, x, t, lq)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def rates(size: int, batch: int, reps: int) -> dict:
    """Per-layer kernel and bound-probe rates over one step of the default deploy variant."""
    from bimacosr.build import native_bf16
    from bimacosr.deploy.rates import kernel_rates, record_calls, step_parts

    name = "deploy_bf16" if native_bf16() else "deploy_fused"
    variants = build_variants([name])
    if name not in variants:
        raise SystemExit(f"--kernel-rates needs the fused kernel: {name} could not be built")
    model, autocast = variants[name]
    x, t, lq = inputs(size, batch)
    calls = record_calls(model, lambda: step(model, autocast, x, t, lq))
    layers = kernel_rates(calls, reps)
    kernel_s, bound_s = sum(r["kernel_s"] for r in layers), sum(r["bound_s"] for r in layers)
    return {"variant": name, "size": size, "batch": batch, "reps": reps, "threads": torch.get_num_threads(),
            "path": torch.ops.bimacosr.path(), "layers": layers, "kernel_s": kernel_s, "bound_s": bound_s,
            "ratio": kernel_s / bound_s, "macs": sum(r["macs"] for r in layers), "parts": step_parts(calls, reps)}


def print_rates(result: dict) -> None:
    print(f"binary_conv vs the bound probe, one {result['variant']} step, {result['size']}x{result['size']} latent, "
          f"{result['threads']} threads, {result['path']}; medians of {result['reps']} interleaved calls")
    print(f"{'layer':44s} {'pix':>5s} {'cin':>5s} {'cout':>5s} {'taps':>4s} {'kernel G/s':>10s} "
          f"{'bound G/s':>9s} {'ratio':>6s}")
    for r in result["layers"]:
        print(f"{r['layer'][-44:]:44s} {r['pixels']:5d} {r['cin']:5d} {r['cout']:5d} {r['taps']:4d} "
              f"{r['kernel_gmacs']:10.0f} {r['bound_gmacs']:9.0f} {r['ratio']:6.2f}")
    print(f"step: {result['macs'] / 1e9:.1f} G binary MACs, kernel {result['kernel_s'] * 1e3:.1f} ms, "
          f"bound {result['bound_s'] * 1e3:.1f} ms, kernel / bound = {result['ratio']:.2f}")
    parts = result["parts"]
    kinds = list(next(iter(parts.values())))
    print(f"where the kernel's time goes: the step's calls replayed with side branches off, the five "
          f"interleaved, medians of {result['reps']} (ms)")
    print(f"{'':14s} " + " ".join(f"{k:>8s}" for k in (*kinds, "step")) + f" {'/ bound':>8s}")
    bound = sum(parts["bound"].values())
    for part, by_kind in parts.items():
        cells = [v * 1e3 for v in by_kind.values()]
        print(f"{part:14s} " + " ".join(f"{v:8.1f}" for v in (*cells, sum(cells))) + f" {sum(by_kind.values()) / bound:8.2f}")


def main() -> None:
    from bimacosr.build import native_bf16

    ap = argument_parser(__doc__)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS,
                    default=[v for v in DEFAULT if v not in BF16 or native_bf16()],
                    help="default: the first six, fp_bf16 and deploy_bf16 only where this CPU has native bf16 "
                         "(emulated: minutes per step)")
    ap.add_argument("--size", type=int, default=64, help="latent side (multiple of 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--profile", choices=VARIANTS, help="print a profile of this variant instead")
    ap.add_argument("--top", type=int, default=25, help="rows of the profile table")
    ap.add_argument("--kernel-rates", action="store_true",
                    help="per layer, the fused kernel's rate beside the bound probe's (--rounds calls each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe()
    print(machine, flush=True)
    if args.profile:
        print(profile(args.profile, args.size, args.batch, args.top))
        return
    if args.kernel_rates:
        result = {"cpu": machine, **rates(args.size, args.batch, args.rounds)}
        print_rates(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    result = {"cpu": machine, **run(args.variants, args.size, args.rounds, args.batch)}
    print(f"UNet step, {args.size}x{args.size} latent, batch {args.batch}, {result['threads']} threads, "
          f"{args.rounds} rounds interleaved (seconds)")
    print(f"{'variant':28s} {'min':>7s} {'median':>7s} {'max':>7s} {'cpu':>7s} {'vs fp32':>8s} {'vs bf16':>8s}")
    for name, row in result["variants"].items():
        ratios = [f"{row[k]:7.2f}x" if k in row else f"{'-':>8s}" for k in ("speedup_vs_fp32", "speedup_vs_fp_bf16")]
        print(f"{name:28s} {row['wall_min']:7.3f} {row['wall_median']:7.3f} {row['wall_max']:7.3f} "
              f"{row['cpu_median']:7.3f} {ratios[0]} {ratios[1]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
