"""Deploy file: export -> load -> same outputs (fixture, smoke model), full-size file size,
wrong / corrupt files refused with DeployFileError."""
import copy
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bimacosr import build
from bimacosr.atomic import _umask
from bimacosr.checkpoint import CheckpointError
from bimacosr.config import load_config, to_plain
from bimacosr.build import deployable_denoiser
from bimacosr.deploy import (DeployBinaryConv2d, DeployBinaryLinear, DeployFileError, export_deploy,
                             load_deploy, set_mode, to_deploy)
from bimacosr.deploy.check import LAYER_TOLERANCE, layerwise_max_diff
from bimacosr.deploy.format import checksum as _checksum
from bimacosr.models import build_denoiser
from bimacosr.models.swin import WindowAttention, relative_position_index
from bimacosr.parity.common import compare
from bimacosr.parity.tolerances import TOLERANCES, noise_floor
from bimacosr.quant.bimaco import SparseBranch
from tests.conftest import REPO, SMOKE_CONFIG, fixture_denoiser, load_fixture

LIMIT_BYTES = 23.7e6  # 1/20 of the FP SinSR file


@pytest.fixture(scope="module")
def fixture():
    model, data = fixture_denoiser("denoiser/bimaco_unet_forward.pt")
    return data, model


@pytest.fixture(scope="module")
def fixture_file(fixture, tmp_path_factory):
    data, model = fixture
    path = tmp_path_factory.mktemp("deploy") / "fixture.safetensors"
    export_deploy(model, data["config"], path)
    return path


def _run(model, inputs, t=None):
    with torch.inference_mode():
        steps = inputs["timesteps"] if t is None else torch.full_like(inputs["timesteps"], t)
        return model(inputs["x"], steps, lq=inputs["lq"])


@pytest.mark.parametrize("mode,side", [("int", "sparse"), ("int", "dense"), ("float", "sparse")])
def test_fixture_export_load_equals_the_reference_output(fixture, fixture_file, mode, side):
    data, model = fixture
    deployed = load_deploy(fixture_file, mode=mode, side=side)
    check = compare("output", _run(deployed, data["inputs"]), data["output"], TOLERANCES["f32_single_pass"],
                    noise_floor(data["meta"], "output"))
    assert check.passed, check.line()
    torch.testing.assert_close(_run(deployed, data["inputs"], t=0), _run(model, data["inputs"], t=0),
                               atol=1e-5, rtol=0)  # t = 0: exact zeros in the embedding (Q11)


def test_loaded_model_structure(fixture, fixture_file):
    _, model = fixture
    deployed = load_deploy(fixture_file)
    binary = [m for m in deployed.modules() if isinstance(m, (DeployBinaryConv2d, DeployBinaryLinear))]
    assert len(binary) == 62 and not deployed.training
    assert all(not p.requires_grad for p in deployed.parameters())
    for name, buffer in model.named_buffers():  # recomputed buffers equal the originals
        if name.endswith(("attn_mask", "relative_position_index")):
            assert torch.equal(deployed.get_buffer(name), buffer), name
    with safe_open(str(fixture_file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert not any(k.endswith(("move0.bias", "channel_threshold", "attn_mask", "relative_position_index",
                               "indices_float")) for k in keys)
    assert "input_blocks.0.0.weight" in keys and "out.2.weight" in keys
    assert json.loads(meta["params"]) == load_fixture("denoiser/bimaco_unet_forward.pt")["config"]
    down = [k for k in keys if ".op." in k]  # Downsample: no SMB/LRMB (Q7)
    assert down and not any(".smb." in k or ".lora." in k for k in down)


def test_export_of_a_deployed_model_gives_the_same_tensors(fixture, fixture_file, tmp_path):
    data, model = fixture
    again = export_deploy(to_deploy(copy.deepcopy(model)), data["config"], tmp_path / "again.safetensors")
    with safe_open(str(fixture_file), "pt") as a, safe_open(str(again.path), "pt") as b:
        assert a.metadata()["checksum"] == b.metadata()["checksum"]


def test_fp16_side_branches(fixture, fixture_file, tmp_path):
    data, model = fixture
    info = export_deploy(model, data["config"], tmp_path / "half.safetensors", fp16=True)
    assert info.side_dtype == "float16" and info.size_bytes < fixture_file.stat().st_size
    deployed = load_deploy(info.path)
    diffs = layerwise_max_diff(model, deployed, data["inputs"]["x"], data["inputs"]["timesteps"],
                               lq=data["inputs"]["lq"])
    assert max(diffs.values()) < LAYER_TOLERANCE["float16"]  # float16 rounding of the side branches only
    assert deployed.out[0].weight.dtype == torch.float32


@pytest.fixture(scope="module")
def smoke(smoke_assets, tiny_bimaco_denoiser, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "smoke_deploy.safetensors"
    info = export_deploy(*deployable_denoiser(smoke_assets.weights["student"], SMOKE_CONFIG), out)
    return tiny_bimaco_denoiser, info, smoke_assets.weights["student"]


@pytest.mark.slow
def test_smoke_checkpoint_export_load(smoke):
    simulated, info, _ = smoke
    # the ratio's two sides measured here: the file on disk, and the smoke FP UNet's own parameters
    # (the smoke architecture's, not FP SinSR's 118.6 M)
    fp = build.build_denoiser_from_config(load_config(SMOKE_CONFIG), "fp")
    fp_bytes = sum(p.numel() * 4 for p in fp.parameters())
    assert info.size_bytes == info.path.stat().st_size and info.binary_layers == 82
    assert info.fp_bytes == fp_bytes  # counted on the meta device by convert.fp_float32_bytes
    assert info.ratio == pytest.approx(fp_bytes / info.path.stat().st_size, rel=1e-12)
    deployed = load_deploy(info.path)
    inputs = load_fixture("denoiser/bimaco_unet_forward.pt")["inputs"]
    for t in (0, 9):
        # whole model: random smoke weights have no activation within ~1e-6 of 0 on these inputs
        torch.testing.assert_close(_run(deployed, inputs, t), _run(simulated, inputs, t), atol=1e-5, rtol=0)
    for mode in ("int", "float"):  # per layer: robust on any input
        set_mode(deployed, mode)
        x, lq = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1
        diffs = layerwise_max_diff(simulated, deployed, x, torch.tensor([0, 7]), lq=lq)
        assert len(diffs) == 82 and max(diffs.values()) < 1e-5


@pytest.mark.slow
def test_export_script(smoke, tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("export_deploy", REPO / "scripts/export_deploy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt, config, out = smoke[2], SMOKE_CONFIG, tmp_path / "cli.safetensors"
    args = ["--ckpt", str(ckpt), "--config", str(config), "--out", str(out), "--check"]
    reads, read = [], build.read_state_dict
    monkeypatch.setattr(build, "read_state_dict", lambda *a, **k: reads.append(a) or read(*a, **k))
    assert script.main(args) == 0
    assert len(reads) == 1  # the checkpoint is read once: --check compares with the model it exported
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in printed and "the same architecture in FP float32" in printed
    assert "\nPASS: max |deploy - simulated| per binary layer " in printed and "<= tolerance 0.0001" in printed
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with monkeypatch.context() as m:
        m.setitem(LAYER_TOLERANCE, "float32", 0.0)  # any difference at all fails
        assert script.main(args) == 1
    assert "\nFAIL: " in capsys.readouterr().out
    assert script.main(["--ckpt", str(tmp_path / "nope.pth"), "--config", str(config), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err


def test_export_script_names_a_wrong_checkpoint(smoke_assets, tmp_path, capsys):
    """The FP teacher's weights are not a BiMaCo checkpoint: the message names that file (not an
    "in-memory checkpoint"), nothing is written, and ``--debug`` shows the exception instead."""
    spec = importlib.util.spec_from_file_location("export_deploy", REPO / "scripts/export_deploy.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    wrong, out = smoke_assets.weights["teacher"], tmp_path / "wrong.safetensors"
    args = ["--ckpt", str(wrong), "--config", str(SMOKE_CONFIG), "--out", str(out)]
    assert script.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: denoiser checkpoint {wrong} does not match the model"), err
    assert "in-memory" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match=str(wrong)):
        script.main([*args, "--debug"])


@pytest.mark.slow
def test_released_size_file_is_at_most_one_twentieth(tmp_path):
    """Full BiMaCoSR structure (random values, built on the meta device to skip SVD/top-k)."""
    params = to_plain(load_config(REPO / "configs/BiMaCoSR.yaml").model.params)
    with torch.device("meta"):
        model = build_denoiser(params)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_floating_point():
                    tensor.normal_(0.0, 0.02, generator=gen)
            if isinstance(module, SparseBranch):
                module.indices_float[0].random_(0, module.shape[0], generator=gen)
                module.indices_float[1].random_(0, module.shape[1], generator=gen)
            if isinstance(module, WindowAttention):
                window = (int(module.relative_position_bias_table.shape[0] ** 0.5) + 1) // 2
                module.relative_position_index.copy_(relative_position_index(window))
    full = export_deploy(model, params, tmp_path / "full.safetensors")
    half = export_deploy(model, params, tmp_path / "half.safetensors", fp16=True)
    print(full.line(), half.line(), sep="\n")
    assert full.binary_layers == 178 and full.fp_bytes == 118_593_583 * 4  # FP SinSR in float32
    assert full.size_bytes <= LIMIT_BYTES and full.ratio >= 20.0
    assert half.size_bytes < full.size_bytes - 3e6
    deployed = load_deploy(full.path)
    assert sum(isinstance(m, (DeployBinaryConv2d, DeployBinaryLinear)) for m in deployed.modules()) == 178


# -- wrong files ------------------------------------------------------------------------------
def _rewrite(src, dst, drop=(), replace=None, metadata=None, fix_checksum=True):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    tensors.update(replace or {})
    meta.update(metadata or {})
    if fix_checksum:
        meta["checksum"] = _checksum(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_wrong_files_are_refused_with_a_named_error(fixture_file, tmp_path):
    with safe_open(str(fixture_file), "pt") as f:
        signs_key = next(k for k in f.keys() if k.endswith(".signs"))
        signs = f.get_tensor(signs_key)
    cases = {
        "not found": tmp_path / "missing.safetensors",
        "not a readable safetensors": tmp_path / "junk.safetensors",
        "truncated": tmp_path / "truncated.safetensors",
        "not a BiMaCoSR deploy file": tmp_path / "plain.safetensors",
        "version '99'": _rewrite(fixture_file, tmp_path / "v99.safetensors", metadata={"version": "99"}),
        "missing tensor": _rewrite(fixture_file, tmp_path / "drop.safetensors", drop=[signs_key]),
        "has shape": _rewrite(fixture_file, tmp_path / "shape.safetensors",
                              replace={signs_key: signs[:, :-1].contiguous()}),
        "unexpected tensor": _rewrite(fixture_file, tmp_path / "extra.safetensors",
                                      replace={"extra.weight": torch.zeros(3)}),
        "checksum mismatch": _rewrite(fixture_file, tmp_path / "flip.safetensors",
                                      replace={signs_key: 255 - signs}, fix_checksum=False),
        "JSONDecodeError": _rewrite(fixture_file, tmp_path / "json.safetensors", metadata={"params": "{"}),
    }
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    data = fixture_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    for problem, path in cases.items():
        with pytest.raises(DeployFileError) as err:
            load_deploy(path)
        message = str(err.value)
        assert str(path) in message, message
        if problem != "truncated":
            assert problem in message, message


def test_export_refuses_a_full_precision_model(tiny_fp_denoiser, smoke_config, tmp_path):
    params = to_plain(smoke_config.model_teacher.params)
    with pytest.raises(ValueError, match="no BiMaCo layers"):
        export_deploy(tiny_fp_denoiser, params, tmp_path / "fp.safetensors")
