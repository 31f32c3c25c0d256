"""Folder (or file) of LR images -> 4x SR images: what ``inference_quant.py`` runs.

Loads the config and weights strictly (the original loaded non-strictly, so a wrong file
"worked"), runs :class:`bimacosr.pipeline.SRPipeline` on every image with a progress bar, keeps
grayscale and alpha, never overwrites an input, reports unreadable files by name and goes on.
Under ``torchrun`` each process takes every ``WORLD_SIZE``-th file. Every image is sampled with
its own generator seeded by ``seed``, so results do not depend on the order or the process count.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from bimacosr.checkpoint import load_state_dict_into
from bimacosr.config import ConfigError, load_config, require, to_plain
from bimacosr.deploy import load_deploy, read_deploy_file
from bimacosr.diffusion import Schedule
from bimacosr.imageio import ImageReadError, LoadedImage, list_images, read_image, write_image
from bimacosr.models import build_denoiser, split_params
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.pipeline import SRPipeline
from bimacosr.visualize import save_compare
from bimacosr.weights import resolve_weight


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
    compare: bool = False
    skip_existing: bool = False
    deploy: Path | None = None
    tile_batch: int = 1
    channels_last: bool = False
    compile: bool = False


def pick_device(name: str | None) -> torch.device:
    """``name`` or, by default, this process's CUDA device (``LOCAL_RANK``) when there is one."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def load_denoiser(cfg: DictConfig, ckpt: str | Path, deploy: str | Path | None = None) -> nn.Module:
    """The denoiser: from a packed deploy file (1-bit integer execution) when ``deploy`` is given,
    else built from ``model.params`` -- binarized before loading when the config asks for it
    (``quantparameter.inference.if_quant``, default: whenever there are quant keys), so every
    branch value comes from ``ckpt``."""
    params = to_plain(cfg.model.params)
    if deploy is not None:
        meta, _ = read_deploy_file(resolve_weight(deploy, what="deploy file (--deploy)"))
        if json.loads(meta["params"]) != params:
            raise ConfigError(f"--deploy {deploy} was exported from other model.params than the config's; "
                              f"re-export it with scripts/export_deploy.py --config <this config>")
        return load_deploy(deploy)
    if cfg.get("quantparameter", {}).get("inference", {}).get("if_quant", True) is False:
        params = split_params(params)[0]
    denoiser = build_denoiser(params)
    load_state_dict_into(denoiser, resolve_weight(ckpt, what="denoiser checkpoint (--ckpt)"),
                         what="denoiser checkpoint")
    return denoiser


def load_pipeline(cfg: DictConfig, ckpt: str | Path, device: torch.device, *, fp16: bool,
                  sampler: str = "one_step", deploy: str | Path | None = None,
                  channels_last: bool = False, compile: bool = False) -> SRPipeline:
    """Build denoiser + autoencoder + schedule from an original config and load the weights.

    ``fp16`` runs the autoencoder in half precision (as the original on GPU); the denoiser stays
    float32. ``channels_last`` / ``compile`` are speed options that leave the maths unchanged.
    """
    require(cfg, "model.params", "diffusion.params", "autoencoder.params", "autoencoder.ckpt_path")
    denoiser = load_denoiser(cfg, ckpt, deploy)
    vq = VQAutoencoder(**to_plain(cfg.autoencoder.params))
    load_state_dict_into(vq, resolve_weight(cfg.autoencoder.ckpt_path, what="autoencoder (autoencoder.ckpt_path)"),
                         what="autoencoder checkpoint")
    vq = vq.to(device).eval()
    if fp16:
        vq = vq.half()
    denoiser = denoiser.to(device).eval()
    if channels_last:
        denoiser, vq = denoiser.to(memory_format=torch.channels_last), vq.to(memory_format=torch.channels_last)
    if compile:
        denoiser = torch.compile(denoiser)
    diffusion = to_plain(cfg.diffusion.params)
    return SRPipeline(denoiser, vq, Schedule.from_config(diffusion).to(device),
                      sampler=sampler, sf=int(diffusion.get("sf", 4)))


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
    sf = int(cfg.get("diffusion", {}).get("params", {}).get("sf", 4))
    if opts.scale != sf:
        raise ConfigError(f"--scale {opts.scale} but {opts.config} is a x{sf} model (diffusion.params.sf)")
    device = pick_device(opts.device)
    fp16 = device.type == "cuda" and not opts.fp32 and bool(cfg.autoencoder.get("use_fp16", True))
    sampler = "one_step" if opts.one_step else ("ddim" if opts.ddim else "ancestral")
    pipe = load_pipeline(cfg, opts.ckpt, device, fp16=fp16, sampler=sampler, deploy=opts.deploy,
                         channels_last=opts.channels_last, compile=opts.compile)
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
