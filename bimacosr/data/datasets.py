"""Datasets of the released config: ``realesrgan`` (GT crops + degradation kernels, docs/pipeline.md §6.1)
for training and ``folder`` (LR/HR pairs, 6.3) for validation, and their builders from ``cfg.data``."""
from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bimacosr.config import PATH_RULE, resolve_config_path, to_plain
from bimacosr.data.kernels import BlurKernelOptions, sample_final_sinc
from bimacosr.data.transforms import area_resize, augment, pad_to_square, random_crop
from bimacosr.imageio import find_images, image_extensions, read_image

TRAIN_TYPES, VAL_TYPES = ("realesrgan",), ("folder",)
# The released config's kernels of the first and the second degradation order.
BLUR1 = BlurKernelOptions()
BLUR2 = BlurKernelOptions(pad_size=15, blur_sigma=(0.2, 1.5))


class RealESRGANDataset(Dataset):
    """GT images for on-the-fly Real-ESRGAN degradation.

    Files: every image under each of ``dir_paths`` (recursive) with an extension in ``im_exts``,
    matched in any case and with 'jpg'/'jpeg' as one format, sorted per folder, plus the paths listed
    one per line in ``txt_file_paths`` (relative ones as ``config.resolve_config_path``). (The
    original matched exactly, so the released config's ``JPEG`` missed ``.jpg``/``.jpeg`` files;
    PNGs still need ``png`` in ``im_exts``.)

    An item (``index``) is: the image read as RGB [0, 1] (Pillow), horizontal flip with p 1/2
    (``use_hflip``; ``use_rot`` adds a vertical flip / transpose), then with ``rescale_gt``: side
    S = max(min(H, W), gt_size), reflect-101 padding to at least S, a random S x S crop and an area
    resize to gt_size if S != gt_size (without ``rescale_gt`` S = ``crop_pad_size`` and no resize);
    and the degradation kernels ``kernel1`` ([blur1.pad_size]^2), ``kernel2`` ([blur2.pad_size]^2)
    and ``sinc_kernel`` ([blur2.pad_size]^2; a sinc with ``final_sinc_prob``, else a delta).

    Randomness: every item draws from generators seeded by (seed, epoch, index) only, so items do
    not depend on worker processes or on the order of access, and a resumed run sees the same items;
    ``set_epoch`` changes them. An unreadable image raises ``ImageReadError`` naming the file (the
    original silently retried other random files).
    """

    def __init__(self, dir_paths: Sequence[str | os.PathLike], im_exts: str | Sequence[str], gt_size: int = 256,
                 use_hflip: bool = True, use_rot: bool = False, rescale_gt: bool = True, crop_pad_size: int = 300,
                 blur1: BlurKernelOptions = BLUR1, blur2: BlurKernelOptions = BLUR2,
                 final_sinc_prob: float = 0.8, txt_file_paths: Sequence[str | os.PathLike] = (),
                 seed: int = 0) -> None:
        self.paths: list[Path] = []
        for folder in dir_paths:
            self.paths += find_images(folder, im_exts, recursive=True)
        for txt in txt_file_paths:
            self.paths += [resolve_config_path(line.strip()) for line in Path(txt).read_text().splitlines()
                           if line.strip()]
        if not self.paths:
            raise ValueError(f"no training images found in {[str(d) for d in dir_paths]} with extensions "
                             f"{list(image_extensions(im_exts))} (any case, recursive)"
                             + (f" nor listed in {[str(t) for t in txt_file_paths]}" if txt_file_paths else ""))
        self.gt_size, self.crop_pad_size, self.rescale_gt = gt_size, crop_pad_size, rescale_gt
        self.use_hflip, self.use_rot = use_hflip, use_rot
        self.blur1, self.blur2, self.final_sinc_prob = blur1, blur2, final_sinc_prob
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Items of another epoch get other crops, flips and kernels (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _generators(self, index: int) -> tuple[np.random.Generator, random.Random]:
        values_seq, choices_seq = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        return np.random.default_rng(values_seq), random.Random(int(choices_seq.generate_state(1, np.uint64)[0]))

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        np_rng, rng = self._generators(index)
        path = self.paths[index]
        img = augment(read_image(path).rgb[0], self.use_hflip, self.use_rot, rng)
        h, w = img.shape[-2:]
        size = max(min(h, w), self.gt_size) if self.rescale_gt else self.crop_pad_size
        img = random_crop(pad_to_square(img, size), size, rng)
        if self.rescale_gt and size != self.gt_size:
            img = area_resize(img, self.gt_size)
        kernels = {"kernel1": self.blur1.sample(np_rng, rng), "kernel2": self.blur2.sample(np_rng, rng),
                   "sinc_kernel": sample_final_sinc(self.final_sinc_prob, self.blur2.pad_size, np_rng, rng)}
        return {"gt": img.contiguous(), **{k: torch.from_numpy(v).float() for k, v in kernels.items()},
                "gt_path": str(path)}


class PairedFolderDataset(Dataset):
    """Validation pairs: each image in ``lr_dir`` (extensions ``im_exts``, any case; recursive if
    asked) with the file of the same relative path in ``hr_dir``. Items: ``lq`` [3, h, w] and ``gt``
    [3, H, W] normalised as (x - mean) / std (the released 0.5 / 0.5 gives [-1, 1]), ``path`` (the LR
    file). ``length`` keeps the first pairs (the original took a random sample)."""

    def __init__(self, lr_dir: str | os.PathLike, hr_dir: str | os.PathLike, im_exts: str | Sequence[str] = ("png",),
                 mean: float = 0.5, std: float = 0.5, recursive: bool = False, length: int | None = None) -> None:
        lr_dir, hr_dir = Path(lr_dir), Path(hr_dir)
        lr_files = find_images(lr_dir, im_exts, recursive)
        if not lr_files:
            raise ValueError(f"no validation images in '{lr_dir}' with extensions {list(image_extensions(im_exts))} (any case)")
        if not hr_dir.is_dir():
            raise FileNotFoundError(f"HR folder not found: '{hr_dir}'")
        unpaired = [str(p.relative_to(lr_dir)) for p in lr_files if not (hr_dir / p.relative_to(lr_dir)).is_file()]
        if unpaired:
            shown = ", ".join(unpaired[:10]) + (f", ... ({len(unpaired)} in all)" if len(unpaired) > 10 else "")
            raise ValueError(f"LR images without an HR image of the same name in '{hr_dir}': {shown}")
        self.pairs = [(p, hr_dir / p.relative_to(lr_dir)) for p in lr_files][:length]
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        lr_path, hr_path = self.pairs[index]
        lq, gt = (read_image(p).rgb[0] for p in (lr_path, hr_path))
        return {"lq": (lq - self.mean) / self.std, "gt": (gt - self.mean) / self.std, "path": str(lr_path)}


def _check_keys(params: Mapping[str, Any], known: set[str], kind: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown {kind} dataset parameter(s) {unknown}; known: {sorted(known)}")


def _blur_options(p: Mapping[str, Any], suffix: str) -> BlurKernelOptions:
    """The config's blur_kernel_size{suffix}, kernel_list{suffix}, ... as BlurKernelOptions."""
    return BlurKernelOptions(
        pad_size=int(p[f"blur_kernel_size{suffix}"]), kernel_list=tuple(p[f"kernel_list{suffix}"]),
        kernel_prob=tuple(p[f"kernel_prob{suffix}"]), sinc_prob=float(p[f"sinc_prob{suffix}"]),
        blur_sigma=tuple(p[f"blur_sigma{suffix}"]), betag_range=tuple(p[f"betag_range{suffix}"]),
        betap_range=tuple(p[f"betap_range{suffix}"]))


_TRAIN_KEYS = {"dir_paths", "txt_file_path", "im_exts", "io_backend", "final_sinc_prob", "gt_size", "crop_pad_size",
               "use_hflip", "use_rot", "rescale_gt", "length"} | {
    f"{k}{s}" for k in ("blur_kernel_size", "kernel_list", "kernel_prob", "sinc_prob", "blur_sigma", "betag_range",
                        "betap_range") for s in ("", "2")}
_VAL_KEYS = {"dir_path", "dir_path_extra", "transform_type", "transform_kwargs", "im_exts", "length", "recursive"}


def _section(section: Any, allowed: tuple[str, ...], which: str) -> dict[str, Any]:
    section = to_plain(section)
    if section.get("type") not in allowed:
        raise ValueError(f"data.{which}.type must be one of {list(allowed)}, got {section.get('type')!r}")
    return dict(section.get("params") or {})


def _existing(path: str | os.PathLike, key: str, folder: bool = True) -> Path:
    """A config path resolved by ``resolve_config_path``; a missing one is an error naming the key."""
    resolved = resolve_config_path(path)
    if not (resolved.is_dir() if folder else resolved.is_file()):
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{key}: {kind} not found: '{path}' ({PATH_RULE})")
    return resolved


def build_train_dataset(section: Any, seed: int = 0) -> RealESRGANDataset:
    """``RealESRGANDataset`` from ``cfg.data.train`` (``type: realesrgan`` and its ``params``)."""
    p = _section(section, TRAIN_TYPES, "train")
    _check_keys(p, _TRAIN_KEYS, "realesrgan")
    if (p.get("io_backend") or {}).get("type", "disk") != "disk" or p.get("length") is not None:
        raise ValueError("realesrgan dataset: only io_backend 'disk' and length null are supported")
    return RealESRGANDataset(
        [_existing(d, "data.train.params.dir_paths") for d in p["dir_paths"]], p["im_exts"],
        gt_size=int(p["gt_size"]), use_hflip=bool(p["use_hflip"]),
        use_rot=bool(p["use_rot"]), rescale_gt=bool(p.get("rescale_gt", False)), crop_pad_size=int(p["crop_pad_size"]),
        blur1=_blur_options(p, ""), blur2=_blur_options(p, "2"), final_sinc_prob=float(p["final_sinc_prob"]),
        txt_file_paths=[_existing(t, "data.train.params.txt_file_path", folder=False)
                        for t in p.get("txt_file_path") or ()], seed=seed)


def build_val_dataset(section: Any) -> PairedFolderDataset:
    """``PairedFolderDataset`` from ``cfg.data.val`` (``type: folder``: LR ``dir_path``, HR
    ``dir_path_extra``, ``transform_kwargs`` mean/std)."""
    p = _section(section, VAL_TYPES, "val")
    _check_keys(p, _VAL_KEYS, "folder")
    if p.get("transform_type", "default") != "default":
        raise ValueError(f"folder dataset: transform_type must be 'default', got {p['transform_type']!r}")
    norm = p.get("transform_kwargs") or {}
    return PairedFolderDataset(_existing(p["dir_path"], "data.val.params.dir_path"),
                               _existing(p["dir_path_extra"], "data.val.params.dir_path_extra"), p.get("im_exts", "png"),
                               mean=float(norm.get("mean", 0.0)), std=float(norm.get("std", 1.0)),
                               recursive=bool(p.get("recursive", False)), length=p.get("length"))
