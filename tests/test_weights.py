"""Weights registry and downloader, all offline: file:// URLs, a fake urlopen, a fake gdown."""
import hashlib
import io
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import pytest

from bimacosr import weights
from bimacosr.weights import DownloadError, MissingWeightsError, WeightFile
from tests.conftest import REPO

PAYLOAD = b"not really a checkpoint" * 1000


def fake_entry(monkeypatch, tmp_path: Path, **kwargs) -> WeightFile:
    """Register 'fake.pth' served from a local file:// URL."""
    src = tmp_path / "served" / "fake.pth"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    kwargs.setdefault("urls", (src.as_uri(),))
    entry = WeightFile("fake.pth", what="a test file", used_by="tests", **kwargs)
    monkeypatch.setitem(weights.RELEASED, entry.name, entry)
    return entry


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_registry_has_the_released_files_and_no_invented_checksums():
    assert set(weights.RELEASED) == {"BiMaCoSR.pth", "resshift_realsrx4_s15_v1.pth",
                                     "SinSR_v1.pth", "autoencoder_vq_f4.pth"}
    for entry in weights.RELEASED.values():
        assert entry.path == Path("weights") / entry.name
        assert entry.sha256 is None and entry.size is None
        assert all(url.endswith("/" + entry.name) for url in entry.urls)
    assert weights.RELEASED["BiMaCoSR.pth"].urls == ()
    assert weights.get("SinSR_v1") is weights.RELEASED["SinSR_v1.pth"]
    with pytest.raises(KeyError, match="known: BiMaCoSR.pth"):
        weights.get("nope.pth")


@pytest.mark.parametrize("name", ["resshift_realsrx4_s15_v1.pth", "autoencoder_vq_f4.pth",
                                  "SinSR_v1.pth"])
def test_missing_file_message(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_weight(f"weights/{name}", what="the teacher")
    msg = str(info.value)
    assert msg.startswith(f"the teacher: weight file not found: {tmp_path / 'weights' / name}")
    assert weights.RELEASED[name].urls[0] in msg
    assert str(tmp_path / "weights" / name) in msg
    assert msg.endswith(f"python scripts/download_weights.py {name}")
    assert isinstance(info.value, FileNotFoundError) and info.value.entry.name == name


def test_missing_file_elsewhere_and_bimacosr_and_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match="SinSR_v1.pth --dest ckpts$"):
        weights.resolve_weight("ckpts/SinSR_v1.pth", what="student init")
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_weight("BiMaCoSR.pth", what="--ckpt")  # bare name -> weights/
    msg = str(info.value)
    assert "Google Drive link in the README of https://github.com/Kai-Liu001/BiMaCoSR" in msg
    assert str(tmp_path / "weights" / "BiMaCoSR.pth") in msg
    assert "download_weights.py BiMaCoSR.pth --drive_id" in msg and "pip install gdown" in msg
    with pytest.raises(MissingWeightsError, match="not a released file name") as info:
        weights.resolve_weight("mine.pth", what="--ckpt")
    assert info.value.entry is None


def test_resolve_existing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "SinSR_v1.pth").write_bytes(b"x")
    assert weights.resolve_weight("SinSR_v1.pth", what="x") == Path("weights/SinSR_v1.pth")
    (tmp_path / "other.pth").write_bytes(b"x")
    assert weights.resolve_weight(tmp_path / "other.pth", what="x") == tmp_path / "other.pth"


def test_download_file_url_verified_atomic(tmp_path, monkeypatch):
    fake_entry(monkeypatch, tmp_path, size=len(PAYLOAD),
               sha256=hashlib.sha256(PAYLOAD).hexdigest().upper())
    renames = []
    real_replace = weights.os.replace
    monkeypatch.setattr(weights.os, "replace", lambda a, b: (renames.append((Path(a), Path(b))),
                                                             real_replace(a, b)))
    dest = tmp_path / "w"
    path = weights.download("fake", dest, progress=False)
    assert path == dest / "fake.pth" and path.read_bytes() == PAYLOAD
    [(src, dst)] = renames
    assert dst == path and src.parent == dest and src.name.startswith(".fake.pth.")
    assert leftovers(dest) == []
    path.write_bytes(b"kept")
    assert weights.download("fake", dest, progress=False).read_bytes() == b"kept"
    assert weights.download("fake", dest, force=True).read_bytes() == PAYLOAD  # with a bar


@pytest.mark.parametrize("bad", [{"sha256": "0" * 64}, {"size": 5}])
def test_verification_failure_keeps_nothing(tmp_path, monkeypatch, bad):
    fake_entry(monkeypatch, tmp_path, **bad)
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "fake.pth").write_bytes(b"old")
    with pytest.raises(DownloadError, match="sha256 mismatch|expected 5") as info:
        weights.download("fake.pth", dest, force=True, progress=False)
    assert "discarded" in str(info.value)
    assert (dest / "fake.pth").read_bytes() == b"old" and leftovers(dest) == []


def test_network_failure_message(tmp_path, monkeypatch):
    fake_entry(monkeypatch, tmp_path, urls=("http://127.0.0.1:9/fake.pth",))
    def refuse(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    monkeypatch.setattr(weights.urllib.request, "urlopen", refuse)
    with pytest.raises(DownloadError) as info:
        weights.download("fake.pth", tmp_path / "w", progress=False)
    msg = str(info.value)
    assert "Connection refused" in msg
    assert ("no network? download http://127.0.0.1:9/fake.pth by hand and put it at "
            f"{tmp_path / 'w' / 'fake.pth'}") in msg
    assert leftovers(tmp_path / "w") == [] and not (tmp_path / "w" / "fake.pth").exists()


def test_truncated_stream_is_a_download_error(tmp_path, monkeypatch):
    fake_entry(monkeypatch, tmp_path, urls=("https://example.invalid/fake.pth",))

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(PAYLOAD) + 10)}

    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: Response(PAYLOAD))
    with pytest.raises(DownloadError, match="10 more expected.*no network"):
        weights.download("fake.pth", tmp_path / "w", progress=False)
    assert list((tmp_path / "w").iterdir()) == []


def test_bimacosr_needs_a_drive_id_and_gdown(tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="no direct URL.*README of https://github.com/Kai-Liu"):
        weights.download("BiMaCoSR.pth", tmp_path)
    monkeypatch.setitem(sys.modules, "gdown", None)  # import fails
    with pytest.raises(DownloadError, match=r"pip install gdown\); or download it from"):
        weights.download("BiMaCoSR.pth", tmp_path, drive_id="abc")
    calls = []

    def fake_download(url, output, quiet):
        calls.append(url)
        Path(output).write_bytes(PAYLOAD)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    assert weights.download("BiMaCoSR.pth", tmp_path, drive_id="abc").read_bytes() == PAYLOAD
    assert calls == ["https://drive.google.com/uc?id=abc"] and leftovers(tmp_path) == []


def run_script(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/download_weights.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_script_list_and_failure(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "SinSR_v1.pth").write_bytes(b"x" * 2**20)
    result = run_script("--list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
             if not line.startswith(" ")}
    assert lines == {"BiMaCoSR.pth": "missing", "resshift_realsrx4_s15_v1.pth": "missing",
                     "SinSR_v1.pth": "present", "autoencoder_vq_f4.pth": "missing"}
    assert "present (1.0 MiB)" in result.stdout
    assert weights.RELEASED["autoencoder_vq_f4.pth"].urls[0] in result.stdout
    result = run_script("BiMaCoSR.pth", cwd=tmp_path)
    assert result.returncode == 1
    assert "by hand and put it at" in result.stderr and "Traceback" not in result.stderr
    assert run_script("nope.pth", cwd=tmp_path).returncode == 2
