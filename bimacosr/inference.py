"""Folder (or file) of LR images -> 4x SR images: what ``inference_quant.py`` runs.

Everything that can be wrong is checked before a model is built: the config, every weight file
(absolute paths in the message), the flags' ranges, the output folder (writable; never the input
folder unless outputs are told apart by ``--suffix``) and the output format of every input. Then
the pipeline is built once (``bimacosr.build``), every image is super-resolved with a progress bar
naming the file, grayscale and alpha are kept, unreadable files are reported by name and skipped.
Every output is written whole or not at all; Ctrl-C stops with one line saying how far it got.
Under ``torchrun`` each process takes every ``WORLD_SIZE``-th file. Every image is sampled with its
own generator seeded by ``seed``, so results do not depend on the order or the process count.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from bimacosr import build
from bimacosr.atomic import temp_path
from bimacosr.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config, require
from bimacosr.device import pick_device
from bimacosr.imageio import (GIF_EXTENSIONS, SAVE_EXTENSIONS, ImageReadError, LoadedImage, find_images, list_images,
                              read_image, write_image)
from bimacosr.pairing import COMPARE_SUFFIX, suffix_part
from bimacosr.pipeline import SRPipeline
from bimacosr.smoke import SMOKE_CONFIG, smoke_inference
from bimacosr.visualize import save_compare

TASKS = ("sinsr", "bimacosr", "realsr", "realsrx4")
"""``--task`` values of the original that mean this model's job (real-world x4 SR)."""


@dataclass
class InferenceOptions:
    """The command line of ``inference_quant.py`` -- the one table of its defaults."""

    in_path: Path
    out_path: Path
    config: Path = DEFAULT_CONFIG
    ckpt: Path = REPO_ROOT / "weights" / "BiMaCoSR.pth"
    task: str = "BiMaCoSR"
    scale: int = 4
    outscale: float | None = None
    seed: int = 12345
    steps: int | None = None
    infer_steps: int | None = None
    chop_size: int = 256
    chop_stride: int | None = None
    blend: str = "average"
    one_step: bool = True
    ddim: bool = False
    ref_path: Path | None = None
    suffix: str = ""
    ext: str = "png"
    device: str | None = None
    precision: str = "auto"
    fp32: bool = False
    compare: bool = False
    skip_existing: bool = False
    deploy: Path | None = None
    tile_batch: int = 1
    channels_last: bool = False
    compile: bool = False
    debug: bool = False
    smoke: bool = False


def default(name: str):
    """The default of option ``name`` (for the argument parser)."""
    return next(f.default for f in fields(InferenceOptions) if f.name == name)


def output_paths(inputs: list[Path], out_dir: Path, suffix: str, ext: str) -> dict[Path, Path]:
    """One output path per input: ``<stem>_<suffix>.<ext>``; inputs sharing a stem keep their
    extension in the name (``a.jpg`` -> ``a_jpg.png``). Refuses to overwrite an input and formats
    that cannot be written (``--ext auto`` with a GIF input)."""
    def name(path: Path, with_ext: bool) -> Path:
        stem = f"{path.stem}_{path.suffix[1:].lower()}" if with_ext else path.stem
        out_ext = path.suffix[1:].lower() if ext == "auto" else ext
        return out_dir / f"{stem}{suffix_part(suffix)}.{out_ext}"

    stems = [p.stem for p in inputs]
    mapping = {p: name(p, stems.count(p.stem) > 1) for p in inputs}
    unwritable = [p.name for p, out in mapping.items() if out.suffix.lower() not in SAVE_EXTENSIONS]
    if unwritable:
        raise ValueError(f"--ext {ext}: cannot write {unwritable[0]} as {mapping[inputs[0]].suffix}"
                         f"{' (and ' + str(len(unwritable) - 1) + ' more)' if len(unwritable) > 1 else ''}; "
                         f"writable: {', '.join(e[1:] for e in SAVE_EXTENSIONS)} -- use e.g. --ext png")
    clash = [str(p) for p, out in mapping.items() if out.resolve() in {q.resolve() for q in inputs}]
    if clash:
        raise ValueError(f"writing to {out_dir} would overwrite input image(s) {clash[:3]}; choose "
                         f"another --out_path or set --suffix (e.g. --suffix sr)")
    return mapping


def list_inputs(opts: InferenceOptions) -> list[Path]:
    """The input images. In folder mode an ``--out_path`` equal to or inside ``--in_path`` is
    refused unless ``--suffix`` tells outputs apart; then files carrying it are skipped, so a
    second run never super-resolves the first run's outputs."""
    inputs = list_images(opts.in_path)
    if not opts.in_path.is_dir():
        return inputs
    gifs = [p.name for p in find_images(opts.in_path, GIF_EXTENSIONS)]
    if gifs:
        print(f"note: {len(gifs)} GIF file(s) in {opts.in_path} are left out ({', '.join(gifs[:3])}"
              f"{', ...' if len(gifs) > 3 else ''}); give one as -i FILE to super-resolve its first frame")
    src, dst = opts.in_path.resolve(), opts.out_path.resolve()
    if dst == src or src in dst.parents:
        if not opts.suffix:
            raise ValueError(f"--out_path {opts.out_path} is (inside) the input folder {opts.in_path}: "
                             f"outputs would become inputs of the next run; use another folder, or set "
                             f"--suffix (outputs carrying it are then skipped as inputs)")
        tags = (suffix_part(opts.suffix), suffix_part(opts.suffix) + COMPARE_SUFFIX)
        kept = [p for p in inputs if not p.stem.endswith(tags)]
        if len(kept) < len(inputs):
            print(f"note: {len(inputs) - len(kept)} file(s) ending in {tags[0]!r} in {opts.in_path} are "
                  f"outputs of an earlier run and are skipped as inputs")
        inputs = kept
    return inputs


def check_options(opts: InferenceOptions) -> None:
    """Flag values out of range -> ``ValueError`` naming the flag and the valid range."""
    checks = [("--chop_size", opts.chop_size, opts.chop_size >= 1, ">= 1"),
              ("--chop_stride", opts.chop_stride, opts.chop_stride is None or 1 <= opts.chop_stride <= opts.chop_size,
               f"in 1..--chop_size ({opts.chop_size})"),
              ("--tile_batch", opts.tile_batch, opts.tile_batch >= 1, ">= 1"),
              ("--outscale", opts.outscale, opts.outscale is None or 0 < opts.outscale <= 16, "in (0, 16]"),
              ("--steps", opts.steps, opts.steps is None or opts.steps >= 1, ">= 1"),
              ("--infer_steps", opts.infer_steps, opts.infer_steps is None or opts.infer_steps >= 1, ">= 1")]
    for flag, value, ok, valid in checks:
        if not ok:
            raise ValueError(f"{flag} {value} is out of range: it must be {valid}")
    forbidden = sorted({"..", "/", os.sep, os.altsep} - {None})
    if any(part in opts.suffix for part in forbidden):
        raise ValueError(f"--suffix {opts.suffix}: a suffix is part of a file name; it may not contain "
                         f"{' or '.join(map(repr, forbidden))} (outputs go to --out_path)")
    if opts.task.lower() not in TASKS:
        raise ValueError(f"--task {opts.task}: this model does real-world x4 SR; the original's task names "
                         f"for that are {', '.join(TASKS)} (any case)")


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file there, or raise ``OSError`` naming it -- before any
    model is built (a read-only folder used to fail after the first image was computed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to the output folder {folder.absolute()} ({exc.strerror or exc}); "
                      f"choose a writable --out_path") from None


def apply_schedule_flags(cfg: DictConfig, opts: InferenceOptions) -> str:
    """The original's ``--steps`` (diffusion steps) and ``--infer_steps`` (respacing) written into
    the config; returns the sampler: ``one_step`` unless ``--one_step false`` (then ``ddim`` with
    ``--ddim``, else ``ancestral``)."""
    if opts.steps is not None:
        cfg.diffusion.params.steps = opts.steps
    if opts.infer_steps is not None:
        steps = int(cfg.diffusion.params.steps)
        cfg.diffusion.params.timestep_respacing = None if opts.infer_steps >= steps else opts.infer_steps
    return "one_step" if opts.one_step else ("ddim" if opts.ddim else "ancestral")


def _tile_bar(tiles: Iterator) -> Iterator:
    """A transient progress bar over the tiles of one image."""
    return iter(tqdm(list(tiles), desc="tiles", leave=False, dynamic_ncols=True))


def upscale_image(pipe: SRPipeline, image: LoadedImage, opts: InferenceOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SR of one loaded image, ``([1, 3, sH, sW], alpha [1, 1, sH, sW] or None)`` in [0, 1]."""
    generator = torch.Generator(pipe.device).manual_seed(opts.seed)
    sr = pipe(image.rgb, tile=opts.chop_size, tile_stride=opts.chop_stride, blend=opts.blend,
              generator=generator, progress=_tile_bar, tile_batch=opts.tile_batch).cpu()
    alpha = None
    if image.alpha is not None:  # alpha is not a photo: upscaled separately, bicubic
        alpha = F.interpolate(image.alpha, scale_factor=pipe.sf, mode="bicubic").clamp(0, 1)
    return sr, alpha


def to_outscale(image: torch.Tensor | None, outscale: float | None, lr_size: tuple[int, int]) -> torch.Tensor | None:
    """``--outscale``: the x4 output ``[1, C, 4h, 4w]`` resized (antialiased bicubic) to
    ``int(outscale * h) x int(outscale * w)``, as Real-ESRGAN's ``-s``; unchanged without it."""
    if image is None or outscale is None:
        return image
    size = (max(1, int(lr_size[0] * outscale)), max(1, int(lr_size[1] * outscale)))
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bicubic", antialias=True).clamp(0, 1)


@dataclass
class Plan:
    """What a run will load, resolved before anything is built."""

    cfg: DictConfig
    files: build.InferenceFiles
    device: torch.device
    sampler: str
    precision: str


def plan(opts: InferenceOptions) -> Plan:
    """Config, flags and files: every problem knowable up front raises here, in milliseconds."""
    ckpt, config = opts.ckpt, SMOKE_CONFIG if opts.smoke else opts.config
    device = pick_device(opts.device)  # before smoke mode writes or builds anything
    if opts.smoke:
        if opts.deploy is not None:
            raise ValueError("--smoke runs its own tiny random weights: leave --deploy out")
        cfg, ckpt = smoke_inference()
        print(f"smoke mode: tiny random weights ({ckpt.parent}), the outputs are noise", flush=True)
    else:
        cfg = load_config(opts.config)
    require(cfg, *build.INFERENCE_KEYS, source=f"config {config}")
    sf = build.scale_factor(cfg)
    if opts.scale != sf:
        raise ConfigError(f"--scale {opts.scale} but {config} is a x{sf} model (diffusion.params.sf)")
    sampler = apply_schedule_flags(cfg, opts)
    precision = "fp32" if opts.fp32 else opts.precision
    name = build.resolve_precision(precision, device, cfg).name  # raises e.g. for fp16 without CUDA
    if name == "bf16" and (note := build.emulated_bf16_note(device)):
        print(f"note: {note}; --precision auto picks {build.resolve_precision('auto', device, cfg).name} here",
              flush=True)
    return Plan(cfg, build.inference_files(cfg, ckpt, opts.deploy), device, sampler, precision)


def load(opts: InferenceOptions, p: Plan) -> SRPipeline:
    """The pipeline, with one "loading" line saying what and how long."""
    tic = time.perf_counter()
    print(f"loading {p.files.deploy or p.files.ckpt} + {p.files.autoencoder.name} on {p.device} ...", flush=True)
    pipe = build.build_pipeline(p.cfg, p.files, p.device, precision=p.precision, sampler=p.sampler,
                                channels_last=opts.channels_last, compile=opts.compile)
    print(f"loaded in {time.perf_counter() - tic:.1f} s: {p.sampler.replace('_', '-')} sampler, precision "
          f"{build.resolve_precision(p.precision, p.device, p.cfg).name}", flush=True)
    return pipe


def tile_size(opts: InferenceOptions, pipe: SRPipeline) -> int:
    """``--chop_size`` raised to the model's minimum tile (smaller tiles are padded up to it
    anyway, so they only multiply the work), with a message."""
    if opts.chop_size < pipe.min_size:
        print(f"note: --chop_size {opts.chop_size} is below the model's minimum tile of {pipe.min_size} LR "
              f"pixels (tiles are padded to it); using {pipe.min_size}")
        return pipe.min_size
    return opts.chop_size


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


@dataclass
class Tally:
    """What became of the images of one run so far."""

    written: int = 0
    existing: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def finished(self) -> int:
        """Images done with, one way or another (a rerun with ``--skip_existing`` passes the written)."""
        return self.written + self.existing + len(self.failed)


def process_images(pipe: SRPipeline, paths: list[Path], targets: dict[Path, Path], opts: InferenceOptions,
                   tally: Tally, desc: str) -> None:
    """Super-resolve ``paths`` into ``targets`` with a progress bar, counting into ``tally``;
    unreadable files are reported and skipped, every output is written whole or not at all."""
    bar = tqdm(paths, desc=desc, unit="img", dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name)
        target = targets[path]
        if opts.skip_existing and target.exists():
            tally.existing += 1
            continue
        try:
            image = read_image(path)
        except ImageReadError as exc:
            tally.failed.append((path, str(exc)))
            tqdm.write(f"skipped: {exc}")
            continue
        if image.frames > 1:
            tqdm.write(f"note: {path} has {image.frames} frames; only the first is super-resolved")
        bar.set_postfix_str(f"{path.name} {image.rgb.shape[-1]}x{image.rgb.shape[-2]}")
        sr, alpha = upscale_image(pipe, image, opts)
        lr_size = tuple(image.rgb.shape[-2:])
        write_image(target, to_outscale(sr, opts.outscale, lr_size), alpha=to_outscale(alpha, opts.outscale, lr_size),
                    mode=image.mode, bit_depth=image.bit_depth)
        if opts.compare:
            save_compare(target.with_name(f"{target.stem}{COMPARE_SUFFIX}.png"), image.rgb, sr)
        tally.written += 1


def run(opts: InferenceOptions) -> int:
    """Check everything, then process every input image; returns the exit status (1 if any image
    failed, :data:`INTERRUPTED` after Ctrl-C, with one line saying how far it got)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_options(opts)
    inputs = list_inputs(opts)
    targets = output_paths(inputs, opts.out_path, opts.suffix, opts.ext)
    if opts.ref_path is not None and not opts.ref_path.is_dir():
        raise FileNotFoundError(f"--ref_path {opts.ref_path.absolute()} is not a folder (the GT images)")
    pipe_plan = plan(opts)
    check_writable(opts.out_path)
    mine, tally, of_rank = inputs[rank::world], Tally(), f" [rank {rank}]" if world > 1 else ""
    todo = [p for p in mine if not (opts.skip_existing and targets[p].exists())]  # decided before loading
    tally.existing, tic = len(mine) - len(todo), time.perf_counter()
    try:
        if todo:
            pipe = load(opts, pipe_plan)
            opts.chop_size = tile_size(opts, pipe)
            opts.chop_stride = None if opts.chop_stride is None else min(opts.chop_stride, opts.chop_size)
            tic = time.perf_counter()
            process_images(pipe, todo, targets, opts, tally,
                           desc=f"SR x{pipe.sf}" + (f" [rank {rank}/{world}]" if world > 1 else ""))
    except KeyboardInterrupt:
        tqdm.write(f"interrupted after {tally.finished} of {len(mine)} images; rerun with --skip_existing"
                   f"{of_rank}", file=sys.stderr)
        return INTERRUPTED
    seconds = time.perf_counter() - tic
    summary = f"{tally.written} image(s) written to {opts.out_path}"
    if tally.written:
        summary += f" in {seconds:.1f} s ({seconds / tally.written:.1f} s/image)"
    if tally.existing:
        summary += f", {tally.existing} already there" + ("" if todo else " (nothing to do: no model loaded)")
    if tally.failed:
        summary += f"; {len(tally.failed)} failed: " + ", ".join(str(p) for p, _ in tally.failed)
    print(summary + of_rank)
    if opts.ref_path is not None:
        try:
            score(opts, world)
        except KeyboardInterrupt:
            tqdm.write(f"interrupted while scoring against --ref_path; the outputs are complete; score them "
                       f"with: python metric.py --inp_imgs {opts.out_path} --gt_imgs {opts.ref_path} --log "
                       f"{opts.out_path / 'metrics'}", file=sys.stderr)
            return INTERRUPTED
    return 1 if tally.failed else 0


def score(opts: InferenceOptions, world: int) -> None:
    """``--ref_path``: the metrics of the outputs against that GT folder, as the original runs
    them after inference; the table is printed and saved under ``<out_path>/metrics``."""
    from bimacosr.evaluation import evaluate, write_results

    if world > 1:
        print(f"note: --ref_path is scored by one process only; run: python metric.py --inp_imgs "
              f"{opts.out_path} --gt_imgs {opts.ref_path} --log {opts.out_path / 'metrics'}")
        return
    result = evaluate([opts.out_path], opts.ref_path, device=opts.device, sr_suffix=opts.suffix)
    write_results(result, opts.out_path / "metrics")
    print(result.markdown(), end="")
