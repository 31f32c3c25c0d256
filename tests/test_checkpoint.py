"""bimacosr.checkpoint: safe reading, unwrapping, atomic writing and explained strict loads."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bimacosr.atomic import atomic_write
from bimacosr.checkpoint import (CheckpointError, LoadReport, describe_state_dict,
                                 load_state_dict_into, read_state_dict, save_state_dict,
                                 unwrap_state_dict)


class Tiny(nn.Module):
    """Conv + GroupNorm + Linear, an int64 buffer and a float buffer (like the Swin layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("relative_position_index", torch.arange(6).view(2, 3))
        self.register_buffer("attn_mask", torch.randn(2, 2))


def _random_tiny(seed: int) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _assert_same(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for key, value in sd.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def _module_from_shapes(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A module whose state_dict has exactly these (dotted) keys, as zero parameters."""
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


FP_UNET = {"time_embed.0.weight": (8, 4), "input_blocks.0.0.weight": (4, 3, 3, 3),
           "out.2.weight": (3, 4, 3, 3)}
BIMACO_UNET = {"time_embed.0.weight": (8, 4), "time_embed.0.lora.A.weight": (8, 2),
               "time_embed.0.skip_connection.indices_float": (2, 16),
               "input_blocks.0.0.weight": (4, 3, 3, 3), "out.2.weight": (3, 4, 3, 3)}
AUTOENCODER = {"encoder.conv_in.weight": (8, 3, 3, 3), "quantize.embedding.weight": (16, 3)}


def _zeros(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.zeros(s) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- read / write

def test_round_trip_pth_and_safetensors(tmp_path: Path) -> None:
    sd = _random_tiny(0).state_dict()
    sd["half"] = torch.randn(3).half()
    save_state_dict(sd, tmp_path / "a" / "b" / "w.pth")  # parent folders are created
    from_pth = read_state_dict(tmp_path / "a" / "b" / "w.pth")
    save_state_dict(from_pth, tmp_path / "w.safetensors")
    from_st = read_state_dict(tmp_path / "w.safetensors")
    save_state_dict(from_st, tmp_path / "again.pth")
    again = read_state_dict(tmp_path / "again.pth")
    for loaded in (from_pth, from_st, again):
        assert set(loaded) == set(sd)
        for key, value in sd.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "again.pth", "w.safetensors"]


def test_safetensors_save_handles_shared_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    sd = {"tied.a": base, "tied.b": base, "view": base[:, 1:3], "t": base.t()}
    save_state_dict(sd, tmp_path / "s.safetensors")
    loaded = read_state_dict(tmp_path / "s.safetensors")
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    with pytest.raises(CheckpointError, match="'step' is a int"):
        save_state_dict({"w": base, "step": 3}, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("wrap", [
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    lambda sd: {f"module._orig_mod.module.{k}": v for k, v in sd.items()},
    lambda sd: {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())},
    lambda sd: {"iters_start": 500, "log_step": {"train": 1, "val": 2},
                "log_step_img": {"train": 1, "val": 2},
                "state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"params": {}, "params_ema": sd},
    lambda sd: {"model": {"ema": sd}, "epoch": 3},
    lambda sd: {**sd, "step": 7, "name": "run1"},  # non-tensor entries are dropped
], ids=["module", "orig_mod", "combined", "mixed", "trainer", "params_ema", "nested", "extras"])
def test_wrapped_and_prefixed_files_load(tmp_path: Path, wrap) -> None:
    source = _random_tiny(1).state_dict()
    torch.save(wrap(source), tmp_path / "w.pth")
    model = _random_tiny(2)
    assert load_state_dict_into(model, tmp_path / "w.pth").ok
    _assert_same(model, source)


def test_unwrap_rejects_duplicates_and_non_dicts(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="two entries become 'w'"):
        unwrap_state_dict({"w": torch.ones(1), "module.w": torch.zeros(1)})
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pth")
    with pytest.raises(CheckpointError, match=r"opt\.pth: no tensors found.*optimizer"):
        read_state_dict(tmp_path / "opt.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a dict of tensors"):
        read_state_dict(tmp_path / "list.pth")


_UNPICKLED: list[str] = []


def _side_effect() -> None:
    _UNPICKLED.append("ran")


class Payload:
    """Unpickling this would run code (``_side_effect``)."""

    def __reduce__(self):
        return (_side_effect, ())


class Config:
    def __init__(self) -> None:
        self.lr = 1e-4


@pytest.mark.parametrize("obj,needs", [(Payload(), "_side_effect"), (Config(), "Config")],
                         ids=["reduce", "instance"])
def test_pickled_objects_are_refused(tmp_path: Path, obj, needs: str) -> None:
    torch.save({"state_dict": _random_tiny(0).state_dict(), "cfg": obj}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "evil.pth")
    msg = str(info.value)
    assert str(tmp_path / "evil.pth") in msg
    assert "pickled" in msg and "not loaded for safety" in msg
    assert "torch.save" in msg and ".safetensors" in msg and needs in msg
    assert not _UNPICKLED
    with pytest.raises(CheckpointError, match="pickled"):
        load_state_dict_into(Tiny(), tmp_path / "evil.pth")


def test_missing_file_message(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "BiMaCoSR.pth"
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(Tiny(), path, what="BiMaCoSR checkpoint")
    msg = str(info.value)
    assert "not found" in msg and str(path) in msg and "BiMaCoSR checkpoint" in msg
    assert "scripts/download_weights.py" in msg and "put the file at that path" in msg


@pytest.mark.parametrize("name,make", [
    ("trunc.pth", lambda good: good[: len(good) // 2]),
    ("empty.pt", lambda good: b""),
    ("junk.ckpt", lambda good: b"this is not a checkpoint"),
    ("trunc.safetensors", lambda good: good[: len(good) // 2]),
    ("junk.safetensors", lambda good: b"\x00" * 64),
])
def test_corrupt_file_message(tmp_path: Path, name: str, make) -> None:
    ext = ".safetensors" if name.endswith(".safetensors") else ".pth"
    save_state_dict(_random_tiny(0).state_dict(), tmp_path / f"good{ext}")
    (tmp_path / name).write_bytes(make((tmp_path / f"good{ext}").read_bytes()))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / name)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and "corrupt" in msg and "again" in msg


# ----------------------------------------------------------------------------- loading

def test_load_casts_dtypes_and_keeps_buffers(tmp_path: Path) -> None:
    source = _random_tiny(3).state_dict()
    as_double = {k: (v.double() if v.is_floating_point() else v) for k, v in source.items()}
    save_state_dict(as_double, tmp_path / "d.safetensors")
    model = _random_tiny(4)
    assert load_state_dict_into(model, tmp_path / "d.safetensors").loaded == len(source)
    _assert_same(model, source)
    assert model.relative_position_index.dtype == torch.int64


def test_load_into_wrapped_models() -> None:
    source = _random_tiny(5).state_dict()

    class Compiled(nn.Module):  # what torch.compile's OptimizedModule looks like to state_dict
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    for wrapper in (Compiled, nn.DataParallel):
        inner = _random_tiny(6)
        wrapped = wrapper(inner)
        assert load_state_dict_into(wrapped, {f"module.{k}": v for k, v in source.items()}).ok
        _assert_same(inner, source)


def _mismatched_source() -> dict[str, torch.Tensor]:
    sd = dict(_random_tiny(7).state_dict())
    del sd["norm.bias"]
    sd["extra.weight"] = torch.ones(2)
    sd["fc.weight"] = torch.ones(5, 4)
    return sd


def test_strict_mismatch_message_lists_keys(tmp_path: Path) -> None:
    save_state_dict(_mismatched_source(), tmp_path / "m.pth")
    before = _random_tiny(8).state_dict()
    model = _random_tiny(8)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(model, tmp_path / "m.pth", what="teacher checkpoint")
    msg = str(info.value)
    assert f"teacher checkpoint {tmp_path / 'm.pth'}" in msg
    assert "missing from the file (1): norm.bias" in msg
    assert "unexpected in the file (1): extra.weight" in msg
    assert "shape mismatch (1): fc.weight (file [5, 4] vs model [3, 4])" in msg
    assert "strict=False" in msg
    _assert_same(model, before)  # nothing was loaded


def test_strict_message_truncates_long_lists() -> None:
    many = {f"blocks.{i}.weight": (2,) for i in range(25)}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(_module_from_shapes(many), {"other": torch.ones(1)})
    msg = str(info.value)
    assert "in-memory checkpoint" in msg and "missing from the file (25)" in msg
    assert "blocks.9.weight" in msg and "blocks.10.weight" not in msg and "(+15 more)" in msg
    assert "first keys in the file: other" in msg


def test_non_strict_loads_intersection_and_reports(caplog) -> None:
    source = _mismatched_source()
    model = _random_tiny(9)
    old_fc, old_norm_bias = model.fc.weight.clone(), model.norm.bias.clone()
    with caplog.at_level(logging.WARNING, logger="bimacosr.checkpoint"):
        report = load_state_dict_into(model, source, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["norm.bias"] and report.unexpected == ["extra.weight"]
    assert report.mismatched == [("fc.weight", (5, 4), (3, 4))]
    assert report.loaded == len(model.state_dict()) - 2
    assert "norm.bias" in str(report) and "norm.bias" in caplog.text
    assert torch.equal(model.conv.weight, source["conv.weight"])
    assert torch.equal(model.attn_mask, source["attn_mask"])
    assert torch.equal(model.fc.weight, old_fc) and torch.equal(model.norm.bias, old_norm_bias)
    full = load_state_dict_into(_random_tiny(0), _random_tiny(1).state_dict(), strict=False)
    assert full.ok and str(full) == f"loaded {full.loaded} tensors from in-memory checkpoint"


def test_describe_state_dict() -> None:
    assert "BiMaCo" in describe_state_dict(_zeros(BIMACO_UNET, "module."))
    assert "FP" in describe_state_dict(_zeros(FP_UNET)) and "SinSR" in describe_state_dict(
        _zeros(FP_UNET, "_orig_mod."))
    assert "autoencoder" in describe_state_dict(_zeros(AUTOENCODER))
    assert describe_state_dict({"a.weight": torch.ones(1)}) == "unknown"


@pytest.mark.parametrize("model_shapes,file_shapes,expected", [
    (BIMACO_UNET, FP_UNET, ["FP SinSR/ResShift checkpoint", "BiMaCo layers",
                            "quantparameter.train.pretained_model", "FP config"]),
    (FP_UNET, BIMACO_UNET, ["BiMaCo (binarized) checkpoint", "configs/BiMaCoSR.yaml"]),
    (FP_UNET, AUTOENCODER, ["VQ-f4 autoencoder", "`autoencoder.ckpt_path`", "model.ckpt_path"]),
    (AUTOENCODER, BIMACO_UNET, ["BiMaCo", "`--ckpt`", "not the config entry "
                                "`autoencoder.ckpt_path`"]),
], ids=["fp-into-bimaco", "bimaco-into-fp", "ae-into-unet", "unet-into-ae"])
def test_strict_mismatch_hints(tmp_path: Path, model_shapes, file_shapes, expected) -> None:
    save_state_dict(_zeros(file_shapes, "module."), tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(_module_from_shapes(model_shapes), tmp_path / "f.safetensors")
    msg = str(info.value)
    assert "hint:" in msg
    for text in expected:
        assert text in msg


# ----------------------------------------------------------------------------- atomic save

def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _partial_torch_save(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"half a file")
    _boom()


@pytest.mark.parametrize("name,target,patch", [
    ("w.pth", "torch.save", _partial_torch_save),
    ("w.pth", "os.replace", _boom),
    ("w.safetensors", "bimacosr.checkpoint._safetensors_save", _boom),
    ("w.safetensors", "os.replace", _boom),
])
def test_atomic_save_keeps_previous_file(tmp_path: Path, monkeypatch, name, target,
                                         patch) -> None:
    previous = _random_tiny(0).state_dict()
    save_state_dict(previous, tmp_path / name)
    old_bytes = (tmp_path / name).read_bytes()
    monkeypatch.setattr(target, patch)
    with pytest.raises(CheckpointError, match=f"could not write {tmp_path / name}"):
        save_state_dict(_random_tiny(1).state_dict(), tmp_path / name)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [name]
    assert (tmp_path / name).read_bytes() == old_bytes
    reloaded = Tiny()
    load_state_dict_into(reloaded, tmp_path / name)
    _assert_same(reloaded, previous)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_umask_mode_whatever_the_writer_made(tmp_path: Path, umask: int) -> None:
    """safetensors creates its file 0600: the written file still gets 0666 less the umask."""
    def private(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.bin", private)
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~umask
