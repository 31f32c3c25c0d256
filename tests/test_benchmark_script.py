"""The benchmark scripts (scripts/benchmark*.py): benchmark.py's Real-ESRGAN row, benchmark_unet.py's
twins and CPU line, benchmark_conv.py's shapes and routes."""
import importlib.util
import json
import sys

import pytest
import torch

from bimacosr.cpu import describe
from bimacosr.models.layers import nnpack_available
from tests.conftest import REPO


def load_script(name: str):
    """scripts/<name>.py as a module (not run)."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_realesrgan_runs_as_a_pipeline_and_the_table_compares_with_it():
    bench = load_script("benchmark")
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


def test_unet_benchmark_twins_run_their_base_model_with_one_kernel_switched_off(monkeypatch):
    """scripts/benchmark_unet.py: a twin (``*_torch_attention``, ``*_torch_norm``) times (and
    profiles) its base variant's model with that kernel's switch set to ``torch`` during its own
    steps only."""
    import os

    from bimacosr import kernels

    bench = load_script("benchmark_unet")
    assert bench.twin_of("deploy_bf16_torch_norm") == ("deploy_bf16", kernels.NORM_ENV)
    assert bench.twin_of("fp_bf16_torch_attention") == ("fp_bf16", kernels.ATTENTION_ENV)
    assert bench.twin_of("deploy_bf16") == ("deploy_bf16", None)
    assert {"fp_bf16_torch_norm", "deploy_bf16_torch_attention"} <= set(bench.VARIANTS)
    seen: list[tuple[str | None, str | None]] = []

    class Model(torch.nn.Module):
        def forward(self, x, t, lq):
            seen.append((os.environ.get(kernels.NORM_ENV), os.environ.get(kernels.ATTENTION_ENV)))
            return x

    model = Model()
    built = []
    monkeypatch.setattr(bench, "build_variants", lambda names: built.extend(names) or
                        {n: (model, None) for n in names})
    monkeypatch.delenv(kernels.NORM_ENV, raising=False)
    monkeypatch.delenv(kernels.ATTENTION_ENV, raising=False)
    result = bench.run(["deploy_bf16", "deploy_bf16_torch_norm", "deploy_bf16_torch_attention"], 8, 3, 1)
    assert set(result["variants"]) == {"deploy_bf16", "deploy_bf16_torch_norm", "deploy_bf16_torch_attention"}
    assert built == ["deploy_bf16", "deploy_bf16_torch_norm", "deploy_bf16_torch_attention"]
    # the warm-up in order, then 3 rounds rotated: the (norm, attention) switches each step saw
    order = built
    ran = order + [n for r in range(3) for n in order[r:] + order[:r]]
    want = {"deploy_bf16": (None, None), "deploy_bf16_torch_norm": ("torch", None),
            "deploy_bf16_torch_attention": (None, "torch")}
    assert seen == [want[n] for n in ran]
    seen.clear()
    bench.profile("deploy_bf16_torch_attention", 8, 1, 5)  # --profile: warm-up and profiled step alike
    assert seen == [(None, "torch")] * 2
    assert os.environ.get(kernels.NORM_ENV) is None and os.environ.get(kernels.ATTENTION_ENV) is None


def test_the_benchmarks_name_the_cpu_first_and_in_their_json(monkeypatch, capsys, tmp_path):
    """Every figure a benchmark prints or writes carries the machine it came from (bimacosr.cpu.describe)."""
    bench = load_script("benchmark_unet")
    monkeypatch.setattr(bench, "run", lambda *a: {"threads": 2, "variants": {}})
    monkeypatch.setattr(sys, "argv", ["benchmark_unet.py", "--variants", "fp32", "--json", str(tmp_path / "u.json")])
    bench.main()
    assert capsys.readouterr().out.splitlines()[0] == describe() and describe().startswith("CPU: ")
    assert json.loads((tmp_path / "u.json").read_text())["cpu"] == describe()


def test_the_convolution_benchmark_times_the_autoencoders_own_shapes_on_every_route():
    """scripts/benchmark_conv.py: the 3x3 convolutions of one encode + decode (40 of them, by shape),
    each route computing the same convolution (within its rounding), timed interleaved."""
    bench = load_script("benchmark_conv")
    shapes = bench.conv_shapes(16)
    assert sum(shapes.values()) == 40 and (512, 512, 4, 4) in shapes and (128, 128, 16, 16) in shapes
    assert {(cin, h) for cin, _, h, _ in shapes} >= {(128, 16), (256, 8), (512, 4), (512, 8), (256, 16)}  # Upsamples'
    jobs = bench.route_jobs(64, 32, 12, 10, list(bench.ROUTES))
    with torch.inference_mode():
        out = {r: job().float().contiguous() for r, job in jobs.items()}
    assert out["fp32"].shape == (1, 32, 12, 10) and out["fp32"].abs().max() > 0.1

    def rel_rms(a: torch.Tensor) -> float:
        return ((a.double() - out["fp32"].double()).square().mean() / out["fp32"].double().square().mean()).sqrt().item()

    assert rel_rms(out["fp32-fast"]) < 2e-5 and rel_rms(out["bf16"]) < 2e-2  # float32's, bf16's rounding
    assert torch.equal(out["fp32-fast"], out["fp32"]) != nnpack_available()  # NNPACK's result where it runs
