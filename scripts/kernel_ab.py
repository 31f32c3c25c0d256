"""Two versions of the fused 1-bit kernel's source, timed in one process on every call of one UNet step.

Each side is a git revision (``--a HEAD``: its ``bimacosr/kernels``) or a folder holding
``binary.cpp``, ``popcount.h``, ``side.h`` and ``vec.h`` (default for ``--b``: this working tree's). Each is
compiled as the package builds it, under its own op namespace and with hidden symbols (so the two
libraries' inline functions stay apart), extra ``--flags`` for both (e.g. ``-mno-avx512f`` for the
AVX2 table path). The calls of one step of the project's default deploy variant are recorded
(bimacosr/deploy/rates.py), both builds' outputs compared, then every call runs on both in
``--rounds`` rounds, the order rotating: medians summed per layer kind, and b / a. Separate
processes disagree by more than the changes worth measuring (docs/kernel.md §5); this does not.

    python scripts/kernel_ab.py --a HEAD                       # the working tree against the last commit
    python scripts/kernel_ab.py --a HEAD~2 --b HEAD --flags=-mno-avx512f --rounds 9
"""
import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_unet import build_variants, inputs, step  # noqa: E402

from bimacosr.build import native_bf16  # noqa: E402
from bimacosr.cli import argument_parser  # noqa: E402
from bimacosr.cpu import describe  # noqa: E402
from bimacosr import kernels  # noqa: E402
from bimacosr.deploy.rates import KINDS, kind, record_calls  # noqa: E402
from bimacosr.timing import interleaved_medians  # noqa: E402

FILES = ("binary.cpp", "popcount.h", "side.h", "vec.h")


def sources(spec: str) -> dict[str, str]:
    """The kernel's files from a folder, or from a git revision of this repository: those of
    ``FILES`` it has (revisions before 61fa625 have no ``side.h``)."""
    folder = Path(spec)
    if folder.is_dir():
        texts = {name: (folder / name).read_text() for name in FILES if (folder / name).is_file()}
    else:
        shown = {name: subprocess.run(["git", "show", f"{spec}:bimacosr/kernels/{name}"], cwd=REPO,
                                      capture_output=True, text=True, check=False) for name in FILES}
        texts = {name: run.stdout for name, run in shown.items() if run.returncode == 0}
    if "binary.cpp" not in texts:
        raise SystemExit(f"kernel_ab: no binary.cpp in {spec} (a kernel folder or a git revision)")
    return texts


def build(texts: dict[str, str], tag: str, root: Path, flags: list[str]):
    """Compile ``texts`` as the op ``torch.ops.bimacosr_ab_<tag>.binary_conv`` and return it."""
    from torch.utils.cpp_extension import load

    folder = root / tag
    folder.mkdir()
    namespace = f"bimacosr_ab_{tag}"
    for name, text in texts.items():
        if name == "binary.cpp":
            text = text.replace("TORCH_LIBRARY(bimacosr,", f"TORCH_LIBRARY({namespace},")
            text = text.replace("TORCH_LIBRARY_IMPL(bimacosr,", f"TORCH_LIBRARY_IMPL({namespace},")
        (folder / name).write_text(text)
    load(name=namespace, sources=[str(folder / "binary.cpp")], build_directory=str(folder), is_python_module=False,
         extra_cflags=kernels.FLAGS + ["-fvisibility=hidden", "-fvisibility-inlines-hidden", *flags],
         extra_ldflags=["-fopenmp"], verbose=False)
    return getattr(torch.ops, namespace).binary_conv


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--a", default="HEAD", help="git revision or kernel folder (default: HEAD)")
    p.add_argument("--b", default=str(REPO / "bimacosr/kernels"), help="default: the working tree's")
    p.add_argument("--flags", default="", help="extra compiler flags for both builds, space separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--size", type=int, default=64, help="latent side (multiple of 64)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(describe(), flush=True)
    torch.set_num_threads(args.threads)
    name = "deploy_bf16" if native_bf16() else "deploy_fused"
    model, autocast = build_variants([name])[name]
    x, t, lq = inputs(args.size, 1)
    calls = record_calls(model, lambda: step(model, autocast, x, t, lq))
    with tempfile.TemporaryDirectory(prefix="bimacosr_kernel_ab_") as root:
        ops = {side: build(sources(spec), side, Path(root), args.flags.split())
               for side, spec in (("a", args.a), ("b", args.b))}
    total = {side: dict.fromkeys(KINDS, 0.0) for side in ops}
    differ, worst = 0, 0.0
    with torch.inference_mode():
        for call in calls:
            arguments = call.args
            out = {side: op(*arguments).float() for side, op in ops.items()}
            if not torch.equal(out["a"], out["b"]):
                differ, worst = differ + 1, max(worst, (out["a"] - out["b"]).abs().max().item())
            secs = interleaved_medians({side: functools.partial(op, *arguments) for side, op in ops.items()}, args.rounds)
            for side in ops:
                total[side][kind(call.shape)] += secs[side] * 1e3
    print(f"{len(calls)} calls of one {name} step, {args.size}² latent, {args.threads} threads, medians of "
          f"{args.rounds}; a = {args.a}, b = {args.b} {args.flags}")
    print(f"outputs: {'identical' if not differ else f'{differ} call(s) differ, max |a - b| {worst:.3g}'}")
    print(f"{'ms':6s} " + " ".join(f"{k:>8s}" for k in (*KINDS, "step")))
    for side in ops:
        cells = [*total[side].values(), sum(total[side].values())]
        print(f"{side:6s} " + " ".join(f"{v:8.2f}" for v in cells))
    print(f"b / a: {sum(total['b'].values()) / sum(total['a'].values()):.3f}")


if __name__ == "__main__":
    main()
