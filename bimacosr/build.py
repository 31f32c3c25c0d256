"""The one place that turns a loaded config (plus device and precision) into parts.

Denoisers (FP teacher, BiMaCo student, inference denoiser from a checkpoint or a deploy file), the
VQ-f4 autoencoder, the ResShift schedule and the SR pipeline. Inference, the trainer, the smoke
assets, deploy export and every script get their parts here; nothing else calls a constructor
with config values. Files are resolved before anything is built (:func:`inference_files`), so a
wrong path fails in milliseconds, and a checkpoint is loaded into a meta-device skeleton (no
SVD/top-k init of weights that the file overwrites).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from bimacosr.checkpoint import load_state_dict_into, read_state_dict
from bimacosr.config import REPO_ROOT, ConfigError, load_config, require, to_plain
from bimacosr.cpu import native_bf16
from bimacosr.deploy import deploy_params, load_deploy
from bimacosr.diffusion import Schedule
from bimacosr.models import build_denoiser, denoiser_skeleton, is_binarized, split_params
from bimacosr.models.autoencoder import VQAutoencoder
from bimacosr.pipeline import SRPipeline
from bimacosr.quant import binarize
from bimacosr.weights import MissingWeightsError, resolve_weight, resolve_weights

__all__ = ["INFERENCE_KEYS", "Precision", "PRECISIONS", "InferenceFiles", "build_autoencoder",
           "build_denoiser_from_config", "build_inference_denoiser", "build_pipeline", "build_schedule",
           "build_student", "build_teacher", "deployable_denoiser", "freeze",
           "inference_files", "native_bf16", "resolve_precision", "emulated_bf16_note"]

PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16", "fp16")
INFERENCE_KEYS = ("model.params", "diffusion.params", "autoencoder.params", "autoencoder.ckpt_path")
"""The config keys an inference run reads."""


@dataclass(frozen=True)
class Precision:
    """How the pipeline runs: ``name`` (fp32 / fp32-fast / bf16 / fp16), the autoencoder's weight
    dtype, the autocast dtype of the floating-point work (None: plain fp32), the autoencoder's
    memory format (channels-last under bf16 on CPU: oneDNN's convolutions run it 5-10 % faster
    there, and bf16 is approximate anyway; fp32 stays contiguous, which the fixtures match bit for
    bit) and ``fast_float32`` (``fp32-fast``: float32 in faster forms of the same maths,
    :func:`bimacosr.models.layers.fast_float32`). The binary branch of the deploy layers is exact
    integer arithmetic whatever the precision."""

    name: str
    autoencoder_dtype: torch.dtype
    autocast: torch.dtype | None
    autoencoder_format: torch.memory_format = torch.contiguous_format
    fast_float32: bool = False


def resolve_precision(name: str, device: torch.device, cfg: DictConfig | None = None) -> Precision:
    """``auto``: on CUDA what the original does (fp16 autoencoder when ``autoencoder.use_fp16``,
    the default; denoiser fp32); on CPU bf16 autocast where the CPU has native bf16
    (:func:`native_bf16`), else ``fp32-fast``. ``fp32`` is the original's float32 operations;
    ``fp32-fast`` float32 with the autoencoder's 3x3 convolutions as Winograd transforms and its
    swish in one pass (within ~1e-5 relative of ``fp32``, docs/deviations.md D16). ``fp16`` needs
    CUDA (the original's half autoencoder); ``bf16`` is autocast of encoder, denoiser and decoder
    on any device."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "fp16" if cfg is None or cfg.autoencoder.use_fp16 else "fp32"
        else:
            name = ("bf16" if native_bf16() else "fp32-fast") if device.type == "cpu" else "fp32"
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device (it halves the autoencoder as the "
                             "original does on GPU); on CPU use --precision bf16 or fp32")
        return Precision("fp16", torch.float16, None)
    if name == "bf16":
        fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        return Precision("bf16", torch.float32, torch.bfloat16, fmt)
    return Precision(name, torch.float32, None, fast_float32=name == "fp32-fast")


def emulated_bf16_note(device: torch.device) -> str:
    """One line where bf16 on ``device`` is emulated (a CPU without :func:`native_bf16`), else ``""``:
    its convolutions are 2-3x slower than float32 with AVX-512 and 100x or more with AVX2 only
    (docs/speed.md §2), which an explicit bf16 choice should hear before it waits."""
    if device.type != "cpu" or native_bf16():
        return ""
    return ("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated, its convolutions 2-3x "
            "slower than float32 with AVX-512 and 100x or more with AVX2 only (docs/speed.md §2)")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter (teacher, autoencoder). Returns the model."""
    return model.eval().requires_grad_(False)


def build_schedule(cfg: DictConfig, device: torch.device | str = "cpu") -> Schedule:
    """The ResShift schedule of ``diffusion.params`` (``steps`` overridable in the config)."""
    require(cfg, "diffusion.params")
    return Schedule.from_config(to_plain(cfg.diffusion.params)).to(device)


def build_autoencoder(cfg: DictConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      *, weights: bool = True,
                      memory_format: torch.memory_format = torch.contiguous_format) -> VQAutoencoder:
    """The VQ-f4 autoencoder of ``autoencoder.params``, frozen, with ``autoencoder.ckpt_path``
    loaded strictly unless ``weights=False`` (random init, for smoke assets and benchmarks), its
    convolution weights in ``memory_format`` (see :class:`Precision`)."""
    require(cfg, "autoencoder.params")
    vq = VQAutoencoder(**to_plain(cfg.autoencoder.params))
    if weights:
        require(cfg, "autoencoder.ckpt_path")
        path = resolve_weight(cfg.autoencoder.ckpt_path, what="autoencoder (autoencoder.ckpt_path)")
        load_state_dict_into(vq, path, what="autoencoder checkpoint")
    return freeze(vq.to(device, dtype, memory_format=memory_format))


def build_denoiser_from_config(cfg: DictConfig, role: str = "student", *, meta: bool = False) -> nn.Module:
    """A denoiser with random (or, ``meta=True``, no) weights for ``role``: ``teacher``
    (``model_teacher.params``), ``fp`` (``model.params`` without the binarization keys: SinSR's
    structure) or ``student`` (``model.params``: binarized when it has the binarization keys and
    ``quantparameter.inference.if_quant`` is true)."""
    if role == "teacher":
        require(cfg, "model_teacher.params")
        params = to_plain(cfg.model_teacher.params)
    elif role in ("fp", "student"):
        require(cfg, "model.params")
        params = to_plain(cfg.model.params)
        if role == "fp" or not cfg.quantparameter.inference.if_quant:
            params = split_params(params)[0]
    else:
        raise ValueError(f"unknown denoiser role {role!r}; use 'teacher', 'fp' or 'student'")
    return denoiser_skeleton(params) if meta else build_denoiser(params)


def build_teacher(cfg: DictConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen FP ResShift teacher with ``model.teacher_ckpt_path`` loaded strictly."""
    require(cfg, "model.teacher_ckpt_path")
    path = resolve_weight(cfg.model.teacher_ckpt_path, what="teacher (model.teacher_ckpt_path)")
    state = read_state_dict(path, what="teacher checkpoint")
    teacher = build_denoiser_from_config(cfg, "teacher", meta=True)
    load_state_dict_into(teacher, state, what="teacher checkpoint", path=path)
    return freeze(teacher.to(device))


def build_student(cfg: DictConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The trainable student as the original's trainer makes it: the FP network, the SinSR weights
    (``quantparameter.train.pretained_model``) loaded, then binarized so the sparse / low-rank
    branches are initialised from them (``quant_before_load: true`` binarizes first, loading a
    BiMaCo checkpoint instead). ``if_quant: false`` trains the FP network."""
    qtrain = cfg.quantparameter.train
    fp_params, quant = split_params(to_plain(cfg.model.params))
    student = build_denoiser(fp_params)
    if qtrain.if_quant and qtrain.quant_before_load:
        binarize(student, quant)
    if qtrain.pretained_model:
        path = resolve_weight(qtrain.pretained_model, what="student init (quantparameter.train.pretained_model)")
        load_state_dict_into(student, path, what="student init checkpoint")
    if qtrain.if_quant and not qtrain.quant_before_load:
        binarize(student, quant)
    return student.to(device).train()


@dataclass(frozen=True)
class InferenceFiles:
    """Every file an inference run reads, resolved to existing paths before anything is built."""

    autoencoder: Path | None
    ckpt: Path | None = None
    deploy: Path | None = None


def inference_files(cfg: DictConfig, ckpt: str | os.PathLike | None,
                    deploy: str | os.PathLike | None = None) -> InferenceFiles:
    """Resolve the denoiser file (``deploy`` when given, else ``ckpt``) and the autoencoder, or
    raise ``MissingWeightsError`` / ``ConfigError`` naming the absolute path tried -- in
    milliseconds, before any model is built."""
    require(cfg, *INFERENCE_KEYS)
    if deploy is None and ckpt is None:
        raise ConfigError("no denoiser weights: give --ckpt (a BiMaCoSR checkpoint) or --deploy")
    role, what, path = (("deploy", "deploy file (--deploy)", deploy) if deploy is not None
                        else ("ckpt", "denoiser checkpoint (--ckpt)", ckpt))
    if deploy is not None:  # a deploy file of another config: its config also names other files
        with contextlib.suppress(MissingWeightsError):
            _check_deploy_config(resolve_weight(deploy, what=what), cfg)
    autoencoder = "autoencoder (autoencoder.ckpt_path)"
    found = resolve_weights({what: path, autoencoder: cfg.autoencoder.ckpt_path})  # every missing file at once
    return InferenceFiles(found[autoencoder], **{role: found[what]})


def _check_deploy_config(path: Path, cfg: DictConfig) -> None:
    """``ConfigError`` when the deploy file was exported from other ``model.params`` than ``cfg``'s,
    naming the repository config that matches it, if one does."""
    exported = deploy_params(path)
    if exported == to_plain(cfg.model.params):
        return
    same = [p for p in sorted((REPO_ROOT / "configs").glob("*.yaml")) if _model_params(p) == exported]
    fix = (f"pass the config it was exported with: --config {same[0].relative_to(REPO_ROOT)}" if same else
           "pass the config it was exported with, or re-export it with scripts/export_deploy.py --config <this config>")
    raise ConfigError(f"--deploy {path} was exported from other model.params than the config's; {fix}")


def _model_params(path: Path) -> dict | None:
    """``model.params`` of a config file; None for one that does not load (only a hint is at stake)."""
    try:
        return to_plain(load_config(path).model.get("params", {}))
    except (ConfigError, OSError, AttributeError, OmegaConfBaseException):
        return None


def build_inference_denoiser(cfg: DictConfig, files: InferenceFiles) -> nn.Module:
    """The denoiser in eval mode: the deploy file's 1-bit integer model, or ``model.params``'s
    network (binarized when the config says so) with the checkpoint loaded strictly into a
    meta-device skeleton, so no weight is initialised only to be overwritten."""
    if files.deploy is not None:
        return load_deploy(files.deploy)
    state = read_state_dict(files.ckpt, what="denoiser checkpoint")
    denoiser = build_denoiser_from_config(cfg, "student", meta=True)
    load_state_dict_into(denoiser, state, what="denoiser checkpoint", path=files.ckpt)
    return denoiser.eval()


def build_pipeline(cfg: DictConfig, files: InferenceFiles, device: torch.device, *, precision: str = "auto",
                   sampler: str = "one_step", channels_last: bool = False, compile: bool = False) -> SRPipeline:
    """Denoiser + autoencoder + schedule with their weights, ready for ``pipe(lr)``.

    ``precision`` as :func:`resolve_precision`; ``channels_last`` / ``compile`` are speed options
    that leave the maths unchanged.
    """
    prec = resolve_precision(precision, device, cfg)
    denoiser = build_inference_denoiser(cfg, files).to(device)
    vq = build_autoencoder(cfg, device, prec.autoencoder_dtype, memory_format=prec.autoencoder_format)
    if channels_last:
        denoiser, vq = denoiser.to(memory_format=torch.channels_last), vq.to(memory_format=torch.channels_last)
    if compile:
        denoiser = torch.compile(denoiser)
    schedule = build_schedule(cfg, device)
    return SRPipeline(denoiser, vq, schedule, sampler=sampler, sf=schedule.sf, autocast=prec.autocast,
                      fast_float32=prec.fast_float32)


def deployable_denoiser(ckpt: str | os.PathLike,
                        config: str | os.PathLike | DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The simulated BiMaCo denoiser of a checkpoint trained with ``config`` (a YAML path or a loaded
    config; strict load into the meta skeleton) and its ``model.params``: what
    :func:`bimacosr.deploy.export_deploy` packs, and what ``export_deploy.py --check`` compares the
    file with."""
    cfg = config if isinstance(config, DictConfig) else load_config(config)
    require(cfg, "model.params", source=f"config {config}")
    params = to_plain(cfg.model.params)
    if not is_binarized(params):
        raise ConfigError(f"{config}: model.params has no binarization keys; only BiMaCo denoisers can be "
                          f"deployed (use e.g. configs/BiMaCoSR.yaml)")
    path = resolve_weight(ckpt, what="BiMaCo checkpoint (--ckpt)")
    return build_inference_denoiser(cfg, InferenceFiles(autoencoder=None, ckpt=path)), params


def scale_factor(cfg: DictConfig) -> int:
    """The SR factor of the config (``diffusion.params.sf``)."""
    return Schedule.from_config(to_plain(cfg.diffusion.params)).sf


def plain_params(cfg: DictConfig, section: str = "model") -> dict[str, Any]:
    """``<section>.params`` as a plain dict (for deploy metadata and counting)."""
    require(cfg, f"{section}.params")
    params: Mapping[str, Any] = to_plain(cfg[section].params)
    return dict(params)


def binarized(cfg: DictConfig) -> bool:
    """Whether the config's ``model.params`` describe a binarized (BiMaCo) denoiser."""
    return is_binarized(to_plain(cfg.model.params))
