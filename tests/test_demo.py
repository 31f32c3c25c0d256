"""The Gradio demo for real: ``app.py --smoke`` in a subprocess on a free 127.0.0.1 port, called
over HTTP with gradio_client."""
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bimacosr.smoke import downscale, photo
from tests.conftest import REPO

START_TIMEOUT_S = 300  # gradio import + tiny smoke weights written and loaded, on a busy 2-core machine


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (RGB, 8 bits) and whose pixel data is empty."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    pytest.fail(f"app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_demo(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``app.py --smoke ARGS`` serving on a free port, with ``tmp_path/tmp`` as its temporary folder:
    yields (URL, process); SIGINT at the end unless the process has already ended."""
    port, log, tmp = free_port(), tmp_path / "app.log", tmp_path / "tmp"
    tmp.mkdir()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--smoke", "--port", str(port), *args],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(proc, url, log)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def demo_url(tmp_path):
    with running_demo(tmp_path) as (url, _):
        yield url


@pytest.mark.slow
def test_demo_over_http(demo_url, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    lr = downscale(photo("coffee"), 10)  # 60 x 40: one small tile
    Image.fromarray(lr).save(tmp_path / "coffee.png")
    client = Client(demo_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "got"))
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/upscale"]
    (before, after), panel, sr_file, status = client.predict(
        handle_file(str(tmp_path / "coffee.png")), 64, 7, "gaussian", "fp32", api_name="/upscale")
    sr = np.asarray(Image.open(sr_file))
    assert sr.shape == (160, 240, 3) and os.path.basename(sr_file) == "coffee_x4.png"
    assert np.array_equal(np.asarray(Image.open(after).convert("RGB")), sr)
    assert np.asarray(Image.open(before)).shape[:2] == (160, 240)
    assert Image.open(panel).width > 3 * 240
    assert status.startswith("60x40 -> 240x160 in ") and "(fp32)" in status and "seed 7" in status
    (tmp_path / "notes.py").write_text("print('hi')")
    (tmp_path / "huge.png").write_bytes(png_claiming(60000, 60000))
    for name, message in (("notes.py", "not an image: notes.py"), ("huge.png", "too large: huge.png has over")):
        with pytest.raises(AppError, match=message):  # was Gradio's "The upstream Gradio app has raised an exception"
            client.predict(handle_file(str(tmp_path / name)), 64, 7, "gaussian", "fp32", api_name="/upscale")


@pytest.mark.slow
@pytest.mark.slow
def test_files_on_disk_stay_bounded_and_sigterm_removes_them(tmp_path):
    """Each request's upload and results are kept for the latest --keep requests only (they stayed an
    hour: 5 files a request); SIGTERM removes the demo's folder, uploads included, as Ctrl-C does."""
    from gradio_client import Client, handle_file

    with running_demo(tmp_path, "--keep", "2") as (url, proc):
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "got"))
        (workdir,) = (tmp_path / "tmp").glob("bimacosr-demo-*")
        counts = []
        for i in range(5):
            Image.fromarray(downscale(photo("coffee"), 10) // (i + 1)).save(tmp_path / f"in{i}.png")
            client.predict(handle_file(str(tmp_path / f"in{i}.png")), 64, 7, "average", "fp32", api_name="/upscale")
            files = [f.relative_to(workdir) for f in workdir.rglob("*") if f.is_file()]
            counts.append(len(files))
        results = {f.parts[1] for f in files if f.parts[0] == "results"}
        uploads = [f.name for f in files if f.parts[0] != "results" and f.name.startswith("in")]
        assert counts[1:] == [counts[1]] * 4, counts  # constant once --keep requests are held
        assert results == {"000004", "000005"} and sorted(uploads) == ["in3.png", "in4.png"], files
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not list((tmp_path / "tmp").glob("bimacosr-demo-*"))
    assert not [f for f in (tmp_path / "tmp").rglob("gradio/**/*") if f.is_file()]  # gradio/: its empty folders


@pytest.mark.slow
def test_upscaler_matches_the_pipeline_and_explains_bad_inputs(tmp_path, monkeypatch, smoke_assets):
    import gradio as gr
    import torch

    from bimacosr import build
    from bimacosr.demo import Upscaler
    from bimacosr.imageio import read_image, to_uint8
    from bimacosr.smoke import smoke_inference

    cfg, ckpt = smoke_inference(smoke_assets.root)  # the session's assets, read only
    files = build.inference_files(cfg, ckpt)
    upscaler = Upscaler(cfg, files, torch.device("cpu"), max_side=64, keep=16)
    Image.fromarray(downscale(photo("astronaut"), 16)).save(tmp_path / "a.png")  # 32 x 32
    got = upscaler(tmp_path / "a.png", tile=64, seed=3, blend="average", precision="fp32")
    pipe = build.build_pipeline(cfg, files, torch.device("cpu"), precision="fp32")
    want = pipe(read_image(tmp_path / "a.png").rgb, tile=64, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(got.sr, to_uint8(want)) and got.before.shape == got.sr.shape == (128, 128, 3)
    assert np.array_equal(np.asarray(Image.open(got.file)), got.sr) and "(fp32)" in got.status
    bf16, name = upscaler.pipeline("bf16")  # same modules, bf16 autocast
    assert name == "bf16" and bf16.autocast == torch.bfloat16 and bf16.denoiser is upscaler.pipeline("fp32")[0].denoiser
    Image.fromarray(downscale(photo("astronaut"), 4)).save(tmp_path / "big.png")  # 128 x 128
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for path, message in (("big.png", "at most 64 pixels a side: restart app.py with --max_side 128"),
                          ("bad.png", "not an image: bad.png")):
        with pytest.raises(gr.Error, match=message):
            upscaler(tmp_path / path)
    Image.new("RGB", (8000, 8000)).save(tmp_path / "black.png")  # 8 KB file, 0.8 GB once decoded to float32

    def no_decoding(path):
        raise AssertionError(f"{path} decoded before its size was checked")

    monkeypatch.setattr("bimacosr.demo.read_image", no_decoding)
    with pytest.raises(gr.Error, match="too large: black.png is 8000x8000; this demo takes at most 64 pixels a side: "
                                       "restart app.py with --max_side 8000"):
        upscaler(tmp_path / "black.png")


def test_bad_uploads_are_one_line_naming_the_file(tmp_path):
    """Not an image, empty, a script, a header over Pillow's pixel limit: the demo's own message,
    never Gradio's generic error (gr.Image opened the upload with Pillow before the event ran)."""
    import gradio as gr

    from bimacosr.demo import check_upload

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "app.py").write_text("print('hi')")
    (tmp_path / "huge.png").write_bytes(png_claiming(60000, 60000))
    for name, message in (("notes.txt", r"not an image: notes.txt \(not a format Pillow reads\): upload a PNG"),
                          ("empty.png", "not an image: empty.png"), ("app.py", "not an image: app.py"),
                          ("huge.png", (r"too large: huge.png has over \d+ pixels \(Pillow's limit\); "
                                        r"this demo takes at most 1024 pixels a side \(--max_side 1024\)"))):
        with pytest.raises(gr.Error, match=message):
            check_upload(tmp_path / name, 1024)
    Image.new("RGB", (300, 1100)).save(tmp_path / "tall.png")
    assert check_upload(tmp_path / "tall.png", 1100) == (300, 1100)
    with pytest.raises(gr.Error, match=r"too large: tall.png is 300x1100; this demo takes at most 1024 pixels a side: "
                                       r"restart app.py with --max_side 1100 \(inference_quant.py has no limit\)"):
        check_upload(tmp_path / "tall.png", 1024)


def test_busy_port_is_one_error_line(tmp_path):
    """Checked before any model or Gradio is loaded: one line naming the port and the flag, exit 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, str(REPO / "app.py"), "--smoke", "--port", str(port)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: port {port} is in use: pass --port N (a free port)\n"


@pytest.mark.parametrize("native", [True, False])
def test_the_precision_hint_names_auto_and_warns_where_bf16_is_emulated(monkeypatch, smoke_config, native):
    from bimacosr import build
    from bimacosr.demo import precision_info

    monkeypatch.setattr(build, "native_bf16", lambda: native)
    info = precision_info(torch.device("cpu"), smoke_config)
    assert info.startswith(f"auto is {'bf16' if native else 'fp32-fast'} here")
    assert ("bf16 is emulated" in info) == (not native)
    assert precision_info(torch.device("meta"), smoke_config) == "auto is fp32 here"  # not a CPU: no CPU warning
