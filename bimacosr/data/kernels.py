"""Blur kernels of the Real-ESRGAN degradation (numpy, float64), as BasicSR's ``degradations.py``.

Kernels live on a ``k x k`` grid (``k`` odd) with coordinates ``-(k-1)/2 ... (k-1)/2``; with
``Sigma = R diag(sx^2, sy^2) R^T`` (R = rotation by ``theta``; ``sx^2 I`` when isotropic) and
``q = g^T Sigma^-1 g``:

* Gaussian ``exp(-q / 2)``, generalized Gaussian ``exp(-q^beta / 2)``, plateau ``1 / (q^beta + 1)``;
* sinc (circular low-pass) ``c J1(c r) / (2 pi r)`` with centre ``c^2 / (4 pi)``;

all normalised to sum 1. Random draws use explicit generators (``numpy.random.Generator`` for
values, ``random.Random`` for choices, the split BasicSR makes between ``np.random`` and ``random``),
never the global ones.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

# Fixture / short names -> the config's kernel type names.
KERNEL_ALIASES = {"gen_iso": "generalized_iso", "gen_aniso": "generalized_aniso"}
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def mesh_grid(size: int) -> np.ndarray:
    """[size, size, 2] grid of (x, y) coordinates centred on the middle pixel."""
    ax = np.arange(-size // 2 + 1.0, size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.hstack((xx.reshape((size * size, 1)), yy.reshape(size * size, 1))).reshape(size, size, 2)


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float, isotropic: bool) -> np.ndarray:
    """2x2 covariance: ``sigma_x^2 I`` if isotropic, else ``R diag(sx^2, sy^2) R^T``."""
    if isotropic:
        return np.array([[sigma_x**2, 0], [0, sigma_x**2]])
    d = np.array([[sigma_x**2, 0], [0, sigma_y**2]])
    u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.dot(u, np.dot(d, u.T))


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float, isotropic: bool) -> np.ndarray:
    """[size, size] values of ``g^T Sigma^-1 g`` on the grid."""
    grid = mesh_grid(size)
    inverse = np.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta, isotropic))
    return np.sum(np.dot(grid, inverse) * grid, 2)


def bivariate_gaussian(size: int, sigma_x: float, sigma_y: float, theta: float,
                       isotropic: bool = True) -> np.ndarray:
    """[size, size] Gaussian kernel, sum 1."""
    kernel = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta, isotropic))
    return kernel / np.sum(kernel)


def bivariate_generalized_gaussian(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float,
                                   isotropic: bool = True) -> np.ndarray:
    """[size, size] generalized Gaussian kernel ``exp(-q^beta / 2)``, sum 1."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta, isotropic)
    kernel = np.exp(-0.5 * np.power(q, beta))
    return kernel / np.sum(kernel)


def bivariate_plateau(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float,
                      isotropic: bool = True) -> np.ndarray:
    """[size, size] plateau kernel ``1 / (q^beta + 1)``, sum 1."""
    q = _quadratic_form(size, sigma_x, sigma_y, theta, isotropic)
    kernel = np.reciprocal(np.power(q, beta) + 1)
    return kernel / np.sum(kernel)


def circular_lowpass_kernel(cutoff: float, size: int, pad_to: int = 0) -> np.ndarray:
    """[size, size] sinc kernel with cutoff frequency ``cutoff`` (radians), sum 1, zero-padded to
    [pad_to, pad_to] when ``pad_to > size``."""
    if size % 2 != 1:
        raise ValueError(f"sinc kernel size must be odd, got {size}")
    c = (size - 1) / 2

    def sinc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = np.sqrt((x - c) ** 2 + (y - c) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):  # the centre (0/0) is set below
            return cutoff * special.j1(cutoff * r) / (2 * np.pi * r)

    kernel = np.fromfunction(sinc, [size, size])
    kernel[(size - 1) // 2, (size - 1) // 2] = cutoff**2 / (4 * np.pi)
    kernel = kernel / np.sum(kernel)
    return pad_kernel(kernel, pad_to) if pad_to > size else kernel


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a [k, k] kernel (k odd) to [size, size] around its centre."""
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def kernel_from_params(kind: str, size: int, sigma_x: float, sigma_y: float, theta: float,
                       beta: float | None = None) -> np.ndarray:
    """[size, size] kernel of a type in ``KERNEL_TYPES`` (or 'gen_iso'/'gen_aniso') with fixed
    parameters; isotropic types use ``sigma_x`` only and ignore ``theta``."""
    kind = KERNEL_ALIASES.get(kind, kind)
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    isotropic = not kind.endswith("aniso")
    if kind in ("iso", "aniso"):
        return bivariate_gaussian(size, sigma_x, sigma_y, theta, isotropic)
    if beta is None:
        raise ValueError(f"kernel type {kind!r} needs beta")
    if kind.startswith("generalized"):
        return bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta, isotropic)
    return bivariate_plateau(size, sigma_x, sigma_y, theta, beta, isotropic)


def random_mixed_kernel(kernel_list: Sequence[str], kernel_prob: Sequence[float], size: int,
                        sigma_range: Sequence[float], betag_range: Sequence[float],
                        betap_range: Sequence[float], *, np_rng: np.random.Generator,
                        rng: random.Random) -> np.ndarray:
    """[size, size] kernel of a random type (``rng.choices`` with ``kernel_prob``): sigma_x, sigma_y ~
    U(sigma_range), theta ~ U(-pi, pi) (anisotropic types only), beta ~ U(beta_lo, 1) or U(1, beta_hi)
    with probability 1/2 each (generalized: ``betag_range``, plateau: ``betap_range``)."""
    kind = rng.choices(list(kernel_list), list(kernel_prob))[0]
    kind = KERNEL_ALIASES.get(kind, kind)
    isotropic = not kind.endswith("aniso")
    sigma_x = np_rng.uniform(sigma_range[0], sigma_range[1])
    sigma_y, theta = (sigma_x, 0.0) if isotropic else (np_rng.uniform(sigma_range[0], sigma_range[1]),
                                                        np_rng.uniform(-math.pi, math.pi))
    beta = None
    if kind not in ("iso", "aniso"):
        lo, hi = betag_range if kind.startswith("generalized") else betap_range
        beta = np_rng.uniform(lo, 1) if np_rng.uniform() < 0.5 else np_rng.uniform(1, hi)
    return kernel_from_params(kind, size, sigma_x, sigma_y, theta, beta)


@dataclass(frozen=True)
class BlurKernelOptions:
    """One order's blur kernel: size from {3, 5, ..., pad_size - 2}; with ``sinc_prob`` a sinc kernel
    (cutoff ~ U(pi/3, pi) for sizes < 13, else U(pi/5, pi)), otherwise a random mixed kernel; then
    zero-padded to [pad_size, pad_size]. Defaults: the released config's first order."""

    pad_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        if self.pad_size % 2 != 1 or self.pad_size < 5:
            raise ValueError(f"blur kernel size must be odd and >= 5, got {self.pad_size}")
        if len(self.kernel_list) != len(self.kernel_prob):
            raise ValueError(f"kernel_list {self.kernel_list} and kernel_prob {self.kernel_prob} differ in length")
        unknown = [k for k in self.kernel_list if KERNEL_ALIASES.get(k, k) not in KERNEL_TYPES]
        if unknown:
            raise ValueError(f"unknown kernel type(s) {unknown}; expected some of {KERNEL_TYPES}")

    def sample(self, np_rng: np.random.Generator, rng: random.Random) -> np.ndarray:
        """A random [pad_size, pad_size] float64 kernel, sum 1."""
        size = rng.choice(range(3, self.pad_size, 2))
        if np_rng.uniform() < self.sinc_prob:
            cutoff = np_rng.uniform(np.pi / 3, np.pi) if size < 13 else np_rng.uniform(np.pi / 5, np.pi)
            kernel = circular_lowpass_kernel(cutoff, size)
        else:
            kernel = random_mixed_kernel(self.kernel_list, self.kernel_prob, size, self.blur_sigma,
                                         self.betag_range, self.betap_range, np_rng=np_rng, rng=rng)
        return pad_kernel(kernel, self.pad_size)


def sample_final_sinc(prob: float, size: int, np_rng: np.random.Generator, rng: random.Random) -> np.ndarray:
    """[size, size] final-stage kernel: with ``prob`` a sinc of size from {3, ..., size - 2} and cutoff
    ~ U(pi/3, pi) zero-padded to ``size``; otherwise a delta (no blur)."""
    if np_rng.uniform() < prob:
        kernel_size = rng.choice(range(3, size, 2))
        return circular_lowpass_kernel(np_rng.uniform(np.pi / 3, np.pi), kernel_size, pad_to=size)
    pulse = np.zeros((size, size))
    pulse[size // 2, size // 2] = 1.0
    return pulse
