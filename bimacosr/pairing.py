"""Which SR file is scored against which GT file: the one rule of ``metric.py`` and of
``inference_quant.py --ref_path`` (docs/pipeline.md §7.2).

Files are taken from each folder by ``imageio.find_images`` (not recursive) and matched by file
stem, after two steps that decide which SR files are SR outputs:

1. Comparison panels: ``<s>_compare.<ext>`` next to an SR image of stem ``<s>`` is the panel that
   inference's ``--compare`` wrote for it, not an output: left out (one note counts them).
2. Output suffix (inference's ``--suffix``, Real-ESRGAN's convention: ``out`` or ``_out`` names
   ``a.png`` -> ``a_out.png``). Given, only SR files whose stem ends with it are outputs, paired by
   the stem without it; the others (e.g. the LR inputs when outputs were written next to them) are
   left out (one note counts them). Not given, with a GT folder: when no SR stem is a GT stem but
   every SR stem is ``<GT stem>_<something>`` with one common ``_<something>``, that is the suffix
   (the shortest one when several fit) and one note says so.

Then SR and GT files of the same stem are paired; SR and GT files without a partner are named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimacosr.imageio import find_images

COMPARE_SUFFIX = "_compare"
"""Stem ending of inference's ``--compare`` panels: ``a_out.png`` -> ``a_out_compare.png``."""


class EvaluationError(Exception):
    """A problem with the inputs of an evaluation (missing folder, nothing paired, size mismatch)."""


@dataclass(frozen=True)
class Pairing:
    """SR/GT files matched by stem (``gt`` is None for every pair when there is no GT folder).

    unpaired_sr / unpaired_gt: file names without a partner; left_out: SR file names that are not
    SR outputs (comparison panels, files without the output suffix); notes: one line per rule
    that changed what is scored (panels or files left out, a detected suffix)."""

    pairs: list[tuple[Path, Path | None]]
    unpaired_sr: list[str]
    unpaired_gt: list[str]
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def suffix_part(suffix: str) -> str:
    """Real-ESRGAN's convention: ``--suffix out`` names ``a.png`` -> ``a_out.png``."""
    return f"_{suffix}" if suffix and not suffix.startswith("_") else suffix


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files directly in ``folder`` (``imageio.find_images``) by stem; two files with one
    stem are an error."""
    if not folder.is_dir():
        raise EvaluationError(f"folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in find_images(folder):
        if path.stem in found:
            raise EvaluationError(f"ambiguous name in {folder}: {found[path.stem].name} and "
                                  f"{path.name} have the same stem")
        found[path.stem] = path
    return found


def detect_suffix(sr_stems: list[str], gt_stems: set[str]) -> str | None:
    """The output suffix shared by all of ``sr_stems`` when none of them is a GT stem and each is
    ``<GT stem>_<something>``: the shortest common ``_<something>``; None when there is none."""
    if not sr_stems or any(stem in gt_stems for stem in sr_stems):
        return None
    common: set[str] | None = None
    for stem in sr_stems:
        fits = {stem[cut:] for cut in range(1, len(stem) - 1)
                if stem[cut] == "_" and stem[:cut] in gt_stems}
        common = fits if common is None else common & fits
        if not common:
            return None
    return min(common, key=lambda s: (len(s), s))


def pair_by_name(sr_dir: Path, gt_dir: Path | None, sr_suffix: str = "") -> Pairing:
    """Pair the SR outputs in ``sr_dir`` with the GT images in ``gt_dir`` by the module's rule;
    ``sr_suffix``: inference's ``--suffix`` (``out`` or ``_out``), ``""`` to detect it. Raises
    EvaluationError when a folder is missing or nothing pairs."""
    sr = images_by_stem(sr_dir)
    panels = sorted(stem for stem in sr if stem.endswith(COMPARE_SUFFIX)
                    and stem[: -len(COMPARE_SUFFIX)] in sr)
    left_out = [sr.pop(stem).name for stem in panels]
    notes = [f"{len(panels)} comparison panel(s) (*{COMPARE_SUFFIX}) left out"] if panels else []
    gt = images_by_stem(gt_dir) if gt_dir is not None else None
    suffix = suffix_part(sr_suffix)
    if not suffix and gt is not None:
        suffix = detect_suffix(list(sr), set(gt)) or ""
        if suffix:
            notes.append(f"paired by the suffix {suffix!r}: every SR name is a GT name + {suffix!r} "
                         f"(metric.py --suffix {suffix[1:]})")
    if suffix:
        others = [stem for stem in sr if not stem.endswith(suffix)]
        left_out += [sr.pop(stem).name for stem in others]
        if others:
            notes.append(f"{len(others)} file(s) without the suffix {suffix!r} left out")
        sr = {stem[: -len(suffix)]: path for stem, path in sr.items()}
    if not sr:
        raise EvaluationError(f"no images in {sr_dir}" + (f" ending in {suffix!r}" if suffix else ""))
    if gt is None:
        return Pairing([(p, None) for p in sr.values()], [], [], left_out, notes)
    pairs = [(p, gt[s]) for s, p in sr.items() if s in gt]
    if not pairs:
        raise EvaluationError(f"no SR image in {sr_dir} has a GT of the same name in {gt_dir} "
                              f"(SR: {', '.join(p.name for p in sr.values())[:200]}); if outputs are named "
                              f"<GT name>_<suffix>, pass --suffix SUFFIX")
    return Pairing(pairs, [p.name for s, p in sr.items() if s not in gt],
                   [p.name for s, p in gt.items() if s not in sr], left_out, notes)
