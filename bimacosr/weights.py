"""The released weight files: where each comes from, where it goes, fetching and checking it.

``resolve_weight`` turns a configured path into an existing file or a ``MissingWeightsError`` that
says which file is missing, where it comes from, the exact path to put it at and the command that
fetches it. ``download`` fetches a file -- a direct URL with urllib, or a Google Drive file with
gdown -- into a temp file in the target folder (tqdm progress), checks that it loads as the right
kind of file (its key layout: a VQ autoencoder, an FP UNet, a BiMaCo UNet, a config), records its
size and sha256 in ``weights.lock.json`` beside it and renames it into place atomically. A file
already there is checked against that lock file instead (or, when the lock has no entry for it,
checked for its kind and recorded). No size or checksum has been published for any of these files,
so the lock records what this machine first downloaded.
"""
from __future__ import annotations

import http.client
import json
import os
import shlex
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bimacosr.atomic import atomic_write_text, file_digest, temp_path
from bimacosr.config import REPO_ROOT, resolve_config_path

__all__ = ["WeightFile", "RELEASED", "TARGETS", "WEIGHTS_DIR", "LOCK_NAME", "WeightsError",
           "MissingWeightsError", "DownloadError", "VerifyError", "Fetched", "get", "expand_targets",
           "kind_problem", "resolve_weight", "resolve_weights", "download", "fetch", "fetch_command", "read_lock"]

WEIGHTS_DIR = REPO_ROOT / "weights"
LOCK_NAME = "weights.lock.json"
BIMACOSR_REPO = "https://github.com/Kai-Liu001/BiMaCoSR"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   TimeoutError, ssl.SSLError)


@dataclass(frozen=True)
class WeightFile:
    """A released file. ``urls`` are direct downloads, tried in order; ``drive_id`` a Google Drive
    file id fetched with gdown when there is no URL. ``kind`` is what the file must hold: a
    ``bimacosr.checkpoint.state_dict_kind`` (``bimaco``, ``fp_unet``, ``autoencoder``) or
    ``config`` (a YAML mapping) or ``metric`` (a metric's weights, bimacosr/metric_weights.py).
    ``size`` (bytes) and ``sha256`` only where published. ``home`` is the folder it belongs in
    (default ``<repo>/weights``; the metric files: their library's cache)."""

    name: str
    what: str
    used_by: str
    kind: str
    urls: tuple[str, ...] = ()
    drive_id: str | None = None
    size: int | None = None
    sha256: str | None = None
    home: Path | None = None

    @property
    def folder(self) -> Path:
        """The folder it belongs in: ``home``, by default ``<repo>/weights``."""
        return self.home if self.home is not None else WEIGHTS_DIR

    @property
    def path(self) -> Path:
        """Where the code looks for it by default: ``folder / name``."""
        return self.folder / self.name

    @property
    def source(self) -> str:
        """Where it comes from, in words."""
        if self.urls:
            return " or ".join(self.urls)
        return (f"Google Drive file {self.drive_id} (https://drive.google.com/uc?id={self.drive_id}, "
                f"linked from the README of {BIMACOSR_REPO})")


_RESSHIFT = "https://github.com/zsyOAOA/ResShift/releases/download/v2.0/"
RELEASED: dict[str, WeightFile] = {f.name: f for f in (
    WeightFile("BiMaCoSR.pth", "BiMaCoSR binary one-step student",
               "inference_quant.py --ckpt", "bimaco", drive_id="1vh2hhHmvrz-LE0uqPXBk7mE8XZ_8W-NN"),
    WeightFile("BiMaCoSR.yaml", "the config released with BiMaCoSR.pth (configs/BiMaCoSR.yaml "
               "holds the same values; for reference only)", "nothing (optional)", "config",
               drive_id="1LZfQG4bNb0IGoCTtPgk1YwO7FciPhHpp"),
    WeightFile("resshift_realsrx4_s15_v1.pth", "full-precision ResShift x4 teacher (15 steps)",
               "main_distill.py (model.teacher_ckpt_path)", "fp_unet",
               urls=(_RESSHIFT + "resshift_realsrx4_s15_v1.pth",)),
    WeightFile("SinSR_v1.pth", "full-precision SinSR one-step model, the student init",
               "main_distill.py (quantparameter.train.pretained_model)", "fp_unet",
               urls=("https://github.com/wyf0912/SinSR/releases/download/v1.0/SinSR_v1.pth",)),
    WeightFile("autoencoder_vq_f4.pth", "VQ-f4 autoencoder", "every job (autoencoder.ckpt_path)",
               "autoencoder", urls=(_RESSHIFT + "autoencoder_vq_f4.pth",)),
)}

_INFERENCE = ("autoencoder_vq_f4.pth", "BiMaCoSR.pth")
TARGETS: dict[str, tuple[str, ...]] = {
    "inference": _INFERENCE,
    "train": _INFERENCE + ("resshift_realsrx4_s15_v1.pth", "SinSR_v1.pth"),
    "all": tuple(RELEASED),
}
"""Named sets of files: what ``inference_quant.py`` needs, what training adds, everything."""


class WeightsError(RuntimeError):
    """A weight file cannot be fetched or is not what it should be; the message says the fix."""


class DownloadError(WeightsError):
    """A download failed (network, HTTP status, size/checksum, wrong kind); nothing was left
    behind."""


class VerifyError(WeightsError):
    """A file already present is not what it should be (other bytes than the lock file records,
    or the wrong kind of file); it was left as it is."""


class MissingWeightsError(FileNotFoundError):
    """A weight file is not where the config says; the message says how to get it."""

    def __init__(self, message: str, path: Path, entry: WeightFile | None) -> None:
        super().__init__(message)
        self.path, self.entry = path, entry


@dataclass(frozen=True)
class Fetched:
    """The outcome of :func:`download`: the file's ``path`` and what was done: ``downloaded``,
    ``verified`` (present and equal to the lock entry) or ``recorded`` (present, of the right kind,
    not in the lock before)."""

    path: Path
    action: str


def get(name: str) -> WeightFile:
    """The registry entry for ``name`` (file name, with or without its extension)."""
    for entry in RELEASED.values():
        if name in (entry.name, Path(entry.name).stem):
            return entry
    raise KeyError(f"unknown weight file {name!r}; known: {', '.join(RELEASED)}")


def expand_targets(names: list[str]) -> list[str]:
    """Target names (``inference``, ``train``, ``all``) and file names -> file names, each once,
    in order. Raises ``KeyError`` naming the valid choices."""
    files: list[str] = []
    for name in names:
        if name in TARGETS:
            files += TARGETS[name]
        else:
            try:
                files.append(get(name).name)
            except KeyError:
                raise KeyError(f"unknown target or file {name!r}; targets: {', '.join(TARGETS)}; "
                               f"files: {', '.join(RELEASED)}") from None
    return list(dict.fromkeys(files))


def fetch_command(entries: WeightFile | list[WeightFile], dest_dir: Path | None = None) -> str:
    """The download_weights.py command line that puts ``entries`` (of one home folder) into
    ``dest_dir`` (default: their home)."""
    entries = [entries] if isinstance(entries, WeightFile) else entries
    same = dest_dir is None or Path(dest_dir).absolute() == entries[0].folder.absolute()
    dest = "" if same else f" --dest {shlex.quote(str(dest_dir))}"
    return f"python scripts/download_weights.py {' '.join(shlex.quote(e.name) for e in entries)}{dest}"


def resolve_weight(path_or_name: str | os.PathLike, *, what: str) -> Path:
    """Return the path when the file exists, else raise ``MissingWeightsError``.

    A bare released name (``SinSR_v1.pth``) not in the working directory means
    ``<repo>/weights/<name>``; other relative paths follow ``config.resolve_config_path`` (the
    working folder, then the repository root: config paths like ``weights/x.pth`` work from any
    folder). ``what`` names the role in the message, e.g. ``"autoencoder (autoencoder.ckpt_path)"``.
    """
    path = Path(path_or_name)
    if not path.is_file() and path.name in RELEASED and path.parent == Path("."):
        path = WEIGHTS_DIR / path.name
    if not path.is_file():
        path = resolve_config_path(path)  # config paths like weights/x.pth work from any working folder
    if path.is_file():
        return path
    entry = RELEASED.get(path.name)
    if entry is not None and path.parent == Path("weights"):
        path = WEIGHTS_DIR / path.name  # the configs' weights/<name>: the repository's folder
    lines = [f"{what}: weight file not found: {path.absolute()}"]
    if entry is not None:
        lines += [f"  this is {entry.name}: {entry.what}; used by {entry.used_by}",
                  f"  it comes from: {entry.source}",
                  f"  put it at:     {path.absolute()}",
                  f"  or run:        {fetch_command(entry, path.parent)}"]
    else:
        lines.append(f"  not a released file name ({', '.join(RELEASED)}); check the path")
    raise MissingWeightsError("\n".join(lines), path, entry)


def resolve_weights(wanted: dict[str, str | os.PathLike]) -> dict[str, Path]:
    """:func:`resolve_weight` for each ``{what: path}``; when several are missing, one
    ``MissingWeightsError`` lists them all, with one command that fetches every released one."""
    found, missing = {}, []
    for what, path in wanted.items():
        try:
            found[what] = resolve_weight(path, what=what)
        except MissingWeightsError as err:
            missing.append(err)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        lines = [f"{len(missing)} weight files not found:"]
        for err in missing:
            about = (f": {err.entry.what}, from {err.entry.source}" if err.entry is not None
                     else ": not a released file name; check the path")
            lines.append(f"  {err}".splitlines()[0].replace(": weight file not found: ", " -> ") + about)
        by_folder: dict[Path, list[WeightFile]] = {}
        for err in missing:
            if err.entry is not None:
                by_folder.setdefault(err.path.parent, []).append(err.entry)
        lines += [f"fetch them with:  {fetch_command(entries, folder)}" for folder, entries in by_folder.items()]
        raise MissingWeightsError("\n".join(lines), missing[0].path, missing[0].entry)
    return found


def _bar(desc: str, total: int | None, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not progress, dynamic_ncols=True)


def _stream(url: str, tmp: Path, desc: str, progress: bool) -> None:
    """Download ``url`` into ``tmp`` with a progress bar. Raises the network errors."""
    request = urllib.request.Request(url, headers={"User-Agent": "bimacosr-download"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        with _bar(desc, total, progress) as bar:
            while chunk := response.read(CHUNK):
                done += f.write(chunk)
                bar.update(len(chunk))
        if total is not None and done != total:
            raise http.client.IncompleteRead(b"", total - done)


def _cause(e: BaseException) -> str:
    """One line: the innermost reason of a chain of wrapped errors (requests -> urllib3 -> DNS)."""
    while True:
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException):
            inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
        if inner is None:
            return (str(e).splitlines() or [type(e).__name__])[0]
        e = inner


def _drive(entry: WeightFile, tmp: Path, progress: bool, by_hand: str) -> None:
    """Fetch ``entry.drive_id`` into ``tmp`` with gdown (imported only here)."""
    try:
        import gdown
    except ImportError:
        raise DownloadError(f"{entry.name} comes from Google Drive, which needs gdown "
                            f"(pip install gdown); or {by_hand}") from None
    bars: list[tqdm] = []  # opened at the first chunk, so a failed request shows no empty bar

    def advance(done: int, total: int | None) -> None:
        if not bars:
            bars.append(_bar(entry.name, total, progress))
        bars[0].update(done - bars[0].n)

    with open(tmp, "wb") as f:
        try:
            gdown.download(id=entry.drive_id, output=f, quiet=True, progress=advance,
                           timeout=TIMEOUT_S)
        except Exception as e:  # gdown raises assorted types (requests, its own, OSError)
            raise DownloadError(f"cannot download {entry.name} from Google Drive file "
                                f"{entry.drive_id} ({_cause(e)}). no network? {by_hand}") from None
        finally:
            for bar in bars:
                bar.close()


def _reason(e: Exception) -> str:
    """A one-line cause of a network error."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e) or type(e).__name__


def _check_published(entry: WeightFile, size: int, sha256: str) -> None:
    """Raise DownloadError when a published size or sha256 does not match."""
    if entry.size is not None and size != entry.size:
        raise DownloadError(f"{entry.name}: got {size} bytes, expected {entry.size}; "
                            "the download was discarded")
    if entry.sha256 is not None and sha256 != entry.sha256.lower():
        raise DownloadError(f"{entry.name}: sha256 mismatch: got {sha256}, expected "
                            f"{entry.sha256}; the download was discarded")


def kind_problem(entry: WeightFile, path: Path) -> str | None:
    """Why the file at ``path`` is not the kind ``entry`` says (None when it is): a weight file
    must read safely and have the key layout of ``entry.kind``; a config must be a YAML mapping
    with ``model`` and ``diffusion`` sections."""
    if entry.kind == "metric":
        from bimacosr.metric_weights import safety_problem

        return safety_problem(path, entry.sha256, entry.name)
    if entry.kind == "config":
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            return f"not a YAML file ({type(e).__name__})"
        if not isinstance(data, dict) or not {"model", "diffusion"} <= set(data):
            return "not a BiMaCoSR config (no model / diffusion sections)"
        return None
    # imported here: torch is not needed to list or fetch files
    from bimacosr.checkpoint import KIND_LABELS, CheckpointError, read_state_dict, state_dict_kind

    try:
        found = state_dict_kind(read_state_dict(path, what=entry.name))
    except CheckpointError as e:
        return str(e).splitlines()[0]
    if found != entry.kind:
        return f"it is a {KIND_LABELS[found]} file, not a {KIND_LABELS[entry.kind]}"
    return None


def read_lock(folder: Path) -> dict[str, dict]:
    """The lock file's entries ``{name: {"size", "sha256", "source"}}`` ({} when there is none)."""
    path = folder / LOCK_NAME
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
            raise ValueError("entry without size/sha256")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VerifyError(f"{path} is not a weights lock file ({e}); delete it, and the next run "
                          f"records the files present again") from None
    return files


def _record(folder: Path, entry: WeightFile, size: int, sha256: str) -> None:
    """Add or replace ``entry``'s line in the lock file (written atomically)."""
    files = read_lock(folder)
    files[entry.name] = {"size": size, "sha256": sha256, "source": entry.source}
    text = json.dumps({"comment": "sizes and sha256 of the weight files downloaded here "
                                  "(scripts/download_weights.py checks present files against them)",
                       "files": dict(sorted(files.items()))}, indent=2)
    atomic_write_text(folder / LOCK_NAME, text + "\n")


def _verify_present(entry: WeightFile, dest: Path) -> Fetched:
    """Check a present file against its lock entry, or (none yet) for its kind and record it."""
    refetch = f"fetch it again with: {fetch_command(entry, dest.parent)} --force"
    locked = read_lock(dest.parent).get(entry.name)
    size, sha256 = file_digest(dest)
    if locked is not None:
        if (size, sha256) != (locked["size"], locked["sha256"]):
            raise VerifyError(f"{dest} differs from what {dest.parent / LOCK_NAME} records "
                              f"(size {size} vs {locked['size']}, sha256 {sha256[:12]}... vs "
                              f"{str(locked['sha256'])[:12]}...): it changed after it was "
                              f"downloaded; {refetch}")
        return Fetched(dest, "verified")
    problem = kind_problem(entry, dest)
    if problem is not None:
        raise VerifyError(f"{dest} is not {entry.name} ({entry.what}): {problem}; move it away "
                          f"or {refetch}")
    _record(dest.parent, entry, size, sha256)
    return Fetched(dest, "recorded")


def download(name: str, dest_dir: str | os.PathLike | None = None, force: bool = False, *,
             progress: bool = True) -> Fetched:
    """Put the released file ``name`` at ``dest_dir/<name>`` (default ``<repo>/weights``); see
    :func:`fetch`."""
    return fetch(get(name), dest_dir, force, progress=progress)


def fetch(entry: WeightFile, dest_dir: str | os.PathLike | None = None, force: bool = False, *,
          progress: bool = True) -> Fetched:
    """Put ``entry`` at ``dest_dir/<name>`` (default: ``entry.home``).

    A present file is verified (see :class:`Fetched`) unless ``force``. A download appears only
    once complete, of the right kind and recorded in the lock file; on failure no partial file is
    left behind and a previous file is untouched. Raises ``DownloadError`` / ``VerifyError``.
    """
    folder = Path(dest_dir) if dest_dir is not None else entry.folder
    dest = folder / entry.name
    if dest.is_file() and not force:
        return _verify_present(entry, dest)
    by_hand = f"download it from {entry.source} by hand and put it at {dest.absolute()}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest, ".part")
    try:
        if entry.urls:
            errors = []
            for url in entry.urls:
                try:
                    _stream(url, tmp, entry.name, progress)
                    break
                except _NETWORK_ERRORS as e:
                    errors.append(f"{url}: {_reason(e)}")
            else:
                raise DownloadError(f"cannot download {entry.name} ({'; '.join(errors)}). "
                                    f"no network? {by_hand}")
        else:
            _drive(entry, tmp, progress, by_hand)
        size, sha256 = file_digest(tmp)
        _check_published(entry, size, sha256)
        problem = kind_problem(entry, tmp)
        if problem is not None:
            raise DownloadError(f"the file downloaded as {entry.name} from {entry.source} is not "
                                f"{entry.what}: {problem}; it was discarded")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _record(folder, entry, size, sha256)
    return Fetched(dest, "downloaded")
