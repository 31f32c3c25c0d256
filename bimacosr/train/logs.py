"""What a training run writes for people: CSV logs, TensorBoard scalars, validation grids."""
from __future__ import annotations

import csv
from pathlib import Path

from tqdm import tqdm

TRAIN_FIELDS = ("step", "loss", "lr", "sec_per_iter")
VAL_FIELDS = ("step", "psnr", "lpips")


def _truncate(path: Path, fields: tuple[str, ...], after_step: int) -> None:
    """Keep the header and rows up to ``after_step`` (a resumed run rewrites what came later)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= after_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class RunLogger:
    """``train_log.csv`` / ``val_log.csv`` in the run folder, plus TensorBoard under ``tb/`` when the
    ``tensorboard`` package is installed. Disabled on ranks other than 0."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True):
        self.run_dir, self.enabled, self.writer = run_dir, enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, fields in (("train_log.csv", TRAIN_FIELDS), ("val_log.csv", VAL_FIELDS)):
            _truncate(run_dir / name, fields, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        except ImportError:
            tqdm.write("tensorboard is not installed: logging to CSV only (pip install tensorboard)")

    def _append(self, name: str, fields: tuple[str, ...], row: dict) -> None:
        path = self.run_dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def train(self, step: int, loss: float, lr: float, sec_per_iter: float) -> None:
        if not self.enabled:
            return
        self._append("train_log.csv", TRAIN_FIELDS, {"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                                                     "sec_per_iter": f"{sec_per_iter:.4g}"})
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def val(self, step: int, psnr: float, lpips: float | None) -> None:
        if not self.enabled:
            return
        self._append("val_log.csv", VAL_FIELDS, {"step": step, "psnr": f"{psnr:.4f}",
                                                 "lpips": "" if lpips is None else f"{lpips:.4f}"})
        tqdm.write(f"validation @ {step}: PSNR={psnr:.2f}" + ("" if lpips is None else f", LPIPS={lpips:.4f}"))
        if self.writer:
            self.writer.add_scalar("val/psnr", psnr, step)
            if lpips is not None:
                self.writer.add_scalar("val/lpips", lpips, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
