"""Checkpoints of a training run: atomic, resumable, pruned.

A checkpoint is a folder ``<run>/checkpoints/step_<NNNNNNN>/`` holding

* ``model.pth``  -- the student's bare state_dict (loads straight into ``inference_quant.py --ckpt``),
* ``ema.pth``    -- the EMA state_dict (same keys; also an inference checkpoint),
* ``trainer.pth`` -- optimizer state, step, best validation PSNR and every rank's training-pair
  pool (everything else random in a step is derived from ``(seed, step)``, so nothing more is
  needed to continue bit-identically).

It is written into a hidden temporary folder and renamed into place, so an interruption at any
moment leaves the previous checkpoints intact and no half-written one under a real name. The last
``keep_last`` step folders are kept; an older one is renamed to a hidden name before it is deleted,
so an interrupted deletion leaves no partial step folder either. ``best_psnr/`` holds model + EMA of
the best validation PSNR.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bimacosr.checkpoint import CheckpointError, read_state_dict, save_state_dict

STEP_PREFIX = "step_"
CHECKPOINT_FILES = ("model.pth", "ema.pth", "trainer.pth")
PRUNED_PREFIX = ".pruned_"
"""A step folder being deleted: out of the checkpoint namespace (see :func:`prune_checkpoints`)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final`` (replacing an older one of the same name)."""
    if final.exists():
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir: Path, step: int, model: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor],
                    trainer: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the newest ``keep_last`` folders."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_state_dict(model, tmp / "model.pth")
    save_state_dict(ema, tmp / "ema.pth")
    save_state_dict({**trainer, "step": step}, tmp / "trainer.pth")
    _replace_dir(tmp, final)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders (``0``: keep all). Each is first renamed
    out of the checkpoint namespace (``.pruned_step_N``, one atomic rename), so a kill while its
    files are deleted never leaves a partial ``step_N/``; what such a kill left is deleted here."""
    root = run_dir / "checkpoints"
    for leftover in root.glob(f"{PRUNED_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        doomed = old.with_name(PRUNED_PREFIX + old.name)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_best(run_dir: Path, step: int, psnr: float, model: Mapping[str, torch.Tensor],
              ema: Mapping[str, torch.Tensor]) -> Path:
    """Replace ``checkpoints/best_psnr/`` (model, EMA, ``info.json``) atomically."""
    final = run_dir / "checkpoints" / "best_psnr"
    tmp = final.with_name(".tmp_best_psnr")
    shutil.rmtree(tmp, ignore_errors=True)
    save_state_dict(model, tmp / "model.pth")
    save_state_dict(ema, tmp / "ema.pth")
    (tmp / "info.json").write_text(json.dumps({"step": step, "psnr": psnr}))
    _replace_dir(tmp, final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step folders (all of :data:`CHECKPOINT_FILES` present), oldest first; temporary,
    pruned and incomplete folders are ignored."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if all((p / name).is_file() for name in CHECKPOINT_FILES)]
    return sorted(found, key=lambda p: p.name)


def resume_candidates(run_dir: Path, resume: str | None) -> list[Path]:
    """The checkpoint folders to try, in order: ``resume`` = ``"latest"`` gives every complete one
    in ``run_dir``, newest first (the trainer falls back past those that do not load); a step
    folder or a file inside one gives just that folder; ``None`` starts fresh (no folder)."""
    if resume is None:
        return []
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
        return found[::-1]
    path = Path(resume)
    folder = path.parent if path.is_file() else path
    if not (folder / "trainer.pth").is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder (expected {folder / 'trainer.pth'}); "
                              f"pass a checkpoints/step_* folder, or --resume alone for the latest")
    return [folder]


@dataclass
class Checkpoint:
    """The three files of a checkpoint folder, read (not yet applied to a model)."""

    folder: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    trainer: dict[str, Any]


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read ``model.pth``, ``ema.pth`` and ``trainer.pth``; a missing, truncated or corrupt file
    raises ``CheckpointError`` naming it."""
    model = read_state_dict(folder / "model.pth", what="resumed student")
    ema = read_state_dict(folder / "ema.pth", what="resumed EMA")
    path = folder / "trainer.pth"
    try:
        trainer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, EOF, bad pickle: all mean "not a readable file"
        reason = str(exc).splitlines()[0][:160] if str(exc) else "-"
        raise CheckpointError(f"{path} is corrupt or truncated ({type(exc).__name__}: {reason})") from None
    return Checkpoint(folder, model, ema, trainer)


def load_resume(run_dir: Path, resume: str | None) -> tuple[Checkpoint | None, list[str]]:
    """The first of :func:`resume_candidates` that reads completely, and one line per newer
    checkpoint skipped (which and why). Raises ``CheckpointError`` when none reads."""
    skipped: list[str] = []
    for folder in resume_candidates(run_dir, resume):
        try:
            return read_checkpoint(folder), skipped
        except CheckpointError as exc:
            if resume != "latest":
                raise
            skipped.append(f"skipped checkpoint {folder}: {str(exc).splitlines()[0]}")
    if skipped:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} loads ("
                              + "; ".join(skipped) + "); start without --resume or restore one")
    return None, skipped
