"""The weight files of the paper's metrics: where they come from, fetching them into the caches pyiqa
uses, and handing them to pyiqa so that no file can run code (docs/pipeline.md §7.4).

pyiqa, torchvision and CLIP each fetch their files on first use into a folder under
``torch.hub.get_dir()`` (:func:`cache_dirs`). This module does the same, from the URL the library
itself uses (read from the installed library at run time, :func:`url_of`), through the project's
downloader (``bimacosr.weights.fetch``: progress bar, temp name then rename, size and sha256 in
``weights.lock.json`` beside the file). Every file is checked before pyiqa sees it
(:func:`safety_problem`): a ``.pth`` must load with ``torch.load(weights_only=True)``, a ``.mat``
with scipy (which runs no code), and CLIP's TorchScript archive must have the sha256 its URL
publishes. pyiqa loads some files with ``weights_only=False``; :func:`metric_hub` builds the
metrics with every ``torch.load`` forced to ``weights_only=True`` and with a per-run cache folder of
links to the checked files, removed afterwards, so nothing a run is given changes a later run.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bimacosr.atomic import file_digest
from bimacosr.weights import LOCK_NAME, DownloadError, WeightFile, WeightsError, fetch, fetch_command, read_lock

__all__ = ["URL_BASE_ENV", "MetricFile", "Prepared", "cache_dirs", "metric_files", "metric_hub", "prepare",
           "safety_problem", "status", "url_of"]

URL_BASE_ENV = "BIMACOSR_METRIC_URL_BASE"
"""Tests only: fetch every metric file from ``$BIMACOSR_METRIC_URL_BASE/<file name>`` (a loopback
server) instead of its library's URL."""


def cache_dirs() -> dict[str, Path]:
    """Where each library keeps its weights (all under ``torch.hub.get_dir()``)."""
    hub = Path(torch.hub.get_dir())
    return {"pyiqa": hub / "pyiqa", "torchvision": hub / "checkpoints", "clip": hub / "clip"}


def _torchvision_url(name: str) -> str:
    """The URL of torchvision's weights whose file name is ``name`` (e.g. vgg16-397923af.pth)."""
    from torchvision.models import get_model_weights, list_models

    for model in list_models():
        for weights in get_model_weights(model):
            if weights.url.rsplit("/", 1)[-1] == name:
                return weights.url
    raise KeyError(f"torchvision has no weights file named {name}")


def url_of(location: str, name: str) -> str:
    """The URL the library of ``location`` (pyiqa, torchvision, clip) fetches ``name`` from."""
    base = os.environ.get(URL_BASE_ENV)
    if base:
        return f"{base.rstrip('/')}/{name}"
    if location == "pyiqa":
        from pyiqa.archs.arch_util import get_url_from_name

        return get_url_from_name(name)
    if location == "torchvision":
        return _torchvision_url(name)
    from pyiqa.archs.clip_model import _MODELS

    return _MODELS[Path(name).stem]


@dataclass(frozen=True)
class MetricFile:
    """One weight file of a metric: the library cache it belongs in and its file name."""

    location: str
    name: str

    @property
    def path(self) -> Path:
        """Its place in the library's cache."""
        return cache_dirs()[self.location] / self.name

    def entry(self) -> WeightFile:
        """The downloader's registry entry: URL from the library; the sha256 where the URL
        publishes one (CLIP's files, ``.../<sha256>/RN50.pt``)."""
        url = url_of(self.location, self.name)
        digest = url.rsplit("/", 2)[-2] if self.location == "clip" and URL_BASE_ENV not in os.environ else None
        return WeightFile(self.name, f"{self.location} weights of a metric", "metric.py", "metric",
                          urls=(url,), sha256=digest, home=cache_dirs()[self.location])


def safety_problem(path: Path, sha256: str | None = None, name: str | None = None) -> str | None:
    """Why ``path`` cannot be handed to pyiqa without the risk of running code (None: it can).

    ``.mat``: scipy reads it (no code). Anything else must load with ``torch.load(weights_only=True)``
    (tensors and containers only), or be exactly the file whose ``sha256`` its URL publishes
    (CLIP's TorchScript archives). ``name``: the file's own name when ``path`` is a temp name."""
    if Path(name or path.name).suffix == ".mat":
        import scipy.io

        try:
            scipy.io.loadmat(path)
        except Exception as err:  # noqa: BLE001 -- any failure: not a MATLAB file
            return f"not a MATLAB .mat file ({type(err).__name__})"
        return None
    if sha256 is not None and file_digest(path)[1] == sha256.lower():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4 ..." on foreign pickles
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no copy in memory
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:  # noqa: BLE001 -- pickle, zip and type errors alike
        if isinstance(err, pickle.UnpicklingError):
            lines = [line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()]
            return f"it is not plain tensors: loading it could run code ({(lines or ['a pickle'])[0][:160]})"
        return f"it does not read as a weights file ({type(err).__name__}: {str(err)[:120]})"
    return None


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` found: the checked file of each metric file, and per metric file
    that is not usable, one line saying why and how to fix it."""

    found: dict[MetricFile, Path]
    problems: dict[MetricFile, str]


def _check_given(path: Path, sha256: str | None) -> str | None:
    """A file from ``--weights_dir``: its lock entry there if any, else the safety check."""
    try:
        locked = read_lock(path.parent).get(path.name)
    except WeightsError as err:
        return str(err)
    if locked is not None and file_digest(path) != (locked["size"], locked["sha256"]):
        return (f"{path} differs from what {path.parent / LOCK_NAME} records for it (sha256 "
                f"{str(locked['sha256'])[:12]}...): it changed after it was recorded")
    problem = safety_problem(path, sha256)
    return None if problem is None else f"refused {path}: {problem}"


def prepare(files: list[MetricFile], weights_dir: Path | None = None, offline: bool = False,
            progress: bool = True) -> Prepared:
    """Find, fetch and check each file.

    A file named like it in ``weights_dir`` is used as it is (checked, never copied or linked
    into the cache); else the cached file, checked against the cache's lock file (or checked
    and recorded there); else it is downloaded into the cache, unless ``offline``. Nothing is
    raised: problems come back per file, with the URL, the destination and the fetch command.
    """
    found, problems = {}, {}
    for file in dict.fromkeys(files):
        try:
            entry: WeightFile | None = file.entry()
        except (KeyError, ImportError) as err:
            entry, no_url = None, f"no URL known for {file.name} ({err})"
        given = weights_dir / file.name if weights_dir is not None else None
        if given is not None and given.is_file():
            problem = _check_given(given, entry.sha256 if entry is not None else None)
            if problem is None:
                found[file] = given
            else:
                problems[file] = problem
            continue
        if entry is None:
            problems[file] = no_url
            continue
        if offline and not file.path.is_file():
            problems[file] = (f"{file.name} is not cached and --offline: it comes from {entry.urls[0]} "
                              f"and goes to {file.path}; fetch it with: {fetch_command(entry)}")
            continue
        try:
            found[file] = fetch(entry, progress=progress).path
        except DownloadError as err:
            problems[file] = f"{err}; or fetch it later with: {fetch_command(entry)}"
        except WeightsError as err:
            problems[file] = str(err)
    return Prepared(found, problems)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block reads tensors and containers only, whatever its caller
    asks for (pyiqa passes ``weights_only=False``)."""
    load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return load(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = load


@contextlib.contextmanager
def metric_hub(found: dict[MetricFile, Path]) -> Iterator[Path]:
    """Build metrics in this block: ``torch.hub`` (and pyiqa's cache) point at a temporary folder
    holding links to the checked files only, and every ``torch.load`` is weights-only. The
    folder and its links are removed at the end; the real caches are not touched."""
    import pyiqa.archs.clip_model as pyiqa_clip
    import pyiqa.utils.download_util as pyiqa_download

    # torch.hub._hub_dir stays None while get_dir() follows $TORCH_HOME: restored as it was
    old_hub, old_pyiqa, old_clip = torch.hub._hub_dir, pyiqa_download.DEFAULT_CACHE_DIR, pyiqa_clip._download
    checked_clip = {f.name: path for f, path in found.items() if f.location == "clip"}

    def clip_download(url: str, root: str) -> str:
        """pyiqa's CLIP loader re-hashes its file and downloads again on a mismatch, past these
        checks: give it the checked file instead (or fail, never fetch)."""
        name = url.rsplit("/", 1)[-1]
        if name not in checked_clip:
            raise RuntimeError(f"CLIP weights {name} were not prepared")
        return str(checked_clip[name])

    with tempfile.TemporaryDirectory(prefix="bimacosr-metric-hub-") as tmp:
        hub = Path(tmp)
        for location in ("pyiqa", "checkpoints", "clip"):
            (hub / location).mkdir()
        folder = {"pyiqa": "pyiqa", "torchvision": "checkpoints", "clip": "clip"}
        for file, path in found.items():
            (hub / folder[file.location] / file.name).symlink_to(path.resolve())
        torch.hub.set_dir(str(hub))
        pyiqa_download.DEFAULT_CACHE_DIR = str(hub / "pyiqa")
        pyiqa_clip._download = clip_download
        try:
            with _weights_only_loads():
                yield hub
        finally:
            torch.hub._hub_dir = old_hub
            pyiqa_download.DEFAULT_CACHE_DIR = old_pyiqa
            pyiqa_clip._download = old_clip


def metric_files(names: list[str] | None = None) -> list[MetricFile]:
    """The weight files of the metrics ``names`` (``evaluation.METRICS`` keys; default all), each
    once, in order."""
    from bimacosr.evaluation import METRICS  # the metric table lives with the metrics

    specs = [METRICS[n] for n in (names if names is not None else METRICS)]
    return list(dict.fromkeys(MetricFile(where, name) for spec in specs for where, name in spec.weights))


def status(entry: WeightFile, path: Path) -> str:
    """``missing``, ``verified`` (equal to its lock entry), ``unverified`` (no lock entry) or
    ``DIFFERS from the lock file`` (changed or truncated after it was recorded)."""
    if not path.is_file():
        return "missing"
    try:
        locked = read_lock(path.parent).get(entry.name)
    except WeightsError:
        return f"unverified ({LOCK_NAME} unreadable)"
    if locked is None:
        return "unverified"
    return "verified" if file_digest(path) == (locked["size"], locked["sha256"]) else "DIFFERS from the lock file"
