"""Folder (or file) of LR images -> 4x SR images: what ``inference_quant.py`` runs.

Loads the config and weights strictly (the original loaded non-strictly, so a wrong file
"worked"), runs :class:`bimacosr.pipeline.SRPipeline` on every image with a progress bar, keeps
grayscale and alpha, never overwrites an input, reports unreadable files by name and goes on.
Under ``torchrun`` each process takes every ``WORLD_SIZE``-th file. Every image is sampled with
its own generator seeded by ``seed``, so results do not depend on the order or the process count.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bimacosr import build
from bimacosr.config import ConfigError, load_config
from bimacosr.imageio import ImageReadError, LoadedImage, list_images, read_image, write_image
from bimacosr.pipeline import SRPipeline
from bimacosr.visualize import save_compare


@dataclass
class InferenceOptions:
    """The command line of ``inference_quant.py`` (see its ``--help``)."""

    in_path: Path
    out_path: Path
    config: Path = Path("configs/BiMaCoSR.yaml")
    ckpt: Path = Path("weights/BiMaCoSR.pth")
    scale: int = 4
    seed: int = 12345
    chop_size: int = 256
    chop_stride: int | None = None
    blend: str = "average"
    one_step: bool = True
    ddim: bool = False
    suffix: str = ""
    ext: str = "png"
    device: str | None = None
    fp32: bool = False
    precision: str = "auto"
    compare: bool = False
    skip_existing: bool = False
    deploy: Path | None = None
    tile_batch: int = 1
    channels_last: bool = False
    compile: bool = False


def output_paths(inputs: list[Path], out_dir: Path, suffix: str, ext: str) -> dict[Path, Path]:
    """One output path per input: ``<stem><suffix>.<ext>``; inputs sharing a stem keep their
    extension in the name (``a.jpg`` -> ``a_jpg.png``). Refuses to overwrite an input."""
    def name(path: Path, with_ext: bool) -> Path:
        stem = f"{path.stem}_{path.suffix[1:].lower()}" if with_ext else path.stem
        out_ext = path.suffix[1:].lower() if ext == "auto" else ext
        return out_dir / f"{stem}{suffix}.{out_ext}"

    stems = [p.stem for p in inputs]
    mapping = {p: name(p, stems.count(p.stem) > 1) for p in inputs}
    clash = [str(p) for p, out in mapping.items() if out.resolve() in {q.resolve() for q in inputs}]
    if clash:
        raise ValueError(f"writing to {out_dir} would overwrite input image(s) {clash[:3]}; choose "
                         f"another --out_path or set --suffix (e.g. --suffix _sr)")
    return mapping


def _tile_bar(tiles: Iterator) -> Iterator:
    """A transient progress bar over the tiles of one image."""
    tiles = list(tiles)
    return iter(tqdm(tiles, desc="tiles", leave=False, dynamic_ncols=True))


def upscale_image(pipe: SRPipeline, image: LoadedImage, opts: InferenceOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SR of one loaded image, ``([1, 3, sH, sW], alpha [1, 1, sH, sW] or None)`` in [0, 1]."""
    generator = torch.Generator(pipe.device).manual_seed(opts.seed)
    sr = pipe(image.rgb, tile=opts.chop_size, tile_stride=opts.chop_stride, blend=opts.blend,
              generator=generator, progress=_tile_bar, tile_batch=opts.tile_batch).cpu()
    alpha = None
    if image.alpha is not None:  # alpha is not a photo: upscaled separately, bicubic
        alpha = F.interpolate(image.alpha, scale_factor=pipe.sf, mode="bicubic").clamp(0, 1)
    return sr, alpha


def run(opts: InferenceOptions) -> int:
    """Process every input image; returns the exit status (1 if any image failed)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    inputs = list_images(opts.in_path)
    targets = output_paths(inputs, opts.out_path, opts.suffix, opts.ext)
    cfg = load_config(opts.config)
    sf = build.scale_factor(cfg)
    if opts.scale != sf:
        raise ConfigError(f"--scale {opts.scale} but {opts.config} is a x{sf} model (diffusion.params.sf)")
    device = build.pick_device(opts.device)
    files = build.inference_files(cfg, opts.ckpt, opts.deploy)
    sampler = "one_step" if opts.one_step else ("ddim" if opts.ddim else "ancestral")
    pipe = build.build_pipeline(cfg, files, device, precision="fp32" if opts.fp32 else opts.precision,
                                sampler=sampler, channels_last=opts.channels_last, compile=opts.compile)
    mine = inputs[rank::world]
    failed: list[tuple[Path, str]] = []
    done = skipped = 0
    bar = tqdm(mine, desc=f"SR x{sf}" + (f" [rank {rank}/{world}]" if world > 1 else ""), unit="img",
               dynamic_ncols=True)
    for path in bar:
        target = targets[path]
        if opts.skip_existing and target.exists():
            skipped += 1
            continue
        try:
            image = read_image(path)
        except ImageReadError as exc:
            failed.append((path, str(exc)))
            tqdm.write(f"skipped: {exc}")
            continue
        sr, alpha = upscale_image(pipe, image, opts)
        write_image(target, sr, alpha=alpha, mode=image.mode, bit_depth=image.bit_depth)
        if opts.compare:
            save_compare(target.with_name(f"{target.stem}_compare.png"), image.rgb, sr)
        done += 1
    summary = f"{done} image(s) written to {opts.out_path}" + (f", {skipped} already there" if skipped else "")
    if failed:
        summary += f"; {len(failed)} failed: " + ", ".join(str(p) for p, _ in failed)
    print(summary + (f" [rank {rank}]" if world > 1 else ""))
    return 1 if failed else 0
