"""ResShift eta schedule (docs/pipeline.md §3.1, §3.5–3.7).

The float64 arrays are built with numpy exactly as the official ``get_named_eta_schedule`` /
``GaussianDiffusion.__init__`` do (numpy's ``linspace``/``power`` are what make them bit-exact), then
kept as float64 tensors. The float32 per-step coefficients used inside the sampling loops are formed
once here, following the official order of operations: every float64 array is cast to float32 before
it takes part in tensor arithmetic, and derived coefficients (input std, DDIM k/m/j) are then formed
in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

SCHEDULE_NAMES = ("exponential",)
PREDICT_TYPES = ("xstart",)
# keys of the official ``create_gaussian_diffusion`` and their defaults there
_DEFAULTS: dict[str, Any] = {
    "schedule_name": None, "normalize_input": None, "sf": 4, "min_noise_level": 0.01, "steps": 1000,
    "kappa": 1.0, "etas_end": 0.99, "schedule_kwargs": None, "weighted_mse": False,
    "predict_type": "xstart", "timestep_respacing": None, "scale_factor": None, "latent_flag": True,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(key: str, value: Any, *, integer: bool = False, upper: float | None = None) -> None:
    """Raise ValueError unless ``value`` is a positive (int) number, optionally ``<= upper``."""
    kind = "an int" if integer else "a number"
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else _is_number(value)
    if not ok or value <= 0 or (upper is not None and value > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{key} must be {kind} > 0{bound}, got {value!r}")


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def eta_schedule(schedule_name: str, steps: int, min_noise_level: float, etas_end: float,
                 kappa: float, schedule_kwargs: Mapping[str, Any] | None) -> Tensor:
    """sqrt_eta_t for t = 0..steps-1, float64 (steps,) (official ``get_named_eta_schedule``).

    exponential: s0 = min(min_noise_level/kappa, min_noise_level, sqrt(0.001)),
    sqrt_eta_t = s0 · r^((t/(T-1))^power · (T-1)) with r = (etas_end/s0)^(1/(T-1)).
    """
    if schedule_name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule_name must be one of {SCHEDULE_NAMES}, got {schedule_name!r}")
    _positive("steps", steps, integer=True)
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    _positive("min_noise_level", min_noise_level)
    _positive("etas_end", etas_end, upper=1.0)
    _positive("kappa", kappa)
    if not isinstance(schedule_kwargs, Mapping):
        raise ValueError(f"schedule_kwargs must be a mapping holding 'power', got {schedule_kwargs!r}")
    power = schedule_kwargs.get("power")
    _positive("schedule_kwargs.power", power)
    etas_start = min(min_noise_level / kappa, min_noise_level, math.sqrt(0.001))
    increaser = math.exp(1 / (steps - 1) * math.log(etas_end / etas_start))
    base = np.ones([steps]) * increaser
    power_timestep = np.linspace(0, 1, steps, endpoint=True) ** power
    power_timestep *= steps - 1
    return torch.from_numpy(np.power(base, power_timestep) * etas_start)


def space_timesteps(steps: int, respacing: int | None) -> list[int]:
    """Kept original step indices, ascending: {int(steps/respacing · i) : i < respacing}.

    15 → 4 keeps [0, 3, 7, 11] (the noisiest step is dropped: official quirk, §3.7).
    """
    if respacing is None:
        return list(range(steps))
    _positive("timestep_respacing", respacing, integer=True, upper=steps)
    return sorted({int((steps / respacing) * i) for i in range(respacing)})


@dataclass(frozen=True, eq=False)
class Schedule:
    """Diffusion schedule of ``num_timesteps`` (n) steps after respacing; all arrays are (n,).

    float64 (official numpy arrays): ``sqrt_etas``, ``etas``, ``etas_prev``, ``alpha``,
    ``posterior_variance(_clipped)``, ``posterior_log_variance_clipped``, ``posterior_mean_coef1/2``,
    ``ddim_coef1`` (eta_prev·eta), ``ddim_coef2`` (eta_prev/eta), ``weight_loss_mse``.
    float32 (as used in the loops): ``f32_etas``, ``f32_sqrt_etas_kappa``, ``f32_input_std`` (the
    network input is x_t / std), ``f32_input_scale`` (1/std), ``f32_ddim_k/m/j``,
    ``f32_post_coef1/2``, ``f32_post_logvar``.
    ``timestep_map`` int64: original step index given to the network for each respaced index.
    """

    kappa: float
    steps: int
    timestep_respacing: int | None
    normalize_input: bool
    latent_flag: bool
    weighted_mse: bool
    scale_factor: float | None
    sf: int
    num_timesteps: int
    prior_std: float
    timestep_map: Tensor
    sqrt_etas: Tensor
    etas: Tensor
    etas_prev: Tensor
    alpha: Tensor
    posterior_variance: Tensor
    posterior_variance_clipped: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    ddim_coef1: Tensor
    ddim_coef2: Tensor
    weight_loss_mse: Tensor
    f32_etas: Tensor
    f32_sqrt_etas_kappa: Tensor
    f32_input_std: Tensor
    f32_input_scale: Tensor
    f32_ddim_k: Tensor
    f32_ddim_m: Tensor
    f32_ddim_j: Tensor
    f32_post_coef1: Tensor
    f32_post_coef2: Tensor
    f32_post_logvar: Tensor

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Schedule":
        """Build from the keyword arguments of the official ``create_gaussian_diffusion``
        (or a ``{target, params}`` mapping holding them); missing keys take its defaults.

        Raises ValueError naming the key for unknown keys and invalid values.
        """
        if "params" in cfg and "target" in cfg:
            cfg = cfg["params"]
        unknown = sorted(set(cfg) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown diffusion config keys {unknown}; allowed: {sorted(_DEFAULTS)}")
        c = {**_DEFAULTS, **cfg}
        if c["predict_type"] not in PREDICT_TYPES:
            raise ValueError(f"predict_type must be one of {PREDICT_TYPES}, got {c['predict_type']!r}")
        for key in ("normalize_input", "latent_flag", "weighted_mse"):
            _flag(key, c[key])
        _positive("sf", c["sf"], integer=True)
        if c["scale_factor"] is not None:
            _positive("scale_factor", c["scale_factor"])
        sqrt_etas = eta_schedule(c["schedule_name"], c["steps"], c["min_noise_level"],
                                 c["etas_end"], c["kappa"], c["schedule_kwargs"])
        kept = space_timesteps(c["steps"], c["timestep_respacing"])
        return cls.from_sqrt_etas(
            sqrt_etas[kept], kappa=float(c["kappa"]), timestep_map=kept, steps=c["steps"],
            timestep_respacing=c["timestep_respacing"], normalize_input=c["normalize_input"],
            latent_flag=c["latent_flag"], weighted_mse=c["weighted_mse"],
            scale_factor=c["scale_factor"], sf=c["sf"])

    @classmethod
    def from_sqrt_etas(cls, sqrt_etas: Tensor, *, kappa: float, timestep_map: list[int],
                       steps: int, timestep_respacing: int | None, normalize_input: bool,
                       latent_flag: bool, weighted_mse: bool, scale_factor: float | None,
                       sf: int) -> "Schedule":
        """All arrays from the kept float64 sqrt_etas (n,) (official ``GaussianDiffusion``)."""
        se = sqrt_etas.numpy().astype(np.float64)
        etas = se ** 2
        if not ((etas > 0).all() and (etas <= 1).all()):
            raise ValueError("etas must lie in (0, 1]")
        etas_prev = np.append(0.0, etas[:-1])
        alpha = etas - etas_prev
        post_var = kappa ** 2 * etas_prev / etas * alpha
        post_var_clipped = np.append(post_var[1], post_var[1:])
        arrays = {
            "sqrt_etas": se, "etas": etas, "etas_prev": etas_prev, "alpha": alpha,
            "posterior_variance": post_var, "posterior_variance_clipped": post_var_clipped,
            "posterior_log_variance_clipped": np.log(post_var_clipped),
            "posterior_mean_coef1": etas_prev / etas, "posterior_mean_coef2": alpha / etas,
            "ddim_coef1": etas_prev * etas, "ddim_coef2": etas_prev / etas,
            "weight_loss_mse": 0.5 / post_var_clipped * (alpha / etas) ** 2,
        }
        t64 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        f32 = {k: v.float() for k, v in t64.items()}
        if not normalize_input:
            input_std = torch.ones_like(f32["etas"])
        elif latent_flag:
            input_std = torch.sqrt(f32["etas"] * kappa ** 2 + 1)
        else:
            input_std = f32["sqrt_etas"] * kappa * 3 + 1
        sqrt_c1, sqrt_c2 = torch.sqrt(f32["ddim_coef1"]), torch.sqrt(f32["ddim_coef2"])
        return cls(
            kappa=kappa, steps=steps, timestep_respacing=timestep_respacing,
            normalize_input=normalize_input, latent_flag=latent_flag, weighted_mse=weighted_mse,
            scale_factor=scale_factor, sf=sf, num_timesteps=len(se),
            prior_std=float(kappa * se[-1]),
            timestep_map=torch.tensor(timestep_map, dtype=torch.int64), **t64,
            f32_etas=f32["etas"], f32_sqrt_etas_kappa=torch.from_numpy(se * kappa).float(),
            f32_input_std=input_std, f32_input_scale=1 / input_std,
            f32_ddim_k=1 - f32["etas_prev"] + sqrt_c1 - sqrt_c2, f32_ddim_m=sqrt_c2,
            f32_ddim_j=f32["etas_prev"] - sqrt_c1,
            f32_post_coef1=f32["posterior_mean_coef1"], f32_post_coef2=f32["posterior_mean_coef2"],
            f32_post_logvar=f32["posterior_log_variance_clipped"])

    def tensors(self) -> dict[str, Tensor]:
        """Every array of the schedule by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str) -> "Schedule":
        """A copy with every array on ``device`` (the samplers move them per call otherwise)."""
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})
