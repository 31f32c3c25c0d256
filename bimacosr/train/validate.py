"""Validation during training: one-step SR of the LR/HR pairs, PSNR (and LPIPS when its weights
are present), and a comparison grid PNG (bicubic | SR | HR) per validation."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from bimacosr.diffusion import Schedule
from bimacosr.evaluation import trainer_psnr_per_image
from bimacosr.imageio import write_image
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.pipeline import SRPipeline
from bimacosr.train.logs import RunLogger
from bimacosr.visualize import panel

GRID_IMAGES = 4
VGG_FILE = "vgg16-397923af.pth"
_LPIPS: dict[str, object] = {}


def lpips_model(device: torch.device) -> nn.Module | None:
    """LPIPS-VGG (the trainer's metric) or ``None`` with one note when its weights are missing."""
    if "model" not in _LPIPS:
        vgg = Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
        _LPIPS["model"] = None
        if not vgg.is_file():
            tqdm.write(f"LPIPS skipped during validation: it needs torchvision's {VGG_FILE} at {vgg}")
        else:
            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _LPIPS["model"] = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    return _LPIPS["model"]


@torch.no_grad()
def validate(student: nn.Module, vq: VQAutoencoder, schedule: Schedule, dataset: Dataset, run_dir: Path,
             step: int, sf: int, logger: RunLogger, seed: int) -> float:
    """Mean PSNR (trainer definition, Y channel) of the student over ``dataset``; logs and writes
    ``val/step_<N>.png``. Uses fresh noise from ``seed`` so validations are comparable."""
    student.eval()
    device = next(student.parameters()).device
    pipe = SRPipeline(student, vq, schedule, sampler="one_step", sf=sf)
    generator = torch.Generator(device).manual_seed(seed)
    metric = lpips_model(device)
    psnrs, lpips_values, rows = [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        lq01 = (item["lq"][None] + 1) / 2
        gt01 = ((item["gt"][None] + 1) / 2).to(device)
        sr = pipe(lq01, generator=generator)
        psnrs.append(trainer_psnr_per_image(sr, gt01).item())
        if metric is not None:
            lpips_values.append(metric(sr * 2 - 1, gt01 * 2 - 1).mean().item())
        if i < GRID_IMAGES:
            bicubic = F.interpolate(lq01.to(device), size=gt01.shape[-2:], mode="bicubic").clamp(0, 1)
            rows.append([(label, t[0].cpu()) for label, t in (("bicubic", bicubic), ("SR", sr), ("HR", gt01))])
    psnr = sum(psnrs) / len(psnrs)
    logger.val(step, psnr, sum(lpips_values) / len(lpips_values) if lpips_values else None)
    if rows and all(r[0][1].shape == rows[0][0][1].shape for r in rows):
        write_image(run_dir / "val" / f"step_{step:07d}.png", panel(rows))
    return psnr
