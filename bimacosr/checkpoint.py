"""Reading, writing and loading model weight files, safely and loudly.

* ``read_state_dict`` reads ``.safetensors`` with the safetensors library and everything else
  (``.pth``/``.pt``/``.ckpt``) with ``torch.load(weights_only=True)`` -- a file that needs arbitrary
  unpickling is refused, never executed (docs/denoiser.md §3, docs/pipeline.md §2.6, §5.5).
* ``unwrap_state_dict`` accepts the layouts found in the wild: flat state_dicts (the EMA files),
  the trainer's ``{'iters_start', 'log_step', 'log_step_img', 'state_dict'}``, and
  ``model``/``params_ema``/``params``/``ema``/``module`` wrappers; ``module.`` (DDP) and
  ``_orig_mod.`` (torch.compile) prefixes are stripped from every key.
* ``save_state_dict`` writes atomically (temp file in the same folder, fsync, ``os.replace``).
* ``load_state_dict_into`` loads strictly by default and explains a mismatch, using
  ``describe_state_dict`` to say what the file is instead (BiMaCo UNet, FP UNet, VQ autoencoder).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file as _safetensors_load
from safetensors.torch import save_file as _safetensors_save
from torch import Tensor, nn

from bimacosr.atomic import atomic_write

__all__ = ["CheckpointError", "LoadReport", "KIND_LABELS", "read_state_dict", "unwrap_state_dict",
           "save_state_dict", "describe_state_dict", "state_dict_kind", "load_state_dict_into"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
WRAPPER_KEYS = ("state_dict", "model", "params_ema", "params", "ema", "module")
KEY_PREFIXES = ("module.", "_orig_mod.")
LIST_LIMIT = 10

_LABELS = {
    "bimaco": "BiMaCo (binarized) UNet",
    "fp_unet": "FP Swin-UNet (SinSR/ResShift)",
    "autoencoder": "VQ-f4 autoencoder",
    "unknown": "unknown",
}
_FP_INTO_BIMACO = ("this looks like an FP SinSR/ResShift checkpoint; the config asks for BiMaCo "
                   "layers -- load it as the student init (quantparameter.train.pretained_model) "
                   "instead, or use an FP config")
_BIMACO_INTO_FP = ("this is a BiMaCo (binarized) checkpoint; use a config with the quant keys "
                   "(e.g. configs/BiMaCoSR.yaml)")


class CheckpointError(Exception):
    """A weight file cannot be read, written or loaded; the message names the file and the fix."""


@dataclass
class LoadReport:
    """What a load did not match; ``mismatched`` holds (key, file shape, model shape)."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and the file had nothing else."""
        return not (self.missing or self.unexpected or self.mismatched)

    def details(self) -> str:
        """Counts and the first few keys of each kind of mismatch, one section per line."""
        lines = []
        for title, keys in (("missing from the file", self.missing),
                            ("unexpected in the file", self.unexpected)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {_head(keys)}")
        if self.mismatched:
            shapes = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatch ({len(shapes)}): {_head(shapes)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"loaded {self.loaded} tensors from {self.source}"
        return head if self.ok else f"{head}; not loaded:\n{self.details()}"


def _head(items: list[str]) -> str:
    more = f", ... (+{len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
    return ", ".join(items[:LIST_LIMIT]) + more


def _strip_key(key: str) -> str:
    while key.startswith(KEY_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Return the flat ``{name: tensor}`` weights inside a loaded checkpoint object.

    A mapping with tensor values is the state_dict itself (non-tensor entries are dropped);
    otherwise the first of ``WRAPPER_KEYS`` holding a mapping is unwrapped, recursively.
    ``module.``/``_orig_mod.`` prefixes are stripped from each key (repeatedly, in any order).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, found a {type(obj).__name__}")
    if not any(isinstance(v, Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key])
        raise CheckpointError(f"no tensors found; top-level keys: {_head([str(k) for k in obj])} "
                              f"(weights are looked for under {', '.join(WRAPPER_KEYS)})")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        name = _strip_key(str(key))
        if name in out:
            raise CheckpointError(f"two entries become '{name}' after removing "
                                  f"{'/'.join(KEY_PREFIXES)} prefixes (one is '{key}')")
        out[name] = value
    return out


def read_state_dict(path: PathLike, *, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a weight file onto the CPU and return its unwrapped state_dict (see above)."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"{what} {state}: {path}\n  Download the released weights with "
                              f"`python scripts/download_weights.py`, or put the file at that "
                              f"path (or point the config / command line at where it is).")
    try:
        if path.suffix == ".safetensors":
            obj: Any = _safetensors_load(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            needs = f" (it needs `{found.group(1)}`)" if found else ""
            raise CheckpointError(
                f"{what} {path} contains pickled Python code/objects{needs}; it is not loaded "
                f"for safety, because unpickling can run arbitrary code.\n  To convert it, load "
                f"it yourself in a trusted session with torch.load(path, weights_only=False), "
                f"take the weights (e.g. obj['state_dict'] or model.state_dict()) and re-save "
                f"that state_dict with torch.save(sd, 'new.pth') or as .safetensors "
                f"(safetensors.torch.save_file); then use the new file.") from None
        raise _corrupt(what, path, err) from None
    except Exception as err:  # truncated zip, EOF, bad header: all mean "not a readable file"
        raise _corrupt(what, path, err) from None
    try:
        return unwrap_state_dict(obj)
    except CheckpointError as err:
        raise CheckpointError(f"{what} {path}: {err}") from None


def _corrupt(what: str, path: Path, err: Exception) -> CheckpointError:
    reason = str(err).split("\n")[0].split(". ")[0][:160] or "-"
    return CheckpointError(f"{what} {path} is corrupt, truncated or not a weight file "
                           f"({type(err).__name__}: {reason}).\n  Download or copy it again "
                           f"(compare its size/checksum with the original).")


def _safetensors_ready(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no storage (what safetensors requires)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f".safetensors holds only str -> tensor entries; "
                                  f"'{key}' is a {type(value).__name__}")
        tensor = value.detach().cpu()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[key] = tensor
    return out


def save_state_dict(state_dict: Mapping[str, Any], path: PathLike) -> None:
    """Write ``state_dict`` atomically: ``.safetensors`` by extension, else ``torch.save``.

    For torch files the mapping may also hold plain values loadable with ``weights_only=True``
    (e.g. the trainer's ``{'iters_start', ..., 'state_dict'}``). Parent folders are created. The
    data goes to a temp file in the target folder, is fsynced and then renamed over ``path``, so a
    failed write leaves any previous file intact and no temp file behind.
    """
    path = Path(path)
    safetensors = path.suffix == ".safetensors"
    payload = _safetensors_ready(state_dict) if safetensors else dict(state_dict)
    def write(tmp: Path) -> None:
        if safetensors:
            _safetensors_save(payload, str(tmp))
        else:
            torch.save(payload, tmp)
    try:
        atomic_write(path, write)
    except Exception as err:
        raise CheckpointError(f"could not write {path} ({type(err).__name__}: {err}); any "
                              f"previous file there is unchanged. Check free disk space and "
                              f"write permission.") from err


def _kind(keys: Any) -> str:
    names = {_strip_key(str(k)) for k in keys}
    if any(k.endswith(("skip_connection.indices_float", "lora.A.weight")) for k in names):
        return "bimaco"
    if {"input_blocks.0.0.weight", "time_embed.0.weight"} <= names:
        return "fp_unet"
    if {"encoder.conv_in.weight", "quantize.embedding.weight"} <= names:
        return "autoencoder"
    return "unknown"


KIND_LABELS = _LABELS
"""What :func:`state_dict_kind` returns -> the name people read."""


def state_dict_kind(state_dict: Mapping[str, Any]) -> str:
    """Classify a state_dict by its key names: ``'bimaco'``, ``'fp_unet'``, ``'autoencoder'`` or
    ``'unknown'`` (:data:`KIND_LABELS` names them)."""
    return _kind(state_dict)


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """Classify a state_dict by its key names: BiMaCo UNet, FP Swin-UNet, VQ-f4 autoencoder or
    ``'unknown'``."""
    return _LABELS[_kind(state_dict)]


def _hint(model_kind: str, file_kind: str) -> str | None:
    if (model_kind, file_kind) == ("bimaco", "fp_unet"):
        return _FP_INTO_BIMACO
    if (model_kind, file_kind) == ("fp_unet", "bimaco"):
        return _BIMACO_INTO_FP
    unets = ("bimaco", "fp_unet")
    if file_kind == "autoencoder" and model_kind in unets:
        return ("this is a VQ-f4 autoencoder checkpoint; it belongs in the config entry "
                "`autoencoder.ckpt_path`, not `--ckpt` / `model.ckpt_path`")
    if model_kind == "autoencoder" and file_kind in unets:
        return (f"this is a {_LABELS[file_kind]} checkpoint; it belongs in `--ckpt` / "
                f"`model.ckpt_path`, not the config entry `autoencoder.ckpt_path`")
    if model_kind == file_kind != "unknown":
        return ("file and model are the same kind of network with different layer sets/sizes: "
                "the model's architecture settings (model.params, quantparameter) differ from "
                "those the file was trained with")
    return None


def _bare_module(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DDP and torch.compile wrappers (their keys are prefixed)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def load_state_dict_into(model: nn.Module, source: PathLike | Mapping[str, Any], *,
                         strict: bool = True, what: str = "checkpoint",
                         path: PathLike | None = None) -> LoadReport:
    """Load weights from a file path or a (possibly wrapped) dict into ``model``, in place.

    Values are cast to the model's dtypes as ``nn.Module.load_state_dict`` does. With
    ``strict=True`` any missing, unexpected or shape-mismatched key raises a ``CheckpointError``
    that lists them and says what the file is instead. With ``strict=False`` the matching keys
    are loaded and the rest is logged as a warning. Returns the ``LoadReport`` either way.
    ``path`` names the file a ``source`` mapping was read from, for the messages. A model built
    on the meta device (``models.denoiser_skeleton``) gets the file's tensors assigned, cast to
    its dtypes; it must then have no meta tensor left.
    """
    if isinstance(source, Mapping):
        name = f"{what} {path}" if path is not None else f"in-memory {what}"
        try:
            loaded = unwrap_state_dict(source)
        except CheckpointError as err:
            raise CheckpointError(f"{name}: {err}") from None
    else:
        name = f"{what} {Path(source)}"
        loaded = read_state_dict(source, what=what)
    target = _bare_module(model)
    expected = target.state_dict()
    report = LoadReport(source=name, loaded=0,
                        missing=[k for k in expected if k not in loaded],
                        unexpected=[k for k in loaded if k not in expected])
    matching = {}
    for key, value in loaded.items():
        if key in expected:
            if value.shape == expected[key].shape:
                matching[key] = value
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(expected[key].shape)))
    report.loaded = len(matching)
    if strict and not report.ok:
        model_kind, file_kind = _kind(expected), _kind(loaded)
        lines = [f"{name} does not match the model (strict load):", report.details()]
        if {model_kind, file_kind} != {"unknown"}:
            lines.insert(1, f"  the file looks like: {_LABELS[file_kind]} ({len(loaded)} "
                            f"tensors); the model is: {_LABELS[model_kind]} ({len(expected)})")
        if file_kind == "unknown":
            lines.append(f"  first keys in the file: {_head(list(loaded))}")
        hint = _hint(model_kind, file_kind)
        if hint:
            lines.append(f"  hint: {hint}")
        lines.append("  (strict=False loads only the matching keys and returns a report)")
        raise CheckpointError("\n".join(lines))
    on_meta = any(t.is_meta for t in expected.values())
    if on_meta:
        matching = {k: v.to(expected[k].dtype) for k, v in matching.items()}
    target.load_state_dict(matching, strict=False, assign=on_meta)
    if on_meta and any(t.is_meta for t in target.state_dict().values()):
        raise CheckpointError(f"{name} leaves tensors of a meta-device model unset; load it strictly")
    if not report.ok:
        log.warning("%s", report)
    return report
