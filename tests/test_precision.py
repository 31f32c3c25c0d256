"""--precision: parsing, what ``auto`` resolves to on each device, and a bf16 run through the
pipeline of a deploy model (every deploy layer under autocast)."""
import pytest
import torch

import inference_quant
from bimacosr import build
from bimacosr.inference import plan
from tests.conftest import REPO


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not build.native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert build.native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert build.native_bf16(cpuinfo)
    assert not build.native_bf16(tmp_path / "missing")  # no /proc (macOS, sandbox): fp32


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32-fast")])
def test_auto_on_cpu_uses_bf16_only_where_native(monkeypatch, smoke_config, native, expected):
    monkeypatch.setattr(build, "native_bf16", lambda: native)
    prec = build.resolve_precision("auto", torch.device("cpu"), smoke_config)
    assert prec.name == expected and prec.autoencoder_dtype == torch.float32
    assert prec.autocast == (torch.bfloat16 if native else None)
    assert prec.fast_float32 == (not native)
    assert build.resolve_precision("auto", torch.device("meta"), smoke_config).name == "fp32"  # CPU-only forms


def test_auto_on_cuda_follows_the_original_fp16_autoencoder(smoke_config):
    from omegaconf import OmegaConf
    cuda = torch.device("cuda")
    assert build.resolve_precision("auto", cuda, smoke_config) == build.Precision("fp16", torch.float16, None)
    cfg = OmegaConf.merge(smoke_config, {"autoencoder": {"use_fp16": False}})
    assert build.resolve_precision("auto", cuda, cfg).name == "fp32"


def test_explicit_precisions_and_refusals():
    cpu = torch.device("cpu")
    assert build.resolve_precision("bf16", cpu) == build.Precision("bf16", torch.float32, torch.bfloat16,
                                                                   torch.channels_last)
    assert build.resolve_precision("bf16", torch.device("cuda")).autoencoder_format == torch.contiguous_format
    assert build.resolve_precision("fp32", cpu) == build.Precision("fp32", torch.float32, None)
    assert build.resolve_precision("fp32-fast", cpu) == build.Precision("fp32-fast", torch.float32, None,
                                                                        fast_float32=True)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*bf16 or fp32"):
        build.resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="must be one of"):
        build.resolve_precision("int8", cpu)


def test_cli_precision_flag_and_fp32_alias(smoke_assets, tmp_path, monkeypatch):
    root = smoke_assets.copy_to(tmp_path)
    monkeypatch.chdir(root)  # the smoke config's relative weight paths resolve here
    base = ["-i", "lr", "-o", "out", "--config", str(REPO / "configs/smoke.yaml"),
            "--ckpt", str(smoke_assets.weights["student"])]
    assert plan(inference_quant.parse_args(base + ["--precision", "bf16"])).precision == "bf16"
    assert plan(inference_quant.parse_args(base + ["--precision", "bf16", "--fp32"])).precision == "fp32"
    assert plan(inference_quant.parse_args(base)).precision == "auto"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        plan(inference_quant.parse_args(base + ["--precision", "fp16", "--device", "cpu"]))
    with pytest.raises(SystemExit):
        inference_quant.parse_args(base + ["--precision", "int8"])


def test_the_emulated_bf16_note(monkeypatch):
    monkeypatch.setattr(build, "native_bf16", lambda: False)
    assert "no native bf16" in build.emulated_bf16_note(torch.device("cpu"))
    assert build.emulated_bf16_note(torch.device("meta")) == ""  # not a CPU
    monkeypatch.setattr(build, "native_bf16", lambda: True)
    assert build.emulated_bf16_note(torch.device("cpu")) == ""


@pytest.mark.parametrize("native", [True, False])
def test_bf16_without_native_bf16_is_noted(smoke_assets, tmp_path, monkeypatch, capsys, native):
    """An explicit bf16 on a CPU that emulates it says so before anything loads; auto never picks it there."""
    root = smoke_assets.copy_to(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setattr(build, "native_bf16", lambda: native)
    base = ["-i", "lr", "-o", "out", "--config", str(REPO / "configs/smoke.yaml"),
            "--ckpt", str(smoke_assets.weights["student"]), "--device", "cpu"]
    capsys.readouterr()
    for flags in (["--precision", "bf16"], ["--precision", "auto"], ["--precision", "fp32-fast"]):
        plan(inference_quant.parse_args(base + flags))
        note = "no native bf16" in capsys.readouterr().out
        assert note == (not native and flags[1] == "bf16"), flags


@pytest.mark.slow  # emulated bf16 on CPUs without it is slow (the autoencoder at 256²)
def test_bf16_pipeline_through_a_deploy_model(smoke_config, tiny_bimaco_denoiser, tiny_vq, tmp_path):
    from bimacosr.deploy import export_deploy, load_deploy
    from bimacosr.pipeline import SRPipeline
    export_deploy(tiny_bimaco_denoiser, build.plain_params(smoke_config), tmp_path / "d.safetensors")
    deploy = load_deploy(tmp_path / "d.safetensors")
    schedule = build.build_schedule(smoke_config)
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    outs = {}
    for dtype in (None, torch.bfloat16):
        pipe = SRPipeline(deploy, tiny_vq, schedule, sf=schedule.sf, autocast=dtype)
        outs[dtype] = pipe(lr, generator=torch.Generator().manual_seed(0))
    assert outs[None].shape == outs[torch.bfloat16].shape == (1, 3, 96, 80)
    assert torch.isfinite(outs[torch.bfloat16]).all()
    assert (outs[None] - outs[torch.bfloat16]).abs().mean() < 0.05  # bf16 rounding, not a different image


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_autoencoder_memory_format_follows_the_precision(smoke_config, precision):
    """channels-last convolution weights under bf16 on CPU (faster there), contiguous in fp32 (the
    fixtures' bit-exact layout)."""
    prec = build.resolve_precision(precision, torch.device("cpu"))
    vq = build.build_autoencoder(smoke_config, weights=False, memory_format=prec.autoencoder_format)
    weight = vq.encoder.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == (precision == "bf16")
    assert weight.is_contiguous() == (precision == "fp32")


def test_fp32_fast_pipeline_runs_winograd_and_stays_at_float32(smoke_config, tiny_fp_denoiser, tiny_vq,
                                                                monkeypatch):
    """``fp32-fast`` (``auto`` on CPUs without native bf16): the pipeline runs the autoencoder's
    3x3 convolutions through NNPACK and lands within float32 rounding of ``fp32``'s image (an FP
    denoiser: a random binary one turns any rounding into sign flips, as another CPU does)."""
    from bimacosr.models import layers
    from bimacosr.pipeline import SRPipeline
    if not layers.nnpack_available():
        pytest.skip("NNPACK needs x86-64 with AVX2 and FMA3, or ARM NEON")
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or real(*a))
    schedule = build.build_schedule(smoke_config)
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    outs = {}
    for name in ("fp32", "fp32-fast"):
        prec = build.resolve_precision(name, torch.device("cpu"))
        pipe = SRPipeline(tiny_fp_denoiser, tiny_vq, schedule, sf=schedule.sf, autocast=prec.autocast,
                          fast_float32=prec.fast_float32)
        outs[name] = pipe(lr, generator=torch.Generator().manual_seed(0))
        assert (len(calls) > 0) == (name == "fp32-fast")
    assert not layers.fast_float32_enabled()  # the context ends with the call
    assert (outs["fp32"] - outs["fp32-fast"]).abs().max() < 1e-4
