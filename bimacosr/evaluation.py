"""Evaluation of SR folders with the paper's Table 1 metrics through pyiqa (docs/pipeline.md §7).

Differences from the original ``metric.py``, all deliberate: SR and GT files are paired by file
stem (not by position in two sorted lists; the rule, output suffixes and comparison panels
included, is :mod:`bimacosr.pairing`) and every unpaired file is named; an image outside a
metric's size limit (:mod:`bimacosr.metric_sizes`, e.g. NIQE below 96 px) gets a note naming the
metric and the size instead of a value, and folder means are over the images that have one (the
count is reported); only the requested
metrics are built; weight files are fetched from pyiqa's own URLs and checked so that none can run
code (bimacosr/metric_weights.py), and a metric whose files cannot be had is reported as
:class:`Skipped` with the URL, the path and the command that fetches them (never a crash);
no-reference metrics run without a GT folder.
NIQE falls back to the parameters bundled in ``bimacosr/assets`` (from basicsr 1.4.2) when
pyiqa's ``niqe_modelparameters.mat`` is not cached. MANIQA's ViT backbone is built without timm's
ImageNet download: the MANIQA checkpoint is loaded strictly and overwrites all of its weights.
FID (pyiqa, clean mode) compares the SR outputs of a folder, unpaired ones included, with every
GT image: the files the pairing rule counts as outputs and images (not the comparison panels or
files without the output suffix it leaves out, nor the subfolders pyiqa's folder scan would walk
into), handed to pyiqa as a temporary folder of links (:func:`fid_folders`).
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from bimacosr.atomic import atomic_write_text
from bimacosr.device import pick_device
from bimacosr.imageio import read_image
from bimacosr.metric_sizes import SIZE_LIMITS
from bimacosr.metric_weights import MetricFile, metric_hub, prepare
from bimacosr.pairing import EvaluationError, Pairing, pair_by_name  # re-exported: evaluation's API

Kind = Literal["fr", "nr", "folder"]
_NIQE_FALLBACK = Path(__file__).with_name("assets") / "niqe_pris_params.npz"
_CLIP_MODULES = {"clip": "pip install openai-clip",
                 "pkg_resources": "openai-clip imports it: pip install 'setuptools<81'"}


@dataclass(frozen=True)
class MetricSpec:
    """One Table 1 metric: pyiqa id and options, kind, weight files ``(location, file name)``
    (locations: see :func:`cache_dirs`), Python modules it needs (name -> install hint)."""

    pyiqa_id: str
    kind: Kind
    label: str
    lower_better: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    weights: tuple[tuple[str, str], ...] = ()
    modules: dict[str, str] = field(default_factory=dict)


_Y = {"test_y_channel": True, "color_space": "ycbcr"}
# Weight file names are those of pyiqa 0.1.x (docs/pipeline.md §7.4).
METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", "fr", "PSNR", options=_Y),
    "ssim": MetricSpec("ssim", "fr", "SSIM", options=_Y),
    "lpips": MetricSpec("lpips", "fr", "LPIPS", True, weights=(
        ("torchvision", "alexnet-owt-7be5be79.pth"), ("pyiqa", "LPIPS_v0.1_alex-df73285e.pth"))),
    "dists": MetricSpec("dists", "fr", "DISTS", True, weights=(
        ("torchvision", "vgg16-397923af.pth"), ("pyiqa", "DISTS_weights-f5e65c96.pth"))),
    "fid": MetricSpec("fid", "folder", "FID", True, weights=(
        ("pyiqa", "pt_inception-2015-12-05-6726825d.pth"),)),
    "niqe": MetricSpec("niqe", "nr", "NIQE", True, weights=(
        ("pyiqa", "niqe_modelparameters.mat"),)),
    "musiq": MetricSpec("musiq", "nr", "MUSIQ", weights=(
        ("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),)),
    "maniqa-pipal": MetricSpec("maniqa-pipal", "nr", "MANIQA", weights=(
        ("pyiqa", "MANIQA_PIPAL-ae6d356b.pth"),), modules={"timm": "pip install timm"}),
    "clipiqa": MetricSpec("clipiqa", "nr", "CLIP-IQA", weights=(("clip", "RN50.pt"),),
                          modules=_CLIP_MODULES),
    "clipiqa+": MetricSpec("clipiqa+", "nr", "CLIP-IQA+", weights=(
        ("clip", "RN50.pt"), ("pyiqa", "CLIP-IQA+_learned_prompts-603f3273.pth")),
        modules=_CLIP_MODULES),
}

# The original's and the paper's spellings (metric.py flags are case-insensitive).
ALIASES: dict[str, str] = {**{spec.label.lower(): name for name, spec in METRICS.items()},
                           "maniqa": "maniqa-pipal", "clip_iqa": "clipiqa", "clipiqa_plus": "clipiqa+"}


def metric_name(text: str) -> str:
    """The METRICS key for ``text`` in any case and the original's spellings (``MANIQA``,
    ``CLIPIQA+``, ``CLIP-IQA``); raises ValueError naming the known names."""
    key = text.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METRICS:
        raise ValueError(f"unknown metric {text!r}; known: {', '.join(METRICS)} (any case; also MANIQA, CLIP-IQA)")
    return key


@dataclass(frozen=True)
class Skipped:
    """A requested metric that was not computed: why, and the missing files (full paths)."""

    metric: str
    reason: str
    needed_files: list[str] = field(default_factory=list)


@dataclass
class FolderResult:
    """Scores of one SR folder: per image ``{metric: value}`` rows (a metric that cannot score
    an image's size is absent from its row; ``row["not_scored"]`` says why), folder means over the
    images that have a value plus FID (``scores``), and how many images those are (``scored``,
    per-image metrics only)."""

    sr_dir: str
    pairing: Pairing
    rows: list[dict[str, Any]]
    scores: dict[str, float]
    scored: dict[str, int]

    def cell(self, metric: str) -> str:
        """``metric``'s table cell: the mean to 4 decimals, followed by ``(n/N)`` when only n of
        the N images have a value; ``— (0/N)`` when none has."""
        total, count = len(self.rows), self.scored.get(metric, len(self.rows))
        mean = f"{self.scores[metric]:.4f}" if metric in self.scores else "—"
        return mean if count == total else f"{mean} ({count}/{total})"


@dataclass
class Evaluation:
    """Everything :func:`evaluate` found, in the requested metric order."""

    metrics: list[str]
    gt_dir: str | None
    folders: list[FolderResult]
    skipped: list[Skipped]
    notes: dict[str, str]
    device: str

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (means per folder, unpaired files, skipped metrics, notes)."""
        return {
            "metrics": self.metrics, "gt_dir": self.gt_dir, "device": self.device,
            "pyiqa_version": _pyiqa_version(), "notes": self.notes,
            "skipped": [asdict(s) for s in self.skipped],
            "folders": [{"sr_dir": f.sr_dir, "images": len(f.pairing.pairs), "scores": f.scores,
                         "scored_images": f.scored,
                         "not_scored": [{"sr_file": r["sr_file"], "note": r["not_scored"]}
                                        for r in f.rows if "not_scored" in r],
                         "unpaired_sr": f.pairing.unpaired_sr,
                         "unpaired_gt": f.pairing.unpaired_gt, "left_out": f.pairing.left_out,
                         "pairing_notes": f.pairing.notes,
                         "channel_mismatch": [{k: r[k] for k in ("sr_file", "gt_file", "channel_mismatch")}
                                              for r in f.rows if "channel_mismatch" in r]}
                        for f in self.folders],
        }

    def markdown(self, labels: list[str] | None = None,
                 more_rows: list[tuple[str, list[str]]] = ()) -> str:
        """Markdown table: one row per SR folder, one column per metric (:meth:`FolderResult.cell`).

        labels: the folders' row labels (default :func:`folder_labels`; the full paths are in
        :meth:`summary`); more_rows: ``(label, cells)`` rows after them (Table 1's paper rows)."""
        skipped = {s.metric for s in self.skipped}
        head = [f"{METRICS[m].label} {'↓' if METRICS[m].lower_better else '↑'}"
                for m in self.metrics]
        lines = ["| SR folder | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        partial = []
        for f, label in zip(self.folders, labels or folder_labels([f.sr_dir for f in self.folders])):
            cells = ["skipped" if m in skipped else f.cell(m) for m in self.metrics]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            if any(n < len(f.rows) for n in f.scored.values()):
                partial.append(f"* {label}: (n/N) = mean over the n of N images that have a value; the "
                               f"others are outside the metric's size limit (not_scored in the CSV)")
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in more_rows]
        lines += [""] + partial + [f"* {s.metric} skipped: {s.reason}" for s in self.skipped]
        lines += [f"* {m}: {note}" for m, note in self.notes.items()]
        return "\n".join(lines).rstrip() + "\n"


def folder_labels(folders: list[str]) -> list[str]:
    """Short row labels: each folder's name, with as many parent folders as it takes to tell
    folders of the same name apart (``run1/out``, ``run2/out``)."""
    parts = [Path(os.path.abspath(f)).parts for f in folders]
    labels = []
    for own in parts:
        depth = 1
        while depth < len(own) and sum(p[-depth:] == own[-depth:] for p in parts) > 1:
            depth += 1
        labels.append(str(Path(*own[-depth:])))
    return labels


def trainer_psnr_per_image(sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The trainer's validation PSNR per image (docs/pipeline.md §7.3), float64 [B].

    sr, gt: RGB [B, 3, H, W] in [0, 1]. Y = BT.601 luma + 16/255 (float32), clamped to [0, 1],
    rounded to uint8 like skimage ``img_as_ubyte``; PSNR = 20·log10(255 / sqrt(MSE)).
    """
    def y_uint8(x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float32, device=x.device)
        y = (x.float().permute(0, 2, 3, 1) @ w) / 255.0 + 16.0 / 255.0
        return torch.round(y.clamp(0, 1) * 255.0).to(torch.float64)

    mse = (y_uint8(sr) - y_uint8(gt)).pow(2).mean(dim=(1, 2))
    return 20 * torch.log10(255.0 / mse.sqrt())


def trainer_psnr(sr: torch.Tensor, gt: torch.Tensor) -> float:
    """The trainer's validation PSNR, summed over the batch (as the original returns it)."""
    return float(trainer_psnr_per_image(sr, gt).sum())




@contextlib.contextmanager
def _timm_without_download() -> Iterator[None]:
    """Let ``timm.create_model`` build architectures only (no pretrained download)."""
    import timm

    create = timm.create_model

    def offline(*args: Any, **kwargs: Any) -> Any:
        return create(*args, **{**kwargs, "pretrained": False})

    timm.create_model = offline
    try:
        yield
    finally:
        timm.create_model = create


def preflight(names: list[str], has_gt: bool, weights_dir: Path | None, offline: bool = False,
              progress: bool = True) -> tuple[list[Skipped], dict[MetricFile, Path]]:
    """Decide which requested metrics can run, fetching their weight files (unless ``offline``)
    and checking each (``metric_weights.prepare``). Returns the skipped metrics, each with its
    reasons and missing files, and the checked files of the rest."""
    skipped, wanted = [], {}
    for name in names:
        spec = METRICS[name]
        if spec.kind in ("fr", "folder") and not has_gt:
            skipped.append(Skipped(name, "needs a GT folder (--gt_imgs)"))
            continue
        modules = [f"Python module '{m}' missing ({hint})" for m, hint in spec.modules.items()
                   if importlib.util.find_spec(m) is None]
        if modules:
            skipped.append(Skipped(name, "; ".join(modules)))
            continue
        wanted[name] = [MetricFile(where, file_name) for where, file_name in spec.weights]
    prepared = prepare([f for files in wanted.values() for f in files], weights_dir, offline, progress)
    for name, files in wanted.items():
        problems = [prepared.problems[f] for f in files if f in prepared.problems]
        if problems and not (name == "niqe" and _NIQE_FALLBACK.is_file()):
            skipped.append(Skipped(name, "; ".join(problems),
                                   [str(f.path) for f in files if f in prepared.problems]))
    return skipped, prepared.found


def _build(name: str, device: torch.device, notes: dict[str, str], found: dict[MetricFile, Path]
           ) -> torch.nn.Module:
    """Create one pyiqa metric whose files are in ``found`` (inside ``metric_hub``)."""
    import pyiqa

    spec, options = METRICS[name], dict(METRICS[name].options)
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # pyiqa prints load messages
        if name == "maniqa-pipal":
            stack.enter_context(_timm_without_download())
        if name == "niqe" and MetricFile(*spec.weights[0]) not in found:
            import scipy.io

            params = np.load(_NIQE_FALLBACK)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            scipy.io.savemat(tmp / "niqe.mat", {"mu_prisparam": params["mu_pris_param"],
                                                "cov_prisparam": params["cov_pris_param"]})
            options["pretrained_model_path"] = str(tmp / "niqe.mat")
            notes[name] = (f"pyiqa's {spec.weights[0][1]} not available; used basicsr 1.4.2 "
                           f"niqe_pris_params.npz ({_NIQE_FALLBACK})")
        return pyiqa.create_metric(spec.pyiqa_id, device=device, **options).eval()


def build_metrics(names: list[str], has_gt: bool, weights_dir: Path | None, device: torch.device,
                  offline: bool = False) -> tuple[dict[str, torch.nn.Module], list[Skipped], dict[str, str]]:
    """Build every requested metric that can run; the rest become :class:`Skipped`
    (a build failure too: never a crash). Returns (metrics, skipped, notes). The metrics are
    built from checked files only, with weights-only loading (``metric_weights.metric_hub``)."""
    skipped, found = preflight(names, has_gt, weights_dir, offline)
    gone, built, notes = {s.metric for s in skipped}, {}, {}
    with metric_hub(found):
        for name in names:
            if name not in gone:
                try:
                    built[name] = _build(name, device, notes, found)
                except Exception as exc:  # reported, not raised: one bad metric must not stop the rest
                    skipped.append(Skipped(name, f"could not be built: {type(exc).__name__}: {exc}"))
    return built, skipped, notes


_CHANNELS = {"gray": 1, "gray_alpha": 2, "rgb": 3, "rgba": 4}


def channel_mismatch(sr_mode: str, gt_mode: str) -> str | None:
    """How an SR/GT pair of different channel layouts (``imageio`` modes) is compared, or None
    when both have the same layout. Every image is scored as RGB: gray is replicated to 3
    channels, alpha is left out."""
    if sr_mode == gt_mode:
        return None
    how = [f"SR {sr_mode} ({_CHANNELS[sr_mode]} ch) vs GT {gt_mode} ({_CHANNELS[gt_mode]} ch)"]
    grays = [side for side, mode in (("SR", sr_mode), ("GT", gt_mode)) if mode.startswith("gray")]
    if len(grays) == 1:
        how.append(f"{grays[0]} gray replicated to 3 channels")
    if {sr_mode, gt_mode} & {"rgba", "gray_alpha"}:
        how.append("alpha ignored")
    return "; ".join(how) + "; compared as RGB"


@contextlib.contextmanager
def fid_folders(sr_dir: Path, gt_dir: Path, pairing: Pairing) -> Iterator[tuple[Path, Path]]:
    """Two temporary folders of links (copies where links cannot be made) to the files FID
    compares: ``sr_dir``'s SR outputs by ``pairing`` (paired and unpaired; not what it left out)
    and every GT image (paired and unpaired). Removed on exit; nothing is written in the user's
    folders."""
    sides = {"sr": [sr for sr, _ in pairing.pairs] + [sr_dir / name for name in pairing.unpaired_sr],
             "gt": [gt for _, gt in pairing.pairs] + [gt_dir / name for name in pairing.unpaired_gt]}
    with tempfile.TemporaryDirectory(prefix="bimacosr_fid_") as tmp:
        folders = []
        for side, files in sides.items():
            folder = Path(tmp) / side
            folder.mkdir()
            for path in files:
                link = folder / path.name
                try:
                    link.symlink_to(path.resolve())
                except OSError:
                    shutil.copyfile(path, link)
            folders.append(folder)
        yield folders[0], folders[1]


def _score_folder(sr_dir: Path, gt_dir: Path | None, pairing: Pairing,
                  metrics: dict[str, torch.nn.Module], device: torch.device) -> FolderResult:
    """Per-image FR/NR scores (none for a metric whose size limit an image is outside: a note
    instead, printed and kept in the row), their means over the images that have one, and FID for
    one SR folder."""
    rows = []
    per_image = {name: metric for name, metric in metrics.items() if METRICS[name].kind != "folder"}
    for sr_path, gt_path in tqdm(pairing.pairs, desc=str(sr_dir), unit="img", file=sys.stderr,
                                 disable=None):
        sr_image = read_image(sr_path)
        gt_image = read_image(gt_path) if gt_path is not None else None
        sr = sr_image.rgb.to(device)
        gt = gt_image.rgb.to(device) if gt_image is not None else None
        if gt is not None and sr.shape != gt.shape:
            raise EvaluationError(f"size mismatch: {sr_path} is {sr.shape[3]}x{sr.shape[2]}, "
                                  f"{gt_path} is {gt.shape[3]}x{gt.shape[2]}")
        row: dict[str, Any] = {"folder": str(sr_dir), "image": sr_path.stem,
                               "sr_file": sr_path.name,
                               "gt_file": gt_path.name if gt_path is not None else ""}
        note = channel_mismatch(sr_image.mode, gt_image.mode) if gt_image is not None else None
        if note:
            print(f"warning: {sr_path} and {gt_path} differ in channels: {note}", file=sys.stderr)
            row["channel_mismatch"] = note
        outside = {name: SIZE_LIMITS[name].note(METRICS[name].label, sr.shape[3], sr.shape[2])
                   for name in per_image}
        if any(outside.values()):
            row["not_scored"] = "; ".join(note for note in outside.values() if note)
            print(f"note: {sr_path}: {row['not_scored']}", file=sys.stderr)
        with torch.no_grad():
            for name, metric in per_image.items():
                if outside[name] is None:
                    row[name] = float((metric(sr, gt) if METRICS[name].kind == "fr" else metric(sr)).item())
        rows.append(row)
    values = {m: [r[m] for r in rows if m in r] for m in metrics if METRICS[m].kind != "folder"}
    scores = {m: float(np.mean(v)) for m, v in values.items() if v}
    if "fid" in metrics:
        with fid_folders(sr_dir, gt_dir, pairing) as (sr_files, gt_files), \
                contextlib.redirect_stdout(sys.stderr):
            scores["fid"] = float(metrics["fid"](str(sr_files), str(gt_files), num_workers=0,
                                                 verbose=False))
    return FolderResult(str(sr_dir), pairing, rows, scores, {m: len(v) for m, v in values.items()})


@dataclass
class MetricSet:
    """Metrics built once (:func:`metric_set`) for one or more :func:`evaluate` calls: the
    requested names in order, the built models, the skipped ones and the build notes."""

    names: list[str]
    has_gt: bool
    device: torch.device
    built: dict[str, torch.nn.Module]
    skipped: list[Skipped]
    notes: dict[str, str]


def metric_set(metrics: list[str] | None = None, has_gt: bool = True, weights_dir: str | Path | None = None,
               device: str | None = None, offline: bool = False) -> MetricSet:
    """Check the names and the device, fetch missing weight files (unless ``offline``) and build
    the metrics (:func:`build_metrics`). metrics: names from :data:`METRICS` (default all); without
    GT (``has_gt`` false) the full-reference ones and FID are skipped. Raises EvaluationError for an
    unknown name, an unusable device or a missing weights folder, before anything is built."""
    names = [m for m in METRICS if metrics is None or m in metrics]
    unknown = sorted(set(metrics or []) - set(METRICS))
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    try:
        dev = pick_device(device)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    wdir = Path(weights_dir) if weights_dir is not None else None
    if wdir is not None and not wdir.is_dir():
        raise EvaluationError(f"weights folder not found: {wdir}")
    built, skipped, notes = build_metrics(names, has_gt, wdir, dev, offline)
    order = {m: i for i, m in enumerate(names)}
    skipped.sort(key=lambda s: order[s.metric])
    return MetricSet(names, has_gt, dev, built, skipped, notes)


def pairings_of(sr_dirs: list[str | Path], gt_dir: Path | None, sr_suffix: str = "") -> list[tuple[Path, Pairing]]:
    """Each SR folder with its :func:`bimacosr.pairing.pair_by_name`; its notes and unpaired files
    go to stderr. Raises EvaluationError as pairing does (missing folder, nothing paired)."""
    pairings = [(Path(d), pair_by_name(Path(d), gt_dir, sr_suffix)) for d in sr_dirs]
    for d, p in pairings:
        for note in p.notes:
            print(f"note: {d}: {note}", file=sys.stderr)
        for side, files in (("SR", p.unpaired_sr), ("GT", p.unpaired_gt)):
            if files:
                print(f"warning: {d}: {len(files)} {side} file(s) without a partner: "
                      f"{', '.join(files)}", file=sys.stderr)
    return pairings


def evaluate(sr_dirs: list[str | Path], gt_dir: str | Path | None = None,
             metrics: list[str] | None = None, weights_dir: str | Path | None = None,
             device: str | None = None, sr_suffix: str = "", offline: bool = False) -> Evaluation:
    """Score every SR folder (paired with ``gt_dir`` by :func:`bimacosr.pairing.pair_by_name`;
    ``sr_suffix``: inference's ``--suffix``, ``""`` to detect it).

    With a GT folder only paired images are scored (no-reference metrics included); unpaired
    files are reported (stderr and ``Pairing``). An image outside a metric's size limit
    (:data:`bimacosr.metric_sizes.SIZE_LIMITS`) has no value for it, only a note.
    metrics: names from :data:`METRICS` (default all). Weight files missing from the caches are
    downloaded first, unless ``offline`` (bimacosr/metric_weights.py). Raises EvaluationError for
    input problems (missing folder, nothing paired, size mismatch), the folders' before any metric
    is built; metrics that cannot run are skipped, each with its reason.
    """
    gt = Path(gt_dir) if gt_dir is not None else None
    pairings = pairings_of(sr_dirs, gt, sr_suffix)
    return score(pairings, gt, metric_set(metrics, gt is not None, weights_dir, device, offline))


def score(pairings: list[tuple[Path, Pairing]], gt_dir: Path | None, ms: MetricSet) -> Evaluation:
    """The :class:`Evaluation` of paired folders (:func:`pairings_of`) with built metrics
    (:func:`metric_set`; several evaluations can share one)."""
    if ms.has_gt != (gt_dir is not None):
        raise ValueError("score: the metric set was built for " + ("a GT folder" if ms.has_gt else "no GT folder"))
    folders = [_score_folder(d, gt_dir, p, ms.built, ms.device) for d, p in pairings]
    return Evaluation(list(ms.names), str(gt_dir) if gt_dir else None, folders, list(ms.skipped), dict(ms.notes),
                      str(ms.device))


def write_results(result: Evaluation, out_dir: str | Path, log_name: str | None = None) -> dict[str, Path]:
    """Write ``metrics_per_image.csv``, ``metrics_summary.json`` and ``metrics_table.md``; with
    ``log_name`` also the original's log, ``test_<log_name>_<yymmdd-HHMMSS>.log``."""
    out = Path(out_dir)
    per_image = [m for m in result.metrics if METRICS[m].kind != "folder"
                 and m not in {s.metric for s in result.skipped}]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["folder", "image", "sr_file", "gt_file", *per_image,
                                  "channel_mismatch", "not_scored"], lineterminator="\n")
    writer.writeheader()
    for folder in result.folders:
        writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                         for row in folder.rows)
    summary = json.dumps(json_safe(result.summary()), indent=2, allow_nan=False)
    paths = {"csv": out / "metrics_per_image.csv", "json": out / "metrics_summary.json",
             "markdown": out / "metrics_table.md"}
    texts = {"csv": buf.getvalue(), "json": summary + "\n", "markdown": result.markdown()}
    if log_name is not None:
        paths["log"] = out / f"test_{log_name}_{time.strftime('%y%m%d-%H%M%S')}.log"
        texts["log"] = original_log(result, per_image)
    for key, text in texts.items():
        atomic_write_text(paths[key], text)
    return paths


def original_log(result: Evaluation, per_image: list[str]) -> str:
    """The original metric.py's log lines (docs/pipeline.md §7.2): per image
    ``<dir>/<file> | PSNR: x.xxxxxx; ...`` (`` | <note>`` for metrics it has no value of), then each
    folder's means to 4 decimals."""
    lines = []
    for folder in result.folders:
        for row in folder.rows:
            cells = "; ".join(f"{METRICS[m].label}: {row[m]:.6f}" for m in per_image if m in row)
            parts = [f"{folder.sr_dir}/{row['sr_file']}", cells, row.get("not_scored", "")]
            lines.append(" | ".join(part for part in parts if part))
        means = [m for m in result.metrics if m in folder.scores]
        lines.append(f"{folder.sr_dir} | " + "; ".join(f"{METRICS[m].label}: {folder.scores[m]:.4f}" for m in means))
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """Non-finite floats (PSNR of identical images is inf) as the strings 'inf'/'-inf'/'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _pyiqa_version() -> str | None:
    """Installed pyiqa version (None when pyiqa is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyiqa")
    except PackageNotFoundError:
        return None
