"""scripts/benchmark.py's Real-ESRGAN row: the x4plus network runs as a pipeline, and the table
says how many times slower each variant is than it."""
import importlib.util

import pytest
import torch

from tests.conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_realesrgan_runs_as_a_pipeline_and_the_table_compares_with_it():
    bench = load_benchmark()
    torch.manual_seed(0)
    esr = bench.RealESRGAN(torch.device("cpu"), autocast=None)
    assert sum(p.numel() for p in esr.denoiser.parameters()) == 16_697_987  # RRDBNet x4plus, 23 blocks
    sr = esr(torch.rand(1, 3, 8, 12))
    assert sr.shape == (1, 3, 32, 48) and 0 <= sr.min() and sr.max() <= 1
    stages = dict.fromkeys(bench.STAGES, 0.0)
    rows = [{"variant": v, "lr": 64, "precision": "fp32", **stages, "total": total, "unet": total,
             "min": {"total": total}, "max": {"total": total}, "cpu": {"total": total},
             "vs_sinsr": None, "times_realesrgan": total / 0.5} for v, total in (("deploy", 1.5), ("realesrgan", 0.5))]
    lines = bench.table(rows).splitlines()
    assert lines[0].endswith("| total / Real-ESRGAN |")
    assert lines[2].endswith("| 3.00x |") and lines[3].endswith("| 1.00x |")
