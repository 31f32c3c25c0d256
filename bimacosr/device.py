"""A ``--device`` value checked before any work: a device name this machine can compute on, and
the one default when none is given.

Imports nothing of the package, so every entry point (inference, demo, metrics) can use it.
"""
from __future__ import annotations

import os

import torch

__all__ = ["pick_device", "usable_device"]


def usable_device(name: str) -> torch.device:
    """``torch.device(name)`` after an empty tensor was made on it, or ``ValueError`` (one line)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch.cuda.is_available() "
                         f"is false); use --device cpu, or leave --device out")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        reason = str(exc).split(". ")[0].splitlines()[0]
        raise ValueError(f"--device {name} cannot be used here ({reason}); use --device cpu") from None
    return device


def pick_device(name: str | None = None) -> torch.device:
    """``name`` or, by default, this process's CUDA device (``LOCAL_RANK``) when there is one.

    A name that is no device, or a device this machine cannot use (``cuda`` without CUDA, ``cuda:3``
    with two GPUs), raises ``ValueError`` naming ``--device`` -- before anything is built."""
    if name:
        return usable_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")
