"""The released weight files: where each comes from, where it goes, and fetching it.

``resolve_weight`` turns a configured path into an existing file or a ``MissingWeightsError`` that
says which file is missing, where it comes from, the exact path to put it at and the command that
fetches it. ``download`` streams a file with urllib into a temp file in the target folder (tqdm
progress), checks size/sha256 where published, then renames it into place atomically. No size or
checksum has been published for any of these files, so none is checked: they stay ``None``.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import shlex
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bimacosr.config import REPO_ROOT

__all__ = ["WeightFile", "RELEASED", "WEIGHTS_DIR", "MissingWeightsError", "DownloadError",
           "get", "resolve_weight", "download"]

WEIGHTS_DIR = Path("weights")  # relative to the working directory, like the config's paths
BIMACOSR_REPO = "https://github.com/Kai-Liu001/BiMaCoSR"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   TimeoutError, ssl.SSLError)


@dataclass(frozen=True)
class WeightFile:
    """A released file. ``urls`` are direct downloads, tried in order (empty when there is none:
    then ``page`` says where to get it by hand). ``size`` (bytes) and ``sha256`` only where
    published."""

    name: str
    urls: tuple[str, ...]
    what: str
    used_by: str
    page: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def path(self) -> Path:
        """Where the code looks for it by default: ``weights/<name>``."""
        return WEIGHTS_DIR / self.name

    @property
    def source(self) -> str:
        """The URL(s) it comes from, or the page that links to it."""
        return " or ".join(self.urls) if self.urls else f"{self.page} (no direct URL known)"


_RESSHIFT = "https://github.com/zsyOAOA/ResShift/releases/download/v2.0/"
RELEASED: dict[str, WeightFile] = {f.name: f for f in (
    WeightFile("BiMaCoSR.pth", (), "BiMaCoSR binary one-step student (its config: "
               "configs/BiMaCoSR.yaml, same values as the released one)",
               "inference_quant.py --ckpt / model.ckpt_path",
               page=f"the Google Drive link in the README of {BIMACOSR_REPO}"),
    WeightFile("resshift_realsrx4_s15_v1.pth", (_RESSHIFT + "resshift_realsrx4_s15_v1.pth",),
               "full-precision ResShift x4 teacher (15 steps)",
               "main_distill.py (model.teacher_ckpt_path)"),
    WeightFile("SinSR_v1.pth", ("https://github.com/wyf0912/SinSR/releases/download/v1.0/"
                                "SinSR_v1.pth",),
               "full-precision SinSR one-step model, the student init",
               "main_distill.py (quantparameter.train.pretained_model)"),
    WeightFile("autoencoder_vq_f4.pth", (_RESSHIFT + "autoencoder_vq_f4.pth",),
               "VQ-f4 autoencoder", "every job (autoencoder.ckpt_path)"),
)}


class MissingWeightsError(FileNotFoundError):
    """A weight file is not where the config says; the message says how to get it."""

    def __init__(self, message: str, path: Path, entry: WeightFile | None) -> None:
        super().__init__(message)
        self.path, self.entry = path, entry


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, size/checksum); nothing was left behind."""


def get(name: str) -> WeightFile:
    """The registry entry for ``name`` (file name, with or without its extension)."""
    for entry in RELEASED.values():
        if name in (entry.name, Path(entry.name).stem):
            return entry
    raise KeyError(f"unknown weight file {name!r}; known: {', '.join(RELEASED)}")


def _fetch_command(entry: WeightFile, dest_dir: Path) -> str:
    """The download_weights.py command line that puts ``entry`` into ``dest_dir``."""
    dest = "" if dest_dir == WEIGHTS_DIR else f" --dest {shlex.quote(str(dest_dir))}"
    drive = "" if entry.urls else " --drive_id <id from that link> (needs: pip install gdown)"
    return f"python scripts/download_weights.py {entry.name}{dest}{drive}"


def resolve_weight(path_or_name: str | os.PathLike, *, what: str) -> Path:
    """Return the path when the file exists, else raise ``MissingWeightsError``.

    A bare released name (``SinSR_v1.pth``) not in the working directory means
    ``weights/<name>``; a relative path not found from the working directory is tried from the
    repository root. ``what`` names the role in
    the message, e.g. ``"autoencoder (autoencoder.ckpt_path)"``.
    """
    path = Path(path_or_name)
    if not path.is_file() and path.name in RELEASED and path.parent == Path("."):
        path = WEIGHTS_DIR / path.name
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # config paths like weights/x.pth work from any working folder
    if path.is_file():
        return path
    entry = RELEASED.get(path.name)
    lines = [f"{what}: weight file not found: {path.absolute()}"]
    if entry is not None:
        lines += [f"  this is {entry.name}: {entry.what}; used by {entry.used_by}",
                  f"  it comes from: {entry.source}",
                  f"  put it at:     {path.absolute()}",
                  f"  or run:        {_fetch_command(entry, path.parent)}"]
    else:
        lines.append(f"  not a released file name ({', '.join(RELEASED)}); check the path")
    raise MissingWeightsError("\n".join(lines), path, entry)


def _stream(url: str, tmp: Path, desc: str, progress: bool) -> None:
    """Download ``url`` into ``tmp`` with a progress bar. Raises the network errors."""
    request = urllib.request.Request(url, headers={"User-Agent": "bimacosr-download"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                done += f.write(chunk)
                bar.update(len(chunk))
        if total is not None and done != total:
            raise http.client.IncompleteRead(b"", total - done)


def _drive(drive_id: str, tmp: Path, by_hand: str) -> None:
    """Fetch a Google Drive file id into ``tmp`` with gdown (optional dependency)."""
    try:
        import gdown
    except ImportError:
        raise DownloadError(f"--drive_id needs gdown (pip install gdown); or {by_hand}") from None
    cause = "no file came back"
    try:
        if gdown.download(url=f"https://drive.google.com/uc?id={drive_id}", output=str(tmp),
                          quiet=False) is not None and tmp.is_file():
            return
    except Exception as e:  # gdown raises assorted types (requests, its own, OSError)
        cause = str(e) or type(e).__name__
    raise DownloadError(f"gdown could not fetch Drive id {drive_id} ({cause}); {by_hand}")


def _digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def _reason(e: Exception) -> str:
    """A one-line cause of a network error."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e) or type(e).__name__


def _check(entry: WeightFile, size: int, sha256: str) -> None:
    """Raise DownloadError when a published size or sha256 does not match."""
    if entry.size is not None and size != entry.size:
        raise DownloadError(f"{entry.name}: got {size} bytes, expected {entry.size}; "
                            "the download was discarded")
    if entry.sha256 is not None and sha256 != entry.sha256.lower():
        raise DownloadError(f"{entry.name}: sha256 mismatch: got {sha256}, expected "
                            f"{entry.sha256}; the download was discarded")


def download(name: str, dest_dir: str | os.PathLike = WEIGHTS_DIR, force: bool = False, *,
             drive_id: str | None = None, progress: bool = True) -> Path:
    """Fetch a released file to ``dest_dir/<name>`` and return that path.

    An existing file is kept unless ``force``. ``drive_id`` fetches from Google Drive with gdown
    instead of the registry URLs (the only way to script the BiMaCoSR checkpoint). The file
    appears only once complete and verified; on failure no partial file is left behind.
    """
    entry = get(name)
    dest = Path(dest_dir) / entry.name
    if dest.is_file() and not force:
        return dest
    where = " or ".join(entry.urls) if entry.urls else f"it from {entry.page}"
    by_hand = f"download {where} by hand and put it at {dest.absolute()}"
    if drive_id is None and not entry.urls:
        raise DownloadError(f"{entry.name} has no direct URL: {by_hand}, or run "
                            f"{_fetch_command(entry, Path(dest_dir))}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        if drive_id is not None:
            _drive(drive_id, tmp, by_hand)
        else:
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
        _check(entry, *_digest(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
