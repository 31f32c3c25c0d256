"""The packed deploy file format: one ``.safetensors`` file, read and written without any model.

Tensors by name plus string metadata: ``format`` (``bimacosr-deploy``), ``version``, ``checksum``
(sha256 over the name, dtype, shape and bytes of every tensor) and whatever the writer adds
(:mod:`bimacosr.deploy.convert` adds ``params``, ``layers``, ``side_dtype``; docs/formats.md
lists every tensor). Anything wrong with a file is a :class:`DeployFileError` naming it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from bimacosr.atomic import atomic_write

__all__ = ["DeployFileError", "FORMAT", "VERSION", "checksum", "read_deploy_file", "write_deploy_file"]

PathLike = Union[str, os.PathLike]  # noqa: UP007
FORMAT = "bimacosr-deploy"
VERSION = 1


class DeployFileError(Exception):
    """A deploy file that cannot be used; the message names the file and the problem."""


def checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over name, dtype, shape and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_deploy_file(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: PathLike) -> Path:
    """Write ``tensors`` with ``metadata`` plus format, version and checksum, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"deploy files are .safetensors; got {path}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**metadata, "format": FORMAT, "version": str(VERSION), "checksum": checksum(tensors)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except Exception as err:
        raise DeployFileError(f"could not write {path} ({type(err).__name__}: {err})") from err
    return path


def read_deploy_file(path: PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a deploy file, checked for format, version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise DeployFileError(f"deploy file not found: {path} (write one with scripts/export_deploy.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # not safetensors, truncated, bad header
        reason = str(err).split("\n")[0][:160]
        raise DeployFileError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                              f"{reason}); it is corrupt, truncated or not a deploy file") from None
    if metadata.get("format") != FORMAT:
        raise DeployFileError(f"{path} is not a BiMaCoSR deploy file (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r}); a checkpoint is "
                              f"converted with scripts/export_deploy.py")
    if metadata.get("version") != str(VERSION):
        raise DeployFileError(f"{path} has deploy format version {metadata.get('version')!r}; this "
                              f"code reads version {VERSION} -- export it again with this code")
    if metadata.get("checksum") != checksum(tensors):
        raise DeployFileError(f"{path}: checksum mismatch, the tensor data is corrupt")
    return metadata, tensors
