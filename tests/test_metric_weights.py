"""Metric weight files (bimacosr/metric_weights.py) without internet: a loopback server stands in for
the hosts (BIMACOSR_METRIC_URL_BASE). Download, a cut transfer, a changed file, the offline message,
and pickled files that would run code, refused wherever they come from."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from skimage import data

from bimacosr.metric_weights import URL_BASE_ENV, MetricFile, metric_hub, prepare, safety_problem
from tests.conftest import REPO
from tests.loopback import Server, server  # noqa: F401 -- the fixture

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


def views_of_one_buffer(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes, all views of one 64 k-element buffer (overlapping rows):
    a state dict of any size that saves in ~256 kB. The values only have to load."""
    buffer = torch.randn(1 << 16, generator=torch.Generator().manual_seed(seed)) * 0.02
    out = {}
    for key, shape in shapes.items():
        inner = math.prod(shape[1:])
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        if shape and math.prod(shape) > buffer.numel():
            strides[0] = (buffer.numel() - inner) // max(shape[0] - 1, 1)
        out[key] = buffer.as_strided(shape, strides)
    return out


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def serve_lpips_and_niqe(server: Server) -> None:
    """AlexNet (torchvision layout), LPIPS's linear heads and NIQE's parameters, random values."""
    from torchvision.models import alexnet

    with torch.device("meta"):
        layout = {k: v.shape for k, v in alexnet().state_dict().items()}
    server.files[f"/{ALEXNET.name}"] = saved(views_of_one_buffer(layout, 0))
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    server.files[f"/{LPIPS.name}"] = saved(heads)
    params = np.load(REPO / "bimacosr/assets/niqe_pris_params.npz")
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
    server.files[f"/{NIQE.name}"] = mat.getvalue()


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


@pytest.mark.slow
def test_metric_py_fetches_and_scores_in_a_fresh_cache(folders, tmp_path, server):
    serve_lpips_and_niqe(server)
    env = {"TORCH_HOME": str(tmp_path / "torch"), URL_BASE_ENV: server.url}
    args = ["--inp_imgs", folders / "sr", "--gt_imgs", folders / "gt", "--metrics", "psnr", "lpips", "niqe"]
    first = _metric_py(*args, "--log", tmp_path / "one", env=env)
    assert first.returncode == 0, first.stderr
    scores = json.loads((tmp_path / "one/metrics_summary.json").read_text())
    assert scores["skipped"] == [] and "niqe" not in scores["notes"]  # NIQE from the served file
    values = scores["folders"][0]["scores"]
    assert set(values) == {"psnr", "lpips", "niqe"} and all(math.isfinite(v) for v in values.values())
    second = _metric_py(*args, "--log", tmp_path / "two", "--offline", env=env)  # from the cache
    assert second.returncode == 0 and json.loads((tmp_path / "two/metrics_summary.json").read_text())[
        "folders"][0]["scores"] == values
    assert not list((tmp_path / "torch/hub").glob("*/*.part")) and not list(Path("/tmp").glob("bimacosr-metric-hub-*"))


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
