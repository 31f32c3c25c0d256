"""ResShift forward process, prior and samplers as pure functions (docs/pipeline.md §3.2–3.6, §4.5).

Shapes: latents ``x_t``, ``y`` (the latent of the upsampled LR) and noises are (B, C, H, W) float32;
step indices ``t`` are respaced indices 0..n-1 (n = ``schedule.num_timesteps``), an int or an int64
tensor of shape (B,).

Every sampler shares one signature ``sampler(model_fn, x_T, y, schedule, *, noise_fn=None, ...)``
with ``model_fn(x_in, t) -> x0_hat``: ``x_in`` is the already input-scaled latent x_t / std_t and
``t`` the int64 (B,) ORIGINAL step indices (passed through ``timestep_map``); the network's other
inputs (e.g. ``lq``) are bound by the caller. ``noise_fn(like) -> noise`` supplies every noise draw of
latent shape (default ``torch.randn_like``), so callers control the RNG and tests can inject noises.
Latents are never clamped. Per-step coefficients are the schedule's float32 tables indexed by t.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bimacosr.diffusion.schedule import Schedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]


def _steps(t: int | Tensor, like: Tensor) -> Tensor:
    """Step index as an int64 tensor of shape (B,) on ``like``'s device."""
    if isinstance(t, Tensor):
        return t.to(device=like.device, dtype=torch.int64).expand(like.shape[0])
    return torch.full((like.shape[0],), t, dtype=torch.int64, device=like.device)


def _extract(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` (B,) broadcast to ``like``'s shape, as the official ``_extract_into_tensor``."""
    values = table.to(like.device)[t]
    return values.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def prior_sample(y: Tensor, schedule: Schedule, noise: Tensor) -> Tensor:
    """x_T = y + kappa·sqrt_eta_{n-1}·noise (no x0 term; 1.98 for the released schedule)."""
    coef = _extract(schedule.f32_sqrt_etas_kappa, _steps(schedule.num_timesteps - 1, y), y)
    return y + coef * noise


def q_sample(x0: Tensor, y: Tensor, t: int | Tensor, schedule: Schedule, noise: Tensor) -> Tensor:
    """x_t = eta_t·(y − x0) + x0 + kappa·sqrt_eta_t·noise."""
    t = _steps(t, x0)
    return (_extract(schedule.f32_etas, t, x0) * (y - x0) + x0
            + _extract(schedule.f32_sqrt_etas_kappa, t, x0) * noise)


def scale_input(x_t: Tensor, t: int | Tensor, schedule: Schedule) -> Tensor:
    """Network input x_t / sqrt(kappa²·eta_t + 1) (for normalize_input + latent_flag)."""
    return x_t / _extract(schedule.f32_input_std, _steps(t, x_t), x_t)


def predict_x0(model_fn: ModelFn, x_t: Tensor, t_index: int | Tensor, schedule: Schedule) -> Tensor:
    """x0_hat = model_fn(scaled x_t, timestep_map[t]) for respaced step(s) ``t_index``."""
    t = _steps(t_index, x_t)
    return model_fn(scale_input(x_t, t, schedule), schedule.timestep_map.to(t.device)[t])


def ddim_step(x0_hat: Tensor, x_t: Tensor, y: Tensor, t: int | Tensor, schedule: Schedule) -> Tensor:
    """Deterministic DDIM (eta 0) update x_{t-1} = x0_hat·k_t + m_t·x_t + j_t·y; x0_hat at t = 0."""
    t = _steps(t, x_t)
    return (x0_hat * _extract(schedule.f32_ddim_k, t, x_t) + _extract(schedule.f32_ddim_m, t, x_t) * x_t
            + _extract(schedule.f32_ddim_j, t, x_t) * y)


def ancestral_step(x0_hat: Tensor, x_t: Tensor, t: int | Tensor, schedule: Schedule,
                   noise: Tensor) -> Tensor:
    """DDPM update mean + [t ≠ 0]·exp(0.5·logvar_clipped_t)·noise, mean = c1_t·x_t + c2_t·x0_hat."""
    t = _steps(t, x_t)
    mean = (_extract(schedule.f32_post_coef1, t, x_t) * x_t
            + _extract(schedule.f32_post_coef2, t, x_t) * x0_hat)
    nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * _extract(schedule.f32_post_logvar, t, x_t)) * noise


def sample_one_step(model_fn: ModelFn, x_T: Tensor, y: Tensor, schedule: Schedule, *,
                    noise_fn: NoiseFn | None = None) -> Tensor:
    """One-step SR (SinSR/BiMaCoSR inference): x0_hat at the noisiest step n-1, shape of x_T.

    ``y`` is unused (uniform sampler signature). As the official default path (an ancestral step of
    which only x0_hat is kept), ``noise_fn`` is called once after the network and its result is
    discarded, so the RNG advances as there (§4.5). The official ``--ddim`` one-step path draws
    nothing: pass a ``noise_fn`` that consumes no RNG (e.g. ``lambda x: x``) to mirror it.
    """
    x0_hat = predict_x0(model_fn, x_T, schedule.num_timesteps - 1, schedule)
    (noise_fn or torch.randn_like)(x_T)
    return x0_hat


def sample_ddim(model_fn: ModelFn, x_T: Tensor, y: Tensor, schedule: Schedule, *,
                noise_fn: NoiseFn | None = None, callback: Callback | None = None) -> Tensor:
    """Deterministic DDIM (eta 0) over t = n-1 … 0 from x_T; returns x_0 (shape of x_T).

    The teacher's distillation target. Draws no noise (``noise_fn`` is never called; it is accepted
    for the uniform signature). ``callback(i, t, x_{t-1}, x0_hat)`` after visiting step t (i-th visit).
    """
    x = x_T
    for i, t in enumerate(reversed(range(schedule.num_timesteps))):
        x0_hat = predict_x0(model_fn, x, t, schedule)
        x = ddim_step(x0_hat, x, y, t, schedule)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def sample_ancestral(model_fn: ModelFn, x_T: Tensor, y: Tensor, schedule: Schedule, *,
                     noise_fn: NoiseFn | None = None, callback: Callback | None = None) -> Tensor:
    """Ancestral (DDPM) sampling over t = n-1 … 0 from x_T; returns x_0 (shape of x_T).

    ``y`` is unused (the posterior mean needs only x_t and x0_hat). One ``noise_fn`` draw per step
    after the network call, including t = 0 where it is multiplied by 0 (as the official loop).
    ``callback(i, t, x_{t-1}, x0_hat)`` after visiting step t (i-th visit).
    """
    draw = noise_fn or torch.randn_like
    x = x_T
    for i, t in enumerate(reversed(range(schedule.num_timesteps))):
        x0_hat = predict_x0(model_fn, x, t, schedule)
        x = ancestral_step(x0_hat, x, t, schedule, draw(x))
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x
