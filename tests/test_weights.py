"""Weights registry, downloader, kind check and lock file, all offline: a local HTTP server on
127.0.0.1, a fake urlopen, a fake gdown."""
import hashlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bimacosr import weights
from bimacosr.config import REPO_ROOT
from bimacosr.weights import DownloadError, MissingWeightsError, VerifyError, WeightFile
from tests.conftest import REPO
from tests.loopback import Server

# The smallest state dicts that look like each kind (checkpoint.state_dict_kind).
LAYOUTS = {
    "autoencoder": ("encoder.conv_in.weight", "quantize.embedding.weight"),
    "fp_unet": ("input_blocks.0.0.weight", "time_embed.0.weight"),
    "bimaco": ("input_blocks.1.0.in_layers.2.lora.A.weight", "time_embed.0.weight"),
}


def checkpoint_bytes(kind: str, value: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    torch.save({key: torch.full((2, 2), value) for key in LAYOUTS[kind]}, buffer)
    return buffer.getvalue()


def serve(monkeypatch, server: Server, name: str, body: bytes, kind: str, **kwargs) -> WeightFile:
    """Register ``name`` (of ``kind``) as served by ``server`` with ``body``."""
    server.files[f"/{name}"] = body
    entry = WeightFile(name, "a test file", "tests", kind, urls=(f"{server.url}/{name}",), **kwargs)
    monkeypatch.setitem(weights.RELEASED, name, entry)
    return entry


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def lock(folder: Path) -> dict:
    return json.loads((folder / weights.LOCK_NAME).read_text())["files"]


def test_registry_targets_and_no_invented_checksums():
    assert set(weights.RELEASED) == {"BiMaCoSR.pth", "BiMaCoSR.yaml", "resshift_realsrx4_s15_v1.pth",
                                     "SinSR_v1.pth", "autoencoder_vq_f4.pth"}
    assert weights.WEIGHTS_DIR == REPO_ROOT / "weights" and weights.WEIGHTS_DIR.is_absolute()
    for entry in weights.RELEASED.values():
        assert entry.path == REPO_ROOT / "weights" / entry.name
        assert entry.sha256 is None and entry.size is None
        assert all(url.endswith("/" + entry.name) for url in entry.urls)
        assert bool(entry.urls) != bool(entry.drive_id)
    assert weights.RELEASED["BiMaCoSR.pth"].drive_id == "1vh2hhHmvrz-LE0uqPXBk7mE8XZ_8W-NN"
    assert weights.RELEASED["BiMaCoSR.yaml"].drive_id == "1LZfQG4bNb0IGoCTtPgk1YwO7FciPhHpp"
    assert {e.name: e.kind for e in weights.RELEASED.values()} == {
        "BiMaCoSR.pth": "bimaco", "BiMaCoSR.yaml": "config", "resshift_realsrx4_s15_v1.pth": "fp_unet",
        "SinSR_v1.pth": "fp_unet", "autoencoder_vq_f4.pth": "autoencoder"}
    assert weights.get("SinSR_v1") is weights.RELEASED["SinSR_v1.pth"]
    with pytest.raises(KeyError, match="known: BiMaCoSR.pth"):
        weights.get("nope.pth")


def test_target_expansion():
    expand = weights.expand_targets
    assert expand(["inference"]) == ["autoencoder_vq_f4.pth", "BiMaCoSR.pth"]
    assert expand(["train"]) == ["autoencoder_vq_f4.pth", "BiMaCoSR.pth", "resshift_realsrx4_s15_v1.pth",
                                 "SinSR_v1.pth"]
    assert sorted(expand(["all"])) == sorted(weights.RELEASED)
    assert expand(["SinSR_v1", "inference", "BiMaCoSR.pth", "SinSR_v1.pth"]) == [
        "SinSR_v1.pth", "autoencoder_vq_f4.pth", "BiMaCoSR.pth"]
    with pytest.raises(KeyError, match="unknown target or file 'infer'; targets: inference, train, all"):
        expand(["infer"])


@pytest.mark.parametrize("name", ["resshift_realsrx4_s15_v1.pth", "autoencoder_vq_f4.pth",
                                  "SinSR_v1.pth"])
def test_missing_file_message(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_weight(f"weights/{name}", what="the teacher")
    msg = str(info.value)
    # the configs' weights/<name> means the repository's weights folder, from any working folder
    assert msg.startswith(f"the teacher: weight file not found: {weights.WEIGHTS_DIR / name}")
    assert weights.RELEASED[name].urls[0] in msg
    assert msg.endswith(f"python scripts/download_weights.py {name}")
    assert isinstance(info.value, FileNotFoundError) and info.value.entry.name == name


def test_missing_file_elsewhere_and_bimacosr_and_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "repo_weights")
    with pytest.raises(MissingWeightsError, match="SinSR_v1.pth --dest ckpts$"):
        weights.resolve_weight("ckpts/SinSR_v1.pth", what="student init")
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_weight("BiMaCoSR.pth", what="--ckpt")  # bare name -> <repo>/weights/
    msg = str(info.value)
    assert "Google Drive file 1vh2hhHmvrz-LE0uqPXBk7mE8XZ_8W-NN" in msg
    assert str(tmp_path / "repo_weights" / "BiMaCoSR.pth") in msg
    assert msg.endswith("python scripts/download_weights.py BiMaCoSR.pth")
    with pytest.raises(MissingWeightsError, match="not a released file name") as info:
        weights.resolve_weight("mine.pth", what="--ckpt")
    assert info.value.entry is None


def test_resolve_existing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "repo_weights")
    (tmp_path / "repo_weights").mkdir()
    (tmp_path / "repo_weights" / "SinSR_v1.pth").write_bytes(b"x")
    assert weights.resolve_weight("SinSR_v1.pth", what="x") == tmp_path / "repo_weights" / "SinSR_v1.pth"
    (tmp_path / "other.pth").write_bytes(b"x")
    assert weights.resolve_weight(tmp_path / "other.pth", what="x") == tmp_path / "other.pth"


def test_download_over_http_records_then_verifies_then_detects_tampering(tmp_path, monkeypatch, server):
    body = checkpoint_bytes("autoencoder")
    serve(monkeypatch, server, "vq.pth", body, "autoencoder")
    dest = tmp_path / "w"
    fetched = weights.download("vq.pth", dest, progress=False)
    assert fetched == weights.Fetched(dest / "vq.pth", "downloaded")
    assert fetched.path.read_bytes() == body and leftovers(dest) == []
    assert lock(dest) == {"vq.pth": {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                                     "source": f"{server.url}/vq.pth"}}
    assert weights.download("vq.pth", dest, progress=False).action == "verified"
    assert server.requests == 1  # a present file is not fetched again
    fetched.path.write_bytes(checkpoint_bytes("autoencoder", 2.0))  # same size, other bytes
    with pytest.raises(VerifyError) as info:
        weights.download("vq.pth", dest, progress=False)
    msg = str(info.value)
    assert f"{dest / 'vq.pth'} differs from what {dest / weights.LOCK_NAME} records" in msg
    assert msg.endswith(f"python scripts/download_weights.py vq.pth --dest {dest} --force")
    assert weights.download("vq.pth", dest, force=True).action == "downloaded"  # with a bar
    assert fetched.path.read_bytes() == body and server.requests == 2
    assert weights.download("vq.pth", dest, progress=False).action == "verified"


def test_wrong_kind_download_is_refused_and_removed(tmp_path, monkeypatch, server):
    serve(monkeypatch, server, "vq.pth", checkpoint_bytes("fp_unet"), "autoencoder")
    serve(monkeypatch, server, "student.pth", b"<html>quota exceeded</html>", "bimaco")
    dest = tmp_path / "w"
    with pytest.raises(DownloadError, match="is a FP Swin-UNet .* file, not a VQ-f4 autoencoder; "
                                            "it was discarded"):
        weights.download("vq.pth", dest, progress=False)
    with pytest.raises(DownloadError, match="corrupt, truncated or not a weight file.*discarded"):
        weights.download("student.pth", dest, progress=False)
    assert list(dest.iterdir()) == []  # no file, no temp file, no lock


def test_present_file_without_lock_entry(tmp_path, monkeypatch, server):
    serve(monkeypatch, server, "teacher.pth", b"unused", "fp_unet")
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "teacher.pth").write_bytes(checkpoint_bytes("bimaco"))
    with pytest.raises(VerifyError, match="is not teacher.pth .*: it is a BiMaCo .* file, not a FP "
                                          "Swin-UNet .*move it away or fetch it again"):
        weights.download("teacher.pth", dest, progress=False)
    assert (dest / "teacher.pth").is_file() and not (dest / weights.LOCK_NAME).exists()
    (dest / "teacher.pth").write_bytes(checkpoint_bytes("fp_unet"))
    assert weights.download("teacher.pth", dest, progress=False).action == "recorded"
    assert weights.download("teacher.pth", dest, progress=False).action == "verified"
    assert server.requests == 0
    (dest / weights.LOCK_NAME).write_text("{not json")
    with pytest.raises(VerifyError, match="is not a weights lock file .*delete it"):
        weights.download("teacher.pth", dest, progress=False)


@pytest.mark.parametrize("bad", [{"sha256": "0" * 64}, {"size": 5}])
def test_published_checksum_failure_keeps_nothing(tmp_path, monkeypatch, server, bad):
    serve(monkeypatch, server, "vq.pth", checkpoint_bytes("autoencoder"), "autoencoder", **bad)
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "vq.pth").write_bytes(b"old")
    with pytest.raises(DownloadError, match="sha256 mismatch|expected 5") as info:
        weights.download("vq.pth", dest, force=True, progress=False)
    assert "discarded" in str(info.value)
    assert (dest / "vq.pth").read_bytes() == b"old" and leftovers(dest) == []


def test_offline_failure_message_and_nothing_left(tmp_path, monkeypatch, server):
    entry = serve(monkeypatch, server, "vq.pth", b"", "autoencoder")
    server.close()  # nothing listens there any more: connection refused
    with pytest.raises(DownloadError) as info:
        weights.download("vq.pth", tmp_path / "w", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "refused" in msg.lower()
    assert (f"no network? download it from {entry.urls[0]} by hand and put it at "
            f"{tmp_path / 'w' / 'vq.pth'}") in msg
    assert list((tmp_path / "w").iterdir()) == []


def test_truncated_stream_is_a_download_error(tmp_path, monkeypatch):
    monkeypatch.setitem(weights.RELEASED, "vq.pth", WeightFile("vq.pth", "x", "tests", "autoencoder",
                                                               urls=("https://example.invalid/vq.pth",)))

    class Response(io.BytesIO):
        headers = {"Content-Length": "1010"}

    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda *a, **k: Response(b"x" * 1000))
    with pytest.raises(DownloadError, match="10 more expected.*no network"):
        weights.download("vq.pth", tmp_path / "w", progress=False)
    assert list((tmp_path / "w").iterdir()) == []


def test_drive_files_come_through_gdown(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # import fails
    with pytest.raises(DownloadError, match=r"needs gdown \(pip install gdown\); or download it from "
                                            r"Google Drive file 1vh2"):
        weights.download("BiMaCoSR.pth", tmp_path, progress=False)
    calls = []
    body = checkpoint_bytes("bimaco")

    def fake_download(*, id, output, quiet, progress, timeout):
        calls.append(id)
        half = len(body) // 2
        output.write(body[:half])
        progress(half, len(body))
        output.write(body[half:])
        progress(len(body), len(body))
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    fetched = weights.download("BiMaCoSR.pth", tmp_path / "w", progress=False)
    assert fetched.action == "downloaded" and fetched.path.read_bytes() == body
    assert calls == ["1vh2hhHmvrz-LE0uqPXBk7mE8XZ_8W-NN"] and leftovers(tmp_path / "w") == []
    assert lock(tmp_path / "w")["BiMaCoSR.pth"]["sha256"] == hashlib.sha256(body).hexdigest()

    def offline(**kwargs):
        kwargs["output"].write(b"partial")
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=offline))
    with pytest.raises(DownloadError, match="cannot download BiMaCoSR.yaml from Google Drive file "
                                            "1LZfQG.*Failed to resolve.*no network"):
        weights.download("BiMaCoSR.yaml", tmp_path / "v", progress=False)
    assert list((tmp_path / "v").iterdir()) == []


def test_config_kind(tmp_path):
    entry = weights.RELEASED["BiMaCoSR.yaml"]
    (tmp_path / "a.yaml").write_text((REPO / "configs/BiMaCoSR.yaml").read_text())
    assert weights.kind_problem(entry, tmp_path / "a.yaml") is None
    (tmp_path / "b.yaml").write_text("<html><body>Google Drive - Virus scan warning</body></html>\n")
    assert "not a BiMaCoSR config" in weights.kind_problem(entry, tmp_path / "b.yaml")


def run_script(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/download_weights.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow  # four and three fresh processes of the script (torch imported in each)
def test_script_targets_exit_status_and_lock(tmp_path):
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "autoencoder_vq_f4.pth").write_bytes(checkpoint_bytes("autoencoder"))
    (dest / "BiMaCoSR.pth").write_bytes(checkpoint_bytes("bimaco"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = run_script("inference", "--dest", dest, cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"autoencoder_vq_f4.pth: present, recorded in weights.lock.json: {dest / 'autoencoder_vq_f4.pth'}",
        f"BiMaCoSR.pth: present, recorded in weights.lock.json: {dest / 'BiMaCoSR.pth'}"]
    second = run_script("inference", "--dest", dest, cwd=elsewhere)
    assert second.returncode == 0 and second.stdout.count("present, matches weights.lock.json") == 2
    (dest / "BiMaCoSR.pth").write_bytes(b"tampered")
    third = run_script("inference", "--dest", dest, cwd=elsewhere)
    assert third.returncode == 1 and "Traceback" not in third.stderr
    assert f"error: {dest / 'BiMaCoSR.pth'} differs from" in third.stderr and "--force" in third.stderr
    assert run_script("nope.pth", cwd=elsewhere).returncode == 2


def test_script_list_resolves_against_the_repository(tmp_path):
    result = run_script("--list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()
             if line and not line.startswith((" ", "targets:"))}
    assert {k: v for k, v in lines.items() if k in weights.RELEASED} == {
        name: str(REPO_ROOT / "weights" / name) for name in weights.RELEASED}
    assert "LPIPS_v0.1_alex-df73285e.pth" in lines and "RN50.pt" in lines  # and the metric files
    assert weights.RELEASED["autoencoder_vq_f4.pth"].urls[0] in result.stdout
    assert "inference = autoencoder_vq_f4.pth + BiMaCoSR.pth" in result.stdout


def test_every_missing_file_of_a_run_in_one_error(tmp_path, monkeypatch, smoke_config):
    from omegaconf import OmegaConf

    from bimacosr.build import inference_files

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.merge(smoke_config, {"autoencoder": {"ckpt_path": "w/autoencoder_vq_f4.pth"}})
    with pytest.raises(MissingWeightsError) as info:
        inference_files(cfg, "w/BiMaCoSR.pth")
    lines = str(info.value).splitlines()
    assert lines[0] == "2 weight files not found:"
    assert lines[1].startswith(f"  denoiser checkpoint (--ckpt) -> {tmp_path / 'w/BiMaCoSR.pth'}: BiMaCoSR")
    assert lines[2].startswith(f"  autoencoder (autoencoder.ckpt_path) -> {tmp_path / 'w/autoencoder_vq_f4.pth'}")
    assert lines[3:] == ["fetch them with:  python scripts/download_weights.py BiMaCoSR.pth autoencoder_vq_f4.pth --dest w"]


@pytest.mark.slow  # four and three fresh processes of the script (torch imported in each)
def test_script_list_verifies_and_an_unwritable_dest_is_one_line(tmp_path):
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "autoencoder_vq_f4.pth").write_bytes(checkpoint_bytes("autoencoder"))
    (dest / "SinSR_v1.pth").write_bytes(checkpoint_bytes("fp_unet"))
    assert run_script("autoencoder_vq_f4.pth", "--dest", dest, cwd=tmp_path).returncode == 0  # recorded
    (dest / "autoencoder_vq_f4.pth").write_bytes(checkpoint_bytes("autoencoder")[:100])  # truncated later
    listing = {line.split()[0]: line for line in run_script("--list", "--dest", dest, cwd=tmp_path).stdout.splitlines()}
    assert "DIFFERS from the lock file" in listing["autoencoder_vq_f4.pth"]
    assert " unverified " in listing["SinSR_v1.pth"] and " missing " in listing["BiMaCoSR.pth"]
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    result = run_script("SinSR_v1.pth", "--dest", blocked / "sub", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
