"""Every tolerance a fixture comparison uses: one table, each row with its reason (docs/tolerances.md).

The fixtures were made by the original code on one CPU family. Another CPU (AVX2 instead of
AVX-512, AMX, another oneDNN kernel or thread split) sums in another order and rounds float32
differently, so a float32 result is compared at its **noise floor**, never exactly:

    allowed = max(atol, FLOOR_FACTOR * noise_floor) + ulps * eps32 * |expected|    (per element)

* ``atol`` is the fixture README's suggested tolerance for that kind of result;
* ``noise_floor`` is what the fixture's ``meta`` says its float32 values are worth: the max
  |difference| between the stored float32 result and the same computation in float64
  (``meta.f64_maxdiff_*``, ``meta.float64_rerun_max_abs_diff``), 0 where it says nothing;
* ``ulps * eps32 * |expected|`` admits a few units in the last place of the value itself (a result
  rounded differently by one ulp anywhere, gradients of magnitude 100 whose sums carry ~1e-5).

Integers (indices, codes, positions, counts) and values the original assigns without arithmetic
stay exact. Float64 results keep absolute tolerances far above float64 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FLOOR_FACTOR", "TOLERANCES", "UINT8_MAX_FRACTION", "Tolerance", "noise_floor"]

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of float32 numbers just above 1

FLOOR_FACTOR = 8.0
"""Two float32 runs that differ only in summation order each lie about one noise floor from the
float64 result, so they differ by up to ~2 floors. Measured on the shared fixtures under other code
paths of this AMD Zen 4 (oneDNN/ATen limited to AVX2, to SSE4.1, 1 and 4 threads): at most 3.9
floors (the autoencoder's ``recon_noquant``, 1.7e-5 against a floor of 4.4e-6). 8 leaves 2x room."""

UINT8_MAX_FRACTION = 1e-3
"""uint8 images: every value within +-1, and at most 0.1 % of them off by 1 (fixture README)."""


@dataclass(frozen=True)
class Tolerance:
    """``allowed = max(atol, floor_factor * noise_floor) + ulps * eps32 * |expected|``."""

    atol: float
    ulps: float
    floor_factor: float
    reason: str

    def allowed(self, want: Tensor, floor: float = 0.0) -> Tensor:
        """Per-element allowed |difference| (float64, shape of ``want``)."""
        base = max(self.atol, self.floor_factor * floor)
        return base + self.ulps * EPS32 * want.detach().to(torch.float64).abs()


def _f32(atol: float, reason: str) -> Tolerance:
    return Tolerance(atol, 4.0, FLOOR_FACTOR, reason)


def _f64(atol: float, reason: str) -> Tolerance:
    return Tolerance(atol, 0.0, 0.0, reason)


TOLERANCES: dict[str, Tolerance] = {
    "exact": Tolerance(0.0, 0.0, 0.0,
                       "integers (codebook indices, SMB positions, tile starts, timestep maps, counts) and "
                       "values the original assigns without arithmetic (zero / 0.25 initial values, "
                       "copied buffers): the same on every CPU"),
    "f32_single_pass": _f32(1e-5, "one float32 forward pass (UNet, autoencoder, degradation ops): README 1e-5, "
                                  "or 8 noise floors where the fixture states one; plus 4 ulps of the value"),
    "f32_multi_step": _f32(2e-4, "15-step float32 sampling and its decode: errors compound over the steps, "
                                 "README 2e-4 or 8 noise floors; plus 4 ulps"),
    "f32_schedule": Tolerance(1e-12, 4.0, 0.0,
                              "float32 schedule coefficients from float64 arrays: one rounding of one value, "
                              "1 ulp apart across CPUs (Intel AMX vs AMD), so 4 ulps of the value; the 1e-12 "
                              "only admits the subnormal neighbours of exact zeros (t = 0 terms)"),
    "f32_layer": _f32(2e-5, "one binary baseline layer, float32 forward and gradients: README 2e-5 plus 4 "
                            "ulps (gradients reach ~200, where sums carry ~2e-5: BiDM's fliter_k)"),
    "f32_unet_grad": _f32(1e-4, "BiMaCo layer float32 gradients (values up to ~80): README 1e-4 plus 4 ulps"),
    "f32_optimizer_step": _f32(1e-6, "parameters after one AdamW step of 2e-5 and the EMA update: the step "
                                     "itself is ~lr, so 1e-6 absolute; plus 4 ulps of the parameter"),
    "f32_metric": _f32(1e-6, "PSNR / SSIM computed in float32 from uint8 images: 1e-6 plus 4 ulps of the "
                             "value (PSNR ~30 dB: 1.4e-5; another CPU measured 1.9e-6 off)"),
    "f64_layer": _f64(1e-6, "baseline layers in float64: README 1e-6 (float64 rounding is ~1e-15)"),
    "f64_forward": _f64(1e-9, "BiMaCo layer forward and gradients in float64: README 1e-9"),
    "f64_array": _f64(1e-12, "float64 schedule arrays and Real-ESRGAN kernels: the same formulas in float64"),
}


def noise_floor(meta: dict | None, key: str) -> float:
    """The float32 noise floor a fixture's ``meta`` states for output ``key``: the longest
    ``f64_maxdiff_<p>`` with ``key`` starting with ``p`` (``recon`` covers ``recon_noquant``), else
    ``float64_rerun_max_abs_diff`` (denoiser files, one output), else 0."""
    meta = meta or {}
    prefixes = [k[len("f64_maxdiff_"):] for k in meta if k.startswith("f64_maxdiff_")]
    matches = [p for p in prefixes if key.startswith(p)]
    if matches:
        return float(meta[f"f64_maxdiff_{max(matches, key=len)}"])
    return float(meta.get("float64_rerun_max_abs_diff", 0.0))
