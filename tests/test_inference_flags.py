"""inference_quant.py's flags and its checks before any work: the original's flags, Real-ESRGAN's
suffix, the tile-size floor, and one clear error -- before a model is built -- for bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inference_quant
from bimacosr import build
from bimacosr.config import DEFAULT_CONFIG, ConfigError
from bimacosr.imageio import read_image
from bimacosr.inference import (InferenceOptions, Tally, check_writable, list_inputs, output_paths, process_images, run,
                                tile_size)
from bimacosr.models.unet import UNetModelSwin
from bimacosr.weights import MissingWeightsError
from tests.conftest import REPO, animation

SMOKE = REPO / "configs/smoke.yaml"


@pytest.fixture()
def lr_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "lr"
    folder.mkdir()
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(folder / "a.png")
    return folder


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to build a denoiser or a pipeline fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")
    monkeypatch.setattr(UNetModelSwin, "__init__", forbidden)
    monkeypatch.setattr(build, "build_pipeline", forbidden)


def options(lr_dir: Path, **kw) -> InferenceOptions:
    base = {"in_path": lr_dir, "out_path": lr_dir.parent / "out", "config": SMOKE,
            "ckpt": lr_dir.parent / "missing.pth"}
    return InferenceOptions(**{**base, **kw})


def test_every_original_flag_is_parsed():
    opts = inference_quant.parse_args(["-i", "x", "-o", "y", "--task", "SinSR", "--steps", "15", "--infer_steps",
                                       "4", "--ref_path", "gt", "--one_step", "false", "--ddim", "true",
                                       "--scale", "4", "--seed", "7", "--chop_size", "512"])
    assert (opts.task, opts.steps, opts.infer_steps, opts.ref_path, opts.one_step, opts.ddim, opts.seed,
            opts.chop_size) == ("SinSR", 15, 4, Path("gt"), False, True, 7, 512)
    defaults = inference_quant.parse_args(["-i", "x", "-o", "y"])
    assert defaults.config == DEFAULT_CONFIG and defaults.ckpt == REPO / "weights/BiMaCoSR.pth"
    assert defaults.precision == "auto" and defaults.chop_size == 256


def test_help_shows_the_defaults():
    text = subprocess.run([sys.executable, str(REPO / "inference_quant.py"), "--help"], capture_output=True,
                          text=True, timeout=120).stdout
    text = " ".join(text.split())  # argparse wraps lines at the terminal width
    assert "(default: 256)" in text and "(default: 12345)" in text and "--infer_steps" in text


def test_schedule_flags_reach_the_config():
    from bimacosr.config import load_config
    from bimacosr.inference import apply_schedule_flags
    cfg = load_config(SMOKE)
    opts = InferenceOptions(Path("x"), Path("y"), steps=15, infer_steps=4, one_step=False, ddim=True)
    assert apply_schedule_flags(cfg, opts) == "ddim"
    assert cfg.diffusion.params.steps == 15 and cfg.diffusion.params.timestep_respacing == 4
    assert build.build_schedule(cfg).timestep_map.tolist() == [0, 3, 7, 11]  # docs/pipeline.md §3.7
    opts = InferenceOptions(Path("x"), Path("y"), infer_steps=15)
    assert apply_schedule_flags(cfg, opts) == "one_step" and cfg.diffusion.params.timestep_respacing is None


def test_suffix_follows_real_esrgan(tmp_path):
    inputs = [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert output_paths(inputs, tmp_path / "o", "out", "png")[inputs[0]].name == "a_out.png"
    assert output_paths(inputs, tmp_path / "o", "_x4", "auto")[inputs[1]].name == "b_x4.jpg"
    assert output_paths(inputs, tmp_path / "o", "", "png")[inputs[1]].name == "b.png"


def test_tiles_are_raised_to_the_model_minimum(capsys):
    class Pipe:
        min_size = 64
    assert tile_size(InferenceOptions(Path("x"), Path("y"), chop_size=7), Pipe()) == 64
    assert "--chop_size 7 is below the model's minimum tile of 64" in capsys.readouterr().out
    assert tile_size(InferenceOptions(Path("x"), Path("y"), chop_size=96), Pipe()) == 96


def test_missing_checkpoint_fails_before_any_model_is_built(lr_dir, no_model):
    with pytest.raises(MissingWeightsError, match=str(lr_dir.parent / "missing.pth")):
        run(options(lr_dir))


def test_typo_in_config_path_fails_first(lr_dir, no_model):
    with pytest.raises(ConfigError, match="config file not found: .*smok.yaml"):
        run(options(lr_dir, config=REPO / "configs/smok.yaml"))


@pytest.mark.parametrize("flags, message", [
    ({"chop_stride": 0}, "--chop_stride 0 is out of range"),
    ({"tile_batch": 0}, "--tile_batch 0 is out of range"),
    ({"chop_size": 0}, "--chop_size 0 is out of range"),
    ({"infer_steps": 0}, "--infer_steps 0 is out of range"),
    ({"task": "inpaint_imagenet"}, "--task inpaint_imagenet"),
    ({"suffix": "../../../x"}, "--suffix ../../../x: a suffix is part of a file name; it may not contain '..'"),
    ({"suffix": "sub/x"}, "--suffix sub/x: a suffix is part of a file name"),
    ({"suffix": "x.."}, "--suffix x..: a suffix is part of a file name"),
])
def test_flags_out_of_range_are_refused_first(lr_dir, no_model, flags, message):
    with pytest.raises(ValueError, match=message):
        run(options(lr_dir, **flags))
    assert not (lr_dir.parent / "out").exists()


@pytest.mark.parametrize("device, message", [
    ("banana", "--device banana is not a device name; use cpu, cuda, cuda:1"),
    ("cuda:99", "--device cuda:99: this machine has "),
    ("xpu", "--device xpu cannot be used here"),
])
def test_unusable_device_is_refused_first(lr_dir, no_model, device, message):
    if device == "xpu" and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(ValueError, match=message):
        run(options(lr_dir, device=device))
    assert not (lr_dir.parent / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused_first(lr_dir, no_model):
    with pytest.raises(ValueError, match="--device cuda: this machine has no usable CUDA device"):
        run(options(lr_dir, device="cuda"))


def test_output_folder_that_is_the_input_folder(lr_dir, no_model):
    with pytest.raises(ValueError, match="outputs would become inputs"):
        run(options(lr_dir, out_path=lr_dir))
    with pytest.raises(ValueError, match="outputs would become inputs"):
        run(options(lr_dir, out_path=lr_dir / "sub"))
    (lr_dir / "a_sr.png").write_bytes((lr_dir / "a.png").read_bytes())  # an earlier run's output
    with pytest.raises(MissingWeightsError):  # with a suffix it is allowed: on to the weights
        run(options(lr_dir, out_path=lr_dir, suffix="sr"))


def test_gifs_left_out_of_a_folder_are_named(lr_dir, capsys):
    animation(lr_dir / "anim.gif")
    assert list_inputs(options(lr_dir)) == [lr_dir / "a.png"]
    assert capsys.readouterr().out == (f"note: 1 GIF file(s) in {lr_dir} are left out (anim.gif); give one as "
                                       f"-i FILE to super-resolve its first frame\n")


def test_an_animation_given_as_a_file_says_only_its_first_frame_is_used(tmp_path, capsys):
    class Upscale:  # stands in for the pipeline: bicubic x4
        device, sf = "cpu", 4

        def __call__(self, rgb, generator, progress, **kwargs):
            return F.interpolate(rgb, scale_factor=4, mode="bicubic")

    gif = animation(tmp_path / "anim.gif")
    target = tmp_path / "out/anim.png"
    tally = Tally()
    process_images(Upscale(), [gif], {gif: target}, options(tmp_path, in_path=gif), tally, desc="SR")
    assert tally.written == 1 and read_image(target).rgb.shape == (1, 3, 24, 32)
    assert f"note: {gif} has 3 frames; only the first is super-resolved" in capsys.readouterr().out


def test_output_format_is_checked_for_every_input(tmp_path, no_model):
    gif = tmp_path / "anim.gif"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gif)
    with pytest.raises(ValueError, match="--ext auto: cannot write anim.gif as .gif"):
        run(options(tmp_path / "lr", in_path=gif, ext="auto"))
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write to the output folder .*file/out"):
        check_writable(blocker / "out")
    if Path("/proc").is_dir():  # read-only even for root
        with pytest.raises(OSError, match="cannot write to the output folder /proc/"):
            check_writable(Path("/proc/bimacosr_out"))


def files_config(folder: Path) -> Path:
    """A smoke config whose weight files exist (empty: they are only resolved, never loaded,
    before the output folder is checked)."""
    (folder / "w.pth").write_bytes(b"")
    (folder / "vq.pth").write_bytes(b"")
    cfg = folder / "cfg.yaml"
    cfg.write_text(f"_base_: {SMOKE}\nautoencoder:\n  ckpt_path: {folder / 'vq.pth'}\n")
    return cfg


@pytest.mark.slow
def test_errors_are_one_line_from_any_folder(tmp_path, lr_dir):
    """Run from another folder with the default config: the repository's config is found, and
    each problem is one `error:` line without a traceback; nothing is written."""
    cases = [(["-o", str(tmp_path / "o1")], f"{REPO / 'weights' / 'BiMaCoSR.pth'}"),
             (["-o", str(lr_dir)], "outputs would become inputs"),
             (["-o", str(tmp_path / "o2"), "--chop_stride", "0"], "--chop_stride 0"),
             (["-o", "/proc/bimacosr_out", "--config", str(files_config(tmp_path)), "--ckpt",
               str(tmp_path / "w.pth")], "cannot write to the output folder")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, expected in cases:
        result = subprocess.run([sys.executable, str(REPO / "inference_quant.py"), "-i", str(lr_dir), *args],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("error: ") and expected in result.stderr, result.stderr
        if "weights" not in expected:
            assert len(lines) == 1, result.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_real_esrgan_tile_and_outscale_flags():
    base = ["-i", "a.png", "-o", "out"]
    assert inference_quant.parse_args(base + ["-t", "96"]).chop_size == 96
    assert inference_quant.parse_args(base + ["--tile", "80"]).chop_size == 80
    assert inference_quant.parse_args(base + ["-s", "2.5"]).outscale == 2.5
    assert inference_quant.parse_args(base).outscale is None
    from bimacosr.inference import check_options, to_outscale

    sr = torch.rand(1, 3, 64, 48)
    assert to_outscale(sr, None, (16, 12)) is sr and to_outscale(sr, 4.0, (16, 12)) is sr
    half = to_outscale(sr, 2, (16, 12))
    assert half.shape == (1, 3, 32, 24) and 0 <= half.min() and half.max() <= 1
    assert to_outscale(sr, 3.5, (16, 12)).shape == (1, 3, 56, 42)  # int(3.5 * side), as Real-ESRGAN
    with pytest.raises(ValueError, match="--outscale 0.0 is out of range"):
        check_options(inference_quant.parse_args(base + ["-s", "0"]))


def test_skip_existing_is_decided_before_loading(smoke_assets, tmp_path, monkeypatch, capsys):
    from bimacosr import inference

    root = smoke_assets.copy_to(tmp_path)
    monkeypatch.chdir(root)
    (root / "lr").mkdir()
    (root / "out").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(root / "lr" / f"{name}.png")
        Image.new("RGB", (32, 32)).save(root / "out" / f"{name}.png")
    monkeypatch.setattr(inference, "load", lambda *args: pytest.fail("the model was loaded"))
    args = ["-i", "lr", "-o", "out", "--config", str(SMOKE), "--ckpt", str(smoke_assets.weights["student"]),
            "--skip_existing"]
    assert run(inference_quant.parse_args(args)) == 0
    assert capsys.readouterr().out.strip() == "0 image(s) written to out, 2 already there (nothing to do: no model loaded)"


@pytest.mark.slow  # writes the tiny assets (~15 s on 2 cores)
def test_smoke_runs_without_the_released_weights(tmp_path, monkeypatch, capsys):
    from bimacosr import inference
    from bimacosr.smoke import smoke_inference

    monkeypatch.setattr(inference, "smoke_inference", lambda: smoke_inference(tmp_path / "cache"))
    Image.fromarray(np.full((12, 16, 3), 128, np.uint8)).save(tmp_path / "a.png")
    args = ["-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--smoke", "--chop_size", "64"]
    assert run(inference_quant.parse_args(args)) == 0
    assert read_image(tmp_path / "out" / "a.png").rgb.shape == (1, 3, 48, 64)
    assert "smoke mode: tiny random weights" in capsys.readouterr().out
    with pytest.raises(ValueError, match="leave --deploy out"):
        run(inference_quant.parse_args(args + ["--deploy", "x.safetensors"]))
    with pytest.raises(ConfigError, match=r"--scale 2 but .*configs/smoke\.yaml is a x4 model"):
        run(inference_quant.parse_args(args + ["--scale", "2"]))  # names the config smoke mode loaded


def test_smoke_mode_checks_the_device_before_writing_its_files(monkeypatch):
    from bimacosr import inference

    monkeypatch.setattr(inference, "smoke_inference", lambda: pytest.fail("smoke files made before --device"))
    with pytest.raises(ValueError, match="--device nodevice is not a device name"):
        inference.plan(inference_quant.parse_args(["-i", "x.png", "-o", "out", "--smoke", "--device", "nodevice"]))


def test_deploy_file_of_another_config_names_that_config(tmp_path, smoke_config, tiny_bimaco_denoiser):
    from bimacosr.config import load_config
    from bimacosr.deploy import export_deploy

    export_deploy(tiny_bimaco_denoiser, build.plain_params(smoke_config), tmp_path / "d.safetensors")
    with pytest.raises(ConfigError, match="pass the config it was exported with: --config configs/smoke.yaml"):
        build.inference_files(load_config(DEFAULT_CONFIG), None, tmp_path / "d.safetensors")


def test_a_broken_config_beside_does_not_hide_the_matching_one(tmp_path, monkeypatch, smoke_config,
                                                              tiny_bimaco_denoiser):
    from bimacosr.config import load_config
    from bimacosr.deploy import export_deploy

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a_broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "configs" / "a_list.yaml").write_text("- 1\n- 2\n")
    for name in ("BiMaCoSR.yaml", "smoke.yaml"):
        shutil.copy(SMOKE.with_name(name), tmp_path / "configs" / name)
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)
    export_deploy(tiny_bimaco_denoiser, build.plain_params(smoke_config), tmp_path / "d.safetensors")
    with pytest.raises(ConfigError, match="pass the config it was exported with: --config configs/smoke.yaml"):
        build.inference_files(load_config(DEFAULT_CONFIG), None, tmp_path / "d.safetensors")
