"""The paper's Table 1 side by side: method folders scored over the test sets, the paper's own
rows beside them (``metric.py --table1 ROOT``, docs/pipeline.md §7.5).

Layout (ROOT: the test sets; METHOD: one folder per method, each ``--inp_imgs`` of metric.py)::

    ROOT/RealSR/HR/          GT images of each test set
    ROOT/DRealSR/HR/
    ROOT/DIV2K-Val/HR/
    METHOD/RealSR/           that method's SR images, paired with the GT by name (bimacosr.pairing)
    METHOD/DRealSR/
    METHOD/DIV2K-Val/

A test set without ``ROOT/<set>/HR`` is not scored, and a method without ``METHOD/<set>`` is left
out of that set's table (one note each). Per set: the nine paper columns in the paper's order
(:data:`COLUMNS`, or those of them requested), a row per method, then the paper's rows for
SinSR, ResShift and BiMaCoSR labelled as the paper's (:data:`PAPER_ROWS`). Metrics whose weights
are missing show as ``skipped``. Every set is paired first (:func:`bimacosr.evaluation.pairings_of`),
then the metrics are built once and score each (:func:`bimacosr.evaluation.score`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bimacosr.atomic import atomic_write_text
from bimacosr.evaluation import (Evaluation, EvaluationError, folder_labels, json_safe, metric_set, pairings_of,
                                 score, write_results)

DATASETS = ("RealSR", "DRealSR", "DIV2K-Val")
"""The paper's test sets, as folder names under ROOT and under each method folder."""
COLUMNS = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa-pipal", "clipiqa+")
"""Table 1's columns in the paper's order (``evaluation.METRICS`` names)."""
PAPER_METHODS = ("SinSR", "ResShift", "BiMaCoSR")
NOT_RECORDED = "paper's numbers not recorded in this repository"

# TO BE FILLED FROM THE PAPER (Table 1): per test set and method, the nine values in COLUMNS
# order, as printed. This repository records none of them (docs/, the reference notes), so every
# entry is None and is printed as NOT_RECORDED: never a guessed number.
PAPER_ROWS: dict[str, dict[str, tuple[float, ...] | None]] = {
    "RealSR": {"SinSR": None, "ResShift": None, "BiMaCoSR": None},
    "DRealSR": {"SinSR": None, "ResShift": None, "BiMaCoSR": None},
    "DIV2K-Val": {"SinSR": None, "ResShift": None, "BiMaCoSR": None},
}


def paper_row(dataset: str, method: str, columns: list[str]) -> dict[str, float] | None:
    """The paper's values of ``method`` on ``dataset`` for ``columns``; None when not recorded."""
    values = PAPER_ROWS[dataset][method]
    return None if values is None else {c: values[COLUMNS.index(c)] for c in columns}


@dataclass
class Table1:
    """Every scored test set: its evaluation (one SR folder per method present) and row labels."""

    root: str
    columns: list[str]
    sets: dict[str, Evaluation]
    labels: dict[str, list[str]]
    notes: list[str]

    def markdown(self) -> str:
        """One section per test set: the methods' rows, then the paper's rows."""
        parts = []
        for dataset, result in self.sets.items():
            paper = []
            for method in PAPER_METHODS:
                row = paper_row(dataset, method, self.columns)
                cells = ([NOT_RECORDED] + [""] * (len(self.columns) - 1) if row is None
                         else [str(row[c]) for c in self.columns])
                paper.append((f"{method} (paper's Table 1)", cells))
            parts.append(f"### {dataset} (GT: {result.gt_dir})\n\n"
                         + result.markdown(self.labels[dataset], paper))
        text = "\n".join(parts)
        return text + ("\n" + "".join(f"* {note}\n" for note in self.notes) if self.notes else "")

    def summary(self) -> dict[str, Any]:
        """JSON-ready: per test set the evaluation summary plus the paper's rows (null: not recorded)."""
        return {"root": self.root, "columns": self.columns, "notes": self.notes,
                "paper_rows_note": f"null = {NOT_RECORDED}",
                "sets": {dataset: {**result.summary(), "methods": self.labels[dataset],
                                   "paper_rows": {m: paper_row(dataset, m, self.columns) for m in PAPER_METHODS}}
                         for dataset, result in self.sets.items()}}


def score_table1(root: str | Path, method_dirs: list[str | Path], metrics: list[str] | None = None,
                 weights_dir: str | Path | None = None, device: str | None = None,
                 sr_suffix: str = "", offline: bool = False) -> Table1:
    """Score every method folder over the test sets under ``root`` (the module's layout).

    metrics: ``evaluation.METRICS`` names; the Table 1 columns among them are scored (default
    all nine); the other arguments as :func:`bimacosr.evaluation.evaluate`. Raises EvaluationError
    when a folder is missing, no test set is under ``root``,
    or no requested metric is a Table 1 column."""
    root = Path(root)
    methods = [Path(d) for d in method_dirs]
    for folder in [root, *methods]:
        if not folder.is_dir():
            raise EvaluationError(f"folder not found: {folder}")
    columns = [c for c in COLUMNS if metrics is None or c in metrics]
    if not columns:
        raise EvaluationError(f"--table1 scores Table 1's columns; none requested (--metrics {' '.join(COLUMNS)})")
    names = folder_labels([str(m) for m in methods])
    paired, labels, notes = {}, {}, []
    for dataset in DATASETS:
        gt = root / dataset / "HR"
        if not gt.is_dir():
            notes.append(f"{dataset} not scored: {gt} not found")
            continue
        present = [(m, name) for m, name in zip(methods, names) if (m / dataset).is_dir()]
        notes += [f"{name} left out of {dataset}: {m / dataset} not found"
                  for m, name in zip(methods, names) if (m, name) not in present]
        if present:  # every set paired before any metric is built: input problems come first
            paired[dataset] = (gt, pairings_of([m / dataset for m, _ in present], gt, sr_suffix))
            labels[dataset] = [name for _, name in present]
    if not paired:
        raise EvaluationError(f"nothing to score under {root}: expected {root}/<set>/HR for a set in "
                              f"{', '.join(DATASETS)}, and <method>/<set> beside it")
    built = metric_set(columns, True, weights_dir, device, offline)  # once for every set
    sets = {dataset: score(pairings, gt, built) for dataset, (gt, pairings) in paired.items()}
    return Table1(str(root), columns, sets, labels, notes)


def write_table1(table: Table1, out_dir: str | Path, log_name: str | None = None) -> dict[str, Path]:
    """``table1.md`` and ``table1.json`` in ``out_dir``, and each set's :func:`write_results` files
    in ``out_dir/<set>/``. Returns the written paths by name."""
    out = Path(out_dir)
    paths = {f"{dataset} {kind}": path for dataset, result in table.sets.items()
             for kind, path in write_results(result, out / dataset, log_name).items()}
    texts = {"table1.md": table.markdown(), "table1.json": json.dumps(json_safe(table.summary()), indent=2, allow_nan=False) + "\n"}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        paths[name] = out / name
    return paths
