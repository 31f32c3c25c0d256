"""Configs: the original YAML files as they are, one table of defaults, validation, base + overrides.

``load_config(path)`` reads a YAML file in the original schema (``model``, ``model_teacher``,
``diffusion``, ``autoencoder``, ``degradation``, ``data``, ``train``, ``quantparameter``), merges it
over its ``_base_`` file when it names one (``configs/smoke.yaml`` is ``BiMaCoSR.yaml`` plus a few
differences), checks every key against :data:`DEFAULTS` -- an unknown or mistyped key is an error
that names the nearest valid key -- and fills the defaults in. Every default a job reads comes from
that one table; nothing else in the package calls ``cfg.get(key, default)``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigError", "DEFAULTS", "OPEN", "load_config", "require", "to_plain", "REPO_ROOT",
           "DEFAULT_CONFIG", "resolve_config_path", "PATH_RULE"]

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository root: where ``configs/``, ``weights/`` and ``examples/`` live."""
DEFAULT_CONFIG = REPO_ROOT / "configs" / "BiMaCoSR.yaml"
BASE_KEY = "_base_"
PATH_RULE = f"relative paths are tried from the working folder, then from the repository {REPO_ROOT}"
"""The one rule for relative paths in configs, in words (error messages quote it)."""


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


class _Open:
    """Marks a section whose keys are checked by the code that consumes it (constructors)."""

    def __repr__(self) -> str:
        return "OPEN"


OPEN = _Open()

DEFAULTS: dict[str, Any] = {
    "model": {
        "target": None,               # the original's import path; informative only here
        "ckpt_path": None,            # unused by the original's inference (it takes --ckpt)
        "teacher_ckpt_path": None,    # training: the FP ResShift teacher
        "params": OPEN,               # Swin-UNet + binarization keys (models.denoiser.split_params)
    },
    "model_teacher": {"target": None, "params": OPEN},
    "diffusion": {"target": None, "params": OPEN},  # diffusion.schedule.Schedule.from_config
    "autoencoder": {
        "target": None,
        "ckpt_path": None,
        "use_fp16": True,             # fp16 autoencoder on CUDA, as the original
        "params": OPEN,               # models.autoencoder.VQAutoencoder
    },
    "degradation": OPEN,              # data.degradation (second-order Real-ESRGAN)
    "data": {"train": OPEN, "val": OPEN},  # data.datasets.build_train_dataset / build_val_dataset
    "train": {
        "lr": 2.0e-5,
        "batch": [8, 8],              # [global batch, original's per-GPU batch]: the first is used
        "microbatch": None,           # None: the whole per-process batch at once
        "use_fp16": False,            # the original's flag; same as amp: fp16
        "amp": "none",                # none | bf16 | fp16
        "num_workers": 0,
        "prefetch_factor": 2,
        "ema_rate": 0.999,
        "iterations": 200000,
        "milestones": [2000, 10000],  # lr warm-up end, then halving period
        "weight_decay": 0.0,
        "save_freq": 40000,
        "val_freq": 0,                # 0: no validation
        "log_freq": [10, 50, 10000],  # [train log, (unused), (unused)]
        "save_images": False,         # original's keys, accepted and unused
        "use_ema_val": False,
        "global_seeding": False,
        "seed": 123456,
        "queue_size": None,           # pair pool; None: 10 x per-process batch, 0: off
        "keep_last": 3,               # checkpoints kept
        "grad_clip": None,            # max gradient norm; None: no clipping
    },
    "quantparameter": {
        "inference": {"if_quant": True, "quant_before_load": True},
        "train": {"if_quant": True, "quant_before_load": False, "pretained_model": None},
    },
}
"""Every key of the schema with its default. ``None``: no default (optional or checked where
used); ``OPEN``: free-form, checked by the consumer."""


def _yaml_error(path: Path, exc: Exception) -> ConfigError:
    """One line: file, line, column and the parser's complaint."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"cannot parse config {path}{where}: {problem} (fix the YAML there)")


def _read(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over its ``_base_`` (relative to the file), recursively."""
    if not path.is_file():
        hint = f"the released one is {DEFAULT_CONFIG}"
        raise ConfigError(f"config file not found: {path.absolute()} ({hint})")
    if path.resolve() in chain:
        raise ConfigError(f"config {path}: {BASE_KEY} chain loops back to itself")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a YAML mapping at the top level")
    if not cfg:
        raise ConfigError(f"config {path.absolute()} is empty; copy {DEFAULT_CONFIG} or write "
                          f"'{BASE_KEY}: <a config>' and the keys you change")
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    parent = _read((path.parent / str(base)), chain + (path.resolve(),))
    return OmegaConf.merge(parent, cfg)


def _check(node: Any, table: Any, where: str, source: Path) -> None:
    """Unknown keys (with the nearest valid one) and values of the wrong type are errors."""
    if table is OPEN or not isinstance(table, dict) or not OmegaConf.is_dict(node):
        return
    for key in node:
        key = str(key)
        name = f"{where}.{key}" if where else key
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
            hint = f"did you mean {(where + '.') if where else ''}{close[0]}?" if close else \
                f"valid keys here: {', '.join(table)}"
            raise ConfigError(f"config {source}: unknown key {name!r}; {hint}")
        value, default = node[key], table[key]
        if isinstance(default, dict):
            if value is not None and not OmegaConf.is_dict(value):
                raise ConfigError(f"config {source}: {name} must be a mapping, got {value!r}")
            _check(value, default, name, source)
        elif default is not None and default is not OPEN and value is not None:
            _check_type(value, default, name, source)


def _check_type(value: Any, default: Any, name: str, source: Path) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = OmegaConf.is_list(value) or isinstance(value, (int, float))  # "batch: 8" is fine
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config {source}: {name} = {value!r} should be a {type(default).__name__} "
                          f"like the default {default!r}")


def _fill(table: dict[str, Any]) -> dict[str, Any]:
    """The defaults as a plain nested dict (OPEN sections as ``None``: present, to be given)."""
    return {key: _fill(value) if isinstance(value, dict) else (None if value is OPEN else value)
            for key, value in table.items()}


def load_config(path: str | Path) -> DictConfig:
    """Read, merge over ``_base_``, validate and complete a YAML config (see module docstring);
    a relative ``path`` follows :func:`resolve_config_path`.

    Raises ``ConfigError`` (one line naming the file, the key or YAML line, and the fix).
    """
    path = resolve_config_path(path)
    cfg = _read(path)
    _check(cfg, DEFAULTS, "", path)
    return OmegaConf.merge(OmegaConf.create(_fill(DEFAULTS)), cfg)


def require(cfg: DictConfig, *keys: str, source: str = "config") -> None:
    """Raise ``ConfigError`` unless every dotted key exists and is not null."""
    missing = [k for k in keys if OmegaConf.select(cfg, k) is None]
    if missing:
        raise ConfigError(f"{source} is missing required key(s) {missing}; compare with "
                          f"configs/BiMaCoSR.yaml")


def to_plain(node: Any) -> Any:
    """An OmegaConf node (or nested mappings / tuples) as plain dicts and lists."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {str(k): to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The one rule for a relative path in a config (weights, data folders, file lists), the same
    for training, inference and the scripts: relative to the working folder when it exists there,
    else relative to the repository root when it exists there (``configs/*.yaml`` name
    ``weights/...`` and ``data/...`` of this repository, so any working folder works), else the path
    as given, for the caller to report missing (quoting :data:`PATH_RULE`). Absolute paths are
    returned as they are. (A config's ``_base_`` is relative to the config file itself.)"""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path
