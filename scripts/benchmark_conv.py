"""The VQ-f4 autoencoder's 3x3 convolutions by route, interleaved in one process, beside this CPU's
GEMM rates: where its encode + decode time goes and how close each route is to the peak (docs/speed.md §2).

The shapes are those one encode + decode of a ``--size``² image runs through its
:class:`~bimacosr.models.layers.WinogradConv2d` layers (ResnetBlocks and Upsamples; random weights,
the released architecture), each timed once per round, the routes in an order rotated every round:

- ``fp32``: oneDNN's direct float32 convolution, the original's operation (``--precision fp32``);
- ``fp32-fast``: NNPACK's Winograd F(6x6, 3x3), as ``--precision fp32-fast`` runs it (``auto`` on CPUs
  without native bf16);
- ``bf16``: oneDNN in bf16 on channels-last maps, as ``--precision bf16`` (``auto`` where bf16 is
  native) runs the ResnetBlocks' convolutions; the Upsamples' own bf16 form, a stride-2 transposed
  convolution with 16/36 of the multiply-adds, is not this row's.

Per shape: the median ms of each route, its G MAC/s (direct-convolution multiply-adds, so a
Winograd route can pass the GEMM rate) and fp32's time over it; then the sum over the model's calls,
and ``torch.mm`` 2048³ in float32 (and bf16 with its route) timed the same way.

    python scripts/benchmark_conv.py                         # 256² image, 2 threads, 5 rounds
    python scripts/as_cpu.py avx2 scripts/benchmark_conv.py  # as on an AVX2-only CPU
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bimacosr import build
from bimacosr.cli import argument_parser
from bimacosr.config import DEFAULT_CONFIG, load_config
from bimacosr.cpu import describe
from bimacosr.models.layers import WinogradConv2d, fast_float32
from bimacosr.timing import interleaved_medians

ROUTES = ("fp32", "fp32-fast", "bf16")


def conv_shapes(size: int) -> Counter:
    """``(cin, cout, h, w)`` of every WinogradConv2d call in one float32 encode + decode of a
    ``size``² image, with its count."""
    vq = build.build_autoencoder(load_config(DEFAULT_CONFIG), weights=False)
    shapes: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.update([(m.in_channels, m.out_channels, *a[0].shape[-2:])]))
             for m in vq.modules() if isinstance(m, WinogradConv2d)]
    with torch.inference_mode():
        vq.decode(vq.encode(torch.rand(1, 3, size, size) * 2 - 1))
    for h in hooks:
        h.remove()
    return shapes


def route_jobs(cin: int, cout: int, h: int, w: int, routes: list[str]) -> dict[str, Callable[[], object]]:
    """One call of each route on a random map and layer of this shape."""
    conv = WinogradConv2d(cin, cout).eval().requires_grad_(False)
    x = torch.randn(1, cin, h, w)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    wb, bb = conv.weight.bfloat16().contiguous(memory_format=torch.channels_last), conv.bias.bfloat16()

    def fast() -> torch.Tensor:
        with fast_float32():
            return conv(x)

    jobs = {"fp32": lambda: F.conv2d(x, conv.weight, conv.bias, padding=1), "fp32-fast": fast,
            "bf16": lambda: F.conv2d(xb, wb, bb, padding=1)}
    return {r: jobs[r] for r in routes}


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--size", type=int, default=256, help="image side (a multiple of 4)")
    p.add_argument("--routes", nargs="+", choices=ROUTES,
                   default=[r for r in ROUTES if r != "bf16" or build.native_bf16()],
                   help="default: fp32 and fp32-fast, and bf16 where this CPU has native bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe()
    print(machine, flush=True)
    rows, total = [], dict.fromkeys(args.routes, 0.0)
    print(f"3x3 convolutions of one {args.size}² encode + decode, {args.threads} threads, medians of {args.rounds} "
          f"interleaved: ms (G MAC/s) [fp32's time / this]")
    print("| Cin -> Cout at H x W | calls | " + " | ".join(args.routes) + " |")
    print("|---|---|" + "---|" * len(args.routes))
    for (cin, cout, h, w), calls in conv_shapes(args.size).items():
        secs = interleaved_medians(route_jobs(cin, cout, h, w, args.routes), args.rounds)
        macs = cin * cout * 9 * h * w
        rows.append({"cin": cin, "cout": cout, "h": h, "w": w, "calls": calls, "seconds": secs})
        cells = [f"{secs[r] * 1e3:.1f} ({macs / secs[r] / 1e9:.0f})" + (f" [{secs['fp32'] / secs[r]:.2f}x]" if "fp32" in secs else "")
                 for r in args.routes]
        print(f"| {cin} -> {cout} at {h} x {w} | {calls} | " + " | ".join(cells) + " |", flush=True)
        for r in args.routes:
            total[r] += calls * secs[r]
    print(f"| **all {sum(row['calls'] for row in rows)} calls** | | "
          + " | ".join(f"{total[r] * 1e3:.0f}" for r in args.routes) + " |")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048).bfloat16()
    mm = {"float32": lambda: a @ a, "bf16": lambda: b @ b}  # bf16 only with its route: emulated it takes minutes
    peaks = interleaved_medians({k: f for k, f in mm.items() if k == "float32" or "bf16" in args.routes}, args.rounds)
    gemm = {k: 2048 ** 3 / v / 1e9 for k, v in peaks.items()}
    print("torch.mm 2048³: " + ", ".join(f"{k} {v:.0f} G MAC/s" for k, v in gemm.items()))
    if args.json:
        args.json.write_text(json.dumps({"cpu": machine, "size": args.size, "threads": args.threads,
                                         "rounds": args.rounds, "convolutions": rows, "total_s": total,
                                         "gemm_gmacs": gemm}, indent=2))


if __name__ == "__main__":
    main()
