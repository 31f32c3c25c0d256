"""Tiny random checkpoints and real photographs for smoke runs and tests on any machine.

``write_smoke_assets(cfg)`` writes, at the paths ``configs/smoke.yaml`` names: a random FP teacher,
a random FP "SinSR" student init, the BiMaCo student converted from it, a random VQ-f4 autoencoder,
and HR/LR images cut from ``skimage.data`` photographs (training HR set and a validation pair set).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from bimacosr import build
from bimacosr.checkpoint import save_state_dict
from bimacosr.config import REPO_ROOT, load_config, to_plain
from bimacosr.models import split_params
from bimacosr.quant import binarize

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")
STUDENT_NAME = "bimacosr.pth"
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"
SMOKE_CACHE = Path.home() / ".cache" / "bimacosr"
"""Where ``--smoke`` keeps its files (``data/smoke/...`` below it, as the config names them):
outside the repository, so a user's own ``data/smoke`` (``make_smoke_assets.py``) is left alone."""


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph ``[H, W, 3]`` shipped with scikit-image."""
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def photo_crops(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random ``size x size`` crops of the bundled photographs (cycled)."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)])
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        crops.append(np.ascontiguousarray(image[top: top + size, left: left + size]))
    return crops


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic ``1/factor`` resize with Pillow (what an LR test input looks like)."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // factor, h // factor), Image.BICUBIC))


def randomize(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give the zero-initialised output convs small random weights, so outputs are not constant."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0.0, std)
    return model


def write_smoke_assets(cfg: DictConfig, root: str | Path = ".", n_train: int = 8, n_val: int = 2,
                       seed: int = 0) -> dict[str, Path]:
    """Write the tiny weights and images ``cfg`` (``configs/smoke.yaml``) points to, under
    ``root``; returns the written weight paths by role."""
    root = Path(root)
    torch.manual_seed(seed)
    teacher = randomize(build.build_denoiser_from_config(cfg, "teacher"))
    sinsr = randomize(build.build_denoiser_from_config(cfg, "fp"))
    sinsr_state = {k: v.clone() for k, v in sinsr.state_dict().items()}
    student = binarize(sinsr, split_params(to_plain(cfg.model.params))[1])
    vq = build.build_autoencoder(cfg, weights=False)
    weights = {
        "teacher": root / cfg.model.teacher_ckpt_path,
        "sinsr": root / cfg.quantparameter.train.pretained_model,
        "autoencoder": root / cfg.autoencoder.ckpt_path,
    }
    weights["student"] = weights["teacher"].with_name(STUDENT_NAME)
    for role, state in (("teacher", teacher.state_dict()), ("sinsr", sinsr_state),
                        ("student", student.state_dict()), ("autoencoder", vq.state_dict())):
        save_state_dict(state, weights[role])
    sf = int(cfg.degradation.sf)
    gt_size = int(cfg.degradation.gt_size)
    train_dir = root / cfg.data.train.params.dir_paths[0]
    train_dir.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(photo_crops(gt_size + gt_size // 2, n_train, seed)):
        Image.fromarray(crop).save(train_dir / f"train_{i:03d}.png")
    lr_dir, hr_dir = root / cfg.data.val.params.dir_path, root / cfg.data.val.params.dir_path_extra
    lr_dir.mkdir(parents=True, exist_ok=True)
    hr_dir.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(photo_crops(gt_size, n_val, seed + 1)):
        Image.fromarray(crop).save(hr_dir / f"val_{i:03d}.png")
        Image.fromarray(downscale(crop, sf)).save(lr_dir / f"val_{i:03d}.png")
    return weights


def smoke_inference(root: str | Path = SMOKE_CACHE) -> tuple[DictConfig, Path]:
    """``configs/smoke.yaml`` with its files under ``root`` (written there on first use, then
    reused) and the path of its tiny random BiMaCo student: (config, checkpoint) for
    ``build.inference_files``. Runs anywhere in seconds; the pictures it makes are noise."""
    root = Path(root)
    cfg = load_config(SMOKE_CONFIG)
    student = root / Path(cfg.model.teacher_ckpt_path).with_name(STUDENT_NAME)
    autoencoder = root / cfg.autoencoder.ckpt_path
    if not (student.is_file() and autoencoder.is_file()):
        write_smoke_assets(cfg, root, n_train=1, n_val=1)
    cfg.autoencoder.ckpt_path = str(autoencoder)
    return cfg, student
