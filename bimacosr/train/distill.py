"""The distillation step as pure functions (docs/pipeline.md §5.3-5.4).

One step: the LQ image is encoded (bicubic x4, VQ-f4, no quantisation), ``x_T = z_y + kappa *
sqrt_eta_T * eps``; the frozen FP teacher runs the full deterministic DDIM loop from that same
``x_T`` (no grad) to give the target latent; the student predicts x0 in one step at the last
timestep; the loss is the per-sample latent MSE averaged over the batch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from bimacosr.diffusion import Schedule, predict_x0, prior_sample, sample_ddim
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.models.first_stage import encode_first_stage

EMA_SKIP = "relative_position_index"


def teacher_target(teacher: nn.Module, x_T: Tensor, z_y: Tensor, lq: Tensor, schedule: Schedule) -> Tensor:
    """The teacher's deterministic multi-step DDIM sample from ``x_T`` (latent, no grad)."""
    with torch.no_grad():
        return sample_ddim(lambda x, t: teacher(x, t, lq=lq), x_T, z_y, schedule)


def distill_loss(student: nn.Module, teacher: nn.Module, autoencoder: VQAutoencoder, schedule: Schedule,
                 lq: Tensor, noise: Tensor, sf: int = 4) -> tuple[Tensor, dict[str, Tensor]]:
    """Latent MSE between the student's one-step x0 and the teacher's DDIM target.

    ``lq`` ``[B, 3, h, w]`` in [-1, 1]; ``noise`` ``[B, 3, h, w]`` (the prior noise, latent size).
    Returns the batch-mean loss (differentiable in the student) and the intermediates
    ``z_y``, ``x_T``, ``target``, ``pred``, ``mse`` (per sample, ``[B]``).
    """
    z_y = encode_first_stage(autoencoder, lq, up_sample=True, sf=sf)
    x_T = prior_sample(z_y, schedule, noise)
    target = teacher_target(teacher, x_T, z_y, lq, schedule)
    pred = predict_x0(lambda x, t: student(x, t, lq=lq), x_T, schedule.num_timesteps - 1, schedule)
    mse = ((target - pred) ** 2).mean(dim=(1, 2, 3))
    return mse.mean(), {"z_y": z_y, "x_T": x_T, "target": target, "pred": pred.detach(), "mse": mse.detach()}


def lr_at(iteration: int, base_lr: float, milestones: tuple[int, int]) -> float:
    """Learning rate used at 1-based ``iteration`` by the original schedule (docs/pipeline.md §5.4).

    The original adjusts the lr *after* each step: iteration 1 runs at ``base_lr``, iterations
    ``2..warmup+1`` at ``(iteration-1)/warmup * base_lr`` (warm-up), then ``base_lr`` until the
    second milestone is finished, then half of it.
    """
    warmup, halve_after = milestones
    done = iteration - 1
    if done == 0:
        return base_lr
    if done <= warmup:
        return done / warmup * base_lr
    return base_lr * (0.5 if done >= halve_after else 1.0)


@torch.no_grad()
def ema_update(ema: Mapping[str, Tensor], state: Mapping[str, Tensor], rate: float) -> None:
    """``ema <- rate * ema + (1 - rate) * state`` in place, for every key but the
    ``relative_position_index`` buffers (float buffers such as SMB indices are averaged too)."""
    for key, value in state.items():
        if EMA_SKIP not in key:
            ema[key].mul_(rate).add_(value.detach().to(ema[key].dtype), alpha=1 - rate)
