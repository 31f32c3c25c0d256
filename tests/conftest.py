"""Shared test setup: the reference folder (one place), the `slow` tier, and a tiny-model kit.

Tiers: ``python -m pytest -q -m "not slow"`` is the everyday run; ``python -m pytest -q`` runs
everything (CI, README). A test is marked ``slow`` only when it is an end-to-end run (torchrun,
CLI subprocesses beyond the first few, training runs) or an optimisation loop.

Kit (session-scoped, built once, shared; treat them as read-only):
``smoke_config``, ``smoke_assets`` (``configs/smoke.yaml``'s random weights and photographs,
written once; copy them with ``smoke_assets.copy_to(dest)`` before writing next to them),
``tiny_fp_denoiser``, ``tiny_bimaco_denoiser``, ``tiny_vq``, ``tiny_pipeline`` (the smoke models
with the smoke weights, in eval mode), and ``fixture_denoiser(relpath)`` (a reference fixture's
model with its weights, and the fixture data); ``compiled_run`` (a model under dynamo, and its
recompile warnings).
"""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

torch.set_num_threads(max(2, torch.get_num_threads()))
# No test reaches the internet: metric weight downloads go to a closed loopback port (refused at
# once) unless a test serves them itself (tests/loopback.py). Subprocesses inherit this.
os.environ.setdefault("BIMACOSR_METRIC_URL_BASE", "http://127.0.0.1:9")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("BIMACOSR_REFERENCE", REPO.parent / "shared" / "reference"))
FIXTURES = REFERENCE / "fixtures"
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


def pytest_report_header(config) -> str:
    """The machine in the header (shown without ``-q``): float32 rounding and kernel paths depend on it."""
    from bimacosr.cpu import describe

    return f"{describe()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels)"


@pytest.fixture
def server():
    """A file server on 127.0.0.1 (tests/loopback.py), closed after the test."""
    from tests.loopback import Server

    running = Server()
    yield running
    running.close()


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference folder not found at {REFERENCE}; set BIMACOSR_REFERENCE")
    return REFERENCE


def load_fixture(relpath: str) -> dict:
    return torch.load(FIXTURES / relpath, map_location="cpu", weights_only=True)


def fixture_denoiser(relpath: str) -> tuple[torch.nn.Module, dict]:
    """A reference fixture's denoiser (built from its ``config``, its weights loaded, eval mode)
    and the fixture data."""
    from bimacosr.models import build_denoiser

    data = load_fixture(relpath)
    model = build_denoiser(data["config"])
    model.load_state_dict(data["state_dict"])
    return model.eval(), data


def animation(path: Path, values: tuple[int, ...] = (10, 120, 240)) -> Path:
    """Write a GIF of one grey 8x6 frame per value at ``path``; returns ``path``."""
    from PIL import Image

    frames = [Image.fromarray(np.full((6, 8), v, np.uint8)) for v in values]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def compiled_run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``torch.compile(model, backend="eager")(x)`` under inference mode (dynamo only: the same ops
    as eager mode) and the recompile warnings dynamo logged meanwhile."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            out = torch.compile(model, backend="eager")(x)
    finally:
        logger.removeHandler(handler)
        torch._dynamo.reset()
    return out, [r.getMessage() for r in records if "recompile" in r.getMessage()]


# -- tiny-model kit: configs/smoke.yaml --------------------------------------------------------
@dataclass(frozen=True)
class SmokeAssets:
    """What ``write_smoke_assets`` wrote under ``root`` (the folder the smoke config's relative
    paths start from). Shared by the whole session: never write under ``root``."""

    root: Path
    weights: dict[str, Path]  # role (teacher, sinsr, student, autoencoder) -> absolute path

    def copy_to(self, dest: Path) -> Path:
        """A private copy of the assets (``dest/data/smoke/...``) to run CLIs in; returns ``dest``."""
        shutil.copytree(self.root / "data", dest / "data", dirs_exist_ok=True)
        return dest


@pytest.fixture(scope="session")
def smoke_config() -> DictConfig:
    """``configs/smoke.yaml``, read-only (load your own copy to change it)."""
    from bimacosr.config import load_config

    cfg = load_config(SMOKE_CONFIG)
    OmegaConf.set_readonly(cfg, True)
    return cfg


@pytest.fixture(scope="session")
def smoke_assets(tmp_path_factory, smoke_config) -> SmokeAssets:
    from bimacosr.smoke import write_smoke_assets

    root = tmp_path_factory.mktemp("smoke_assets")
    return SmokeAssets(root, write_smoke_assets(smoke_config, root))


def _loaded(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    from bimacosr.checkpoint import load_state_dict_into

    load_state_dict_into(model, path)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_fp_denoiser(smoke_config, smoke_assets) -> torch.nn.Module:
    """The smoke FP teacher UNet with the smoke teacher weights."""
    from bimacosr import build

    return _loaded(build.build_denoiser_from_config(smoke_config, "teacher"), smoke_assets.weights["teacher"])


@pytest.fixture(scope="session")
def tiny_bimaco_denoiser(smoke_config, smoke_assets) -> torch.nn.Module:
    """The smoke BiMaCo (binarized) student with the smoke student weights."""
    from bimacosr import build

    return _loaded(build.build_denoiser_from_config(smoke_config, "student"), smoke_assets.weights["student"])


@pytest.fixture(scope="session")
def tiny_vq(smoke_config, smoke_assets) -> torch.nn.Module:
    """The smoke VQ-f4 autoencoder with the smoke weights."""
    from bimacosr import build

    return _loaded(build.build_autoencoder(smoke_config, weights=False), smoke_assets.weights["autoencoder"])


@pytest.fixture(scope="session")
def tiny_pipeline(smoke_config, tiny_bimaco_denoiser, tiny_vq):
    """``SRPipeline`` of the smoke student, autoencoder and schedule (one step)."""
    from bimacosr import build
    from bimacosr.pipeline import SRPipeline

    schedule = build.build_schedule(smoke_config)
    return SRPipeline(tiny_bimaco_denoiser, tiny_vq, schedule, sf=schedule.sf)


KERNEL_FLAGS_ENV = "BIMACOSR_TEST_KERNEL_FLAGS"  # extra compiler flags of a kernel test build (tests/deploy/test_kernel.py)


@pytest.fixture(scope="session")
def fused() -> None:
    """The compiled C++ kernels (bimacosr.kernels; built once per session, cached on disk), with the
    test build's extra flags where the other-path test asks for them; skips where they cannot build."""
    from bimacosr import kernels

    kernels.FLAGS.extend(os.environ.get(KERNEL_FLAGS_ENV, "").split())
    if not kernels.available():
        pytest.skip(kernels.status())
