"""Metric weight files (bimacosr/metric_weights.py) without internet: a loopback server stands in for
the hosts (BIMACOSR_METRIC_URL_BASE). Download, a cut transfer, a changed file, the offline message,
and pickled files that would run code, refused wherever they come from."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from bimacosr.metric_weights import URL_BASE_ENV, MetricFile, metric_hub, prepare, safety_problem
from tests.conftest import REPO
from tests.loopback import Server
from tests.metric_layouts import saved, served_files

LPIPS = MetricFile("pyiqa", "LPIPS_v0.1_alex-df73285e.pth")
ALEXNET = MetricFile("torchvision", "alexnet-owt-7be5be79.pth")
NIQE = MetricFile("pyiqa", "niqe_modelparameters.mat")
MANIQA = MetricFile("pyiqa", "MANIQA_PIPAL-ae6d356b.pth")


class RunsCode:
    """Unpickling this creates ``path``: the stand-in for a weight file that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def pickled_marker(path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"params": RunsCode(path)}, buffer)
    return buffer.getvalue()


def serve_lpips_and_niqe(server: Server) -> None:
    """AlexNet (torchvision layout), LPIPS's own file and NIQE's parameters, random values."""
    server.files.update({f"/{name}": body for name, body in served_files(["lpips", "niqe"]).items()})


@pytest.fixture
def hub(tmp_path, monkeypatch, server):
    """A fresh torch hub (TORCH_HOME) and the metric URLs pointing at the loopback server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(URL_BASE_ENV, server.url)
    return tmp_path / "torch" / "hub"


def test_download_records_and_then_verifies(hub, server):
    serve_lpips_and_niqe(server)
    first = prepare([LPIPS, NIQE], progress=False)
    assert first.problems == {} and first.found[LPIPS] == hub / "pyiqa" / LPIPS.name
    assert first.found[LPIPS].read_bytes() == server.files[f"/{LPIPS.name}"]
    lock = json.loads((hub / "pyiqa" / "weights.lock.json").read_text())["files"]
    assert set(lock) == {LPIPS.name, NIQE.name} and lock[LPIPS.name]["source"] == f"{server.url}/{LPIPS.name}"
    requests = server.requests
    assert prepare([LPIPS, NIQE], progress=False).problems == {} and server.requests == requests  # cached


def test_cut_transfer_leaves_no_file(hub, server):
    serve_lpips_and_niqe(server)
    server.short[f"/{LPIPS.name}"] = 1000  # announces 1000 bytes more than it sends
    result = prepare([LPIPS], progress=False)
    assert "cannot download" in result.problems[LPIPS] and "download_weights.py" in result.problems[LPIPS]
    assert not (hub / "pyiqa").exists() or os.listdir(hub / "pyiqa") == []


def test_changed_cached_file_is_refused(hub, server):
    serve_lpips_and_niqe(server)
    prepare([LPIPS], progress=False)
    (hub / "pyiqa" / LPIPS.name).write_bytes(saved({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}))
    problem = prepare([LPIPS], progress=False).problems[LPIPS]
    assert "differs from what" in problem and "--force" in problem


def test_offline_message_names_url_destination_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(URL_BASE_ENV)  # the real URLs, which --offline never contacts
    result = prepare([LPIPS, ALEXNET], offline=True)
    assert result.found == {}
    assert result.problems[ALEXNET] == (
        f"{ALEXNET.name} is not cached and --offline: it comes from "
        f"https://download.pytorch.org/models/{ALEXNET.name} and goes to "
        f"{tmp_path / 'torch/hub/checkpoints' / ALEXNET.name}; fetch it with: "
        f"python scripts/download_weights.py {ALEXNET.name}")
    assert "huggingface.co" in result.problems[LPIPS]


def test_pickles_that_run_code_are_refused_from_anywhere(hub, server, tmp_path):
    marker = tmp_path / "MARKER"
    server.files[f"/{MANIQA.name}"] = pickled_marker(marker)
    served = prepare([MANIQA], progress=False).problems[MANIQA]  # a download
    assert "loading it could run code" in served and "GLOBAL posix.system" in served
    assert not (hub / "pyiqa" / MANIQA.name).exists()
    given = tmp_path / "given"
    given.mkdir()
    (given / MANIQA.name).write_bytes(pickled_marker(marker))
    assert "refused" in prepare([MANIQA], given, progress=False).problems[MANIQA]  # --weights_dir
    (hub / "pyiqa").mkdir(parents=True, exist_ok=True)
    (hub / "pyiqa" / MANIQA.name).write_bytes(pickled_marker(marker))
    assert "could run code" in prepare([MANIQA], progress=False).problems[MANIQA]  # already cached
    assert safety_problem(given / MANIQA.name) is not None
    with metric_hub({}), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(given / MANIQA.name, weights_only=False)  # what pyiqa asks for, made safe
    assert not marker.exists()


def _metric_py(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "metric.py"), *map(str, args)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("metric_folders")
    photo = data.astronaut()[:128, 128:256]
    for sub, image in (("gt", photo), ("sr", photo[:, ::-1])):
        (root / sub).mkdir()
        Image.fromarray(np.ascontiguousarray(image)).save(root / sub / "a.png")
    return root


SCORED = ["psnr", "ssim", "lpips", "dists", "niqe", "musiq"]
BUILT_ONLY = ["maniqa-pipal", "fid"]  # MANIQA scores ~80 s an image on 2 cores; FID's sqrtm of 2048² minutes


@pytest.mark.slow
def test_metric_py_fetches_and_scores_in_a_fresh_cache(folders, tmp_path, server):
    """Every file downloaded from the loopback server into a fresh cache, checked, recorded, and
    the metrics built from them: six score in metric.py, MANIQA and FID are built in-process.
    CLIP's RN50 is a TorchScript archive accepted only with the sha256 its URL publishes, so no
    stand-in can be served (see test_clip_archive_needs_its_published_sha256)."""
    from bimacosr.evaluation import _build, preflight

    server.files.update({f"/{name}": body for name, body in served_files(SCORED + BUILT_ONLY).items()})
    env = {"TORCH_HOME": str(tmp_path / "torch"), URL_BASE_ENV: server.url}
    args = ["--inp_imgs", folders / "sr", "--gt_imgs", folders / "gt", "--metrics", *SCORED]
    first = _metric_py(*args, "--log", tmp_path / "one", env=env)
    assert first.returncode == 0, first.stderr
    scores = json.loads((tmp_path / "one/metrics_summary.json").read_text())
    assert scores["skipped"] == [] and "niqe" not in scores["notes"]  # NIQE from the served file
    values = scores["folders"][0]["scores"]
    assert set(values) == set(SCORED) and all(math.isfinite(v) for v in values.values()), values
    second = _metric_py(*args, "--log", tmp_path / "two", "--offline", env=env)  # from the cache
    assert second.returncode == 0 and json.loads((tmp_path / "two/metrics_summary.json").read_text())[
        "folders"][0]["scores"] == values
    assert not list((tmp_path / "torch/hub").glob("*/.*.part")) and not list(Path("/tmp").glob("bimacosr-metric-hub-*"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        skipped, found = preflight(BUILT_ONLY, True, None, progress=False)
        assert skipped == [] and len(found) == 2
        with metric_hub(found):
            assert all(_build(name, torch.device("cpu"), {}, found) is not None for name in BUILT_ONLY)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_clip_archive_needs_its_published_sha256(tmp_path):
    archive = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)  # TorchScript: not plain tensors
    assert safety_problem(archive) is not None
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert safety_problem(archive, digest) is None and safety_problem(archive, "0" * 64) is not None


@pytest.mark.slow
def test_metric_py_never_runs_a_pickled_weight_file(folders, tmp_path):
    marker, given = tmp_path / "MARKER", tmp_path / "W"
    given.mkdir()
    (given / MANIQA.name).write_bytes(pickled_marker(marker))
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    args = ["--inp_imgs", folders / "sr", "--log", tmp_path / "log", "--metrics", "maniqa"]
    with_dir = _metric_py(*args, "--weights_dir", given, env=env)
    assert with_dir.returncode == 0, with_dir.stderr
    assert "maniqa-pipal skipped: refused" in with_dir.stdout and not marker.exists()
    assert not (tmp_path / "torch").exists() or not any((tmp_path / "torch").rglob(MANIQA.name))  # no link left
    (tmp_path / "torch/hub/pyiqa").mkdir(parents=True)
    (tmp_path / "torch/hub/pyiqa" / MANIQA.name).write_bytes(pickled_marker(marker))
    cached = _metric_py(*args, env=env)
    assert cached.returncode == 0 and "could run code" in cached.stdout and not marker.exists()
