"""Load the original YAML configs as they are (OmegaConf) and check the parts a job needs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


def load_config(path: str | Path) -> DictConfig:
    """Read a YAML config (original schema: ``model``, ``model_teacher``, ``diffusion``,
    ``autoencoder``, ``degradation``, ``data``, ``train``, ``quantparameter``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the released one is configs/BiMaCoSR.yaml)")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError) as exc:  # YAML errors subclass ValueError
        raise ConfigError(f"cannot parse config {path}: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a YAML mapping at the top level")
    return cfg


def require(cfg: DictConfig, *keys: str, source: str = "config") -> None:
    """Raise ``ConfigError`` unless every dotted key exists and is not null."""
    missing = [k for k in keys if OmegaConf.select(cfg, k) is None]
    if missing:
        raise ConfigError(f"{source} is missing required key(s) {missing}; compare with configs/BiMaCoSR.yaml")


def to_plain(node: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (for constructors)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
