"""The web demo behind ``app.py``: upload an LR image, get the x4 SR with a before/after slider,
a comparison panel and the SR as a PNG file.

:class:`Upscaler` holds the pipeline, built once through :mod:`bimacosr.build`; a request runs it as
``inference_quant.py`` does (same seed -> same noise, tiles, blending and precision give the same
pixels). :func:`build_ui` lays out the Gradio page. ``app.py --smoke`` runs it on the tiny random
weights of :func:`bimacosr.smoke.smoke_inference`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from bimacosr import build
from bimacosr.config import REPO_ROOT
from bimacosr.imageio import ImageReadError, find_images, read_image, to_uint8, write_image
from bimacosr.inference import default
from bimacosr.pipeline import BLENDS, SRPipeline
from bimacosr.visualize import compare_panel

__all__ = ["UI_PRECISIONS", "Result", "Upscaler", "build_ui", "check_upload", "precision_info"]

UI_PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16")


def check_upload(path: str | os.PathLike, max_side: int) -> tuple[int, int]:
    """(width, height) of the image file at ``path`` from its header (nothing decoded); raises
    ``gr.Error`` with one line for a user when it is not an image or a side exceeds ``max_side``."""
    name = Path(path).name
    try:
        with Image.open(path) as probe:  # reads the header only
            width, height = probe.size
    except FileNotFoundError:
        raise gr.Error(f"{name} is no longer on the server (the uploads of the latest requests are kept): "
                       f"upload it again") from None
    except Image.DecompressionBombError:
        raise gr.Error(f"too large: {name} has over {2 * Image.MAX_IMAGE_PIXELS} pixels (Pillow's limit); "
                       f"this demo takes at most {max_side} pixels a side (--max_side {max_side})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "not a format Pillow reads" if isinstance(e, UnidentifiedImageError) else str(e) or type(e).__name__
        raise gr.Error(f"not an image: {name} ({reason}): upload a PNG, JPEG, WebP, BMP or TIFF file") from None
    if max(width, height) > max_side:  # before decoding: an 8000x8000 PNG is 0.8 GB of float32 pixels
        raise gr.Error(f"too large: {name} is {width}x{height}; this demo takes at most {max_side} pixels a side: "
                       f"restart app.py with --max_side {max(width, height)} (inference_quant.py has no limit)")
    return width, height


def _keep_latest(uploads: set[str], keep: int, current: str) -> None:
    """Delete the files of ``uploads`` (Gradio's record of the uploads, pruned in place) but the
    latest ``keep``, counting ``current`` (the request's own) as the latest; a file's folder goes
    with it once empty."""
    def uploaded(file: str) -> float:
        """When ``file`` was uploaded: ``current`` now, a file already gone never."""
        if file == current:
            return math.inf
        try:
            return os.stat(file).st_ctime
        except FileNotFoundError:
            return -math.inf

    for file in sorted(uploads, key=uploaded)[:-keep]:  # copied first, as the server adds to it
        uploads.discard(file)
        Path(file).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: the same bytes uploaded under another name
            Path(file).parent.rmdir()


@dataclasses.dataclass(frozen=True)
class Result:
    """One request's output: ``before`` (bicubic x4 of the input) and ``sr``, uint8 [sH, sW, 3];
    ``panel`` the comparison panel, uint8; ``file`` the SR PNG (grey, alpha and 16 bits kept as
    ``inference_quant.py`` keeps them); ``status`` one line about the run."""

    before: np.ndarray
    sr: np.ndarray
    panel: np.ndarray
    file: Path
    status: str


class Upscaler:
    """The SR pipeline built once (fp32 modules), run per request with a precision of
    :data:`UI_PRECISIONS` (resolved by ``build.resolve_precision``: an fp16 autoencoder copy is made
    the first time CUDA's ``auto`` asks for it). ``max_side`` bounds the LR input (pixels); the files
    of the latest ``keep`` (at least 1) requests are kept in :attr:`outdir`."""

    def __init__(self, cfg: DictConfig, files: build.InferenceFiles, device: torch.device,
                 max_side: int, keep: int) -> None:
        self.cfg, self.device, self.max_side, self.keep = cfg, device, max_side, keep
        base = build.build_pipeline(cfg, files, device, precision="fp32")
        self._pipes: dict[str, SRPipeline] = {"fp32": base}
        self._lock = threading.Lock()
        self._workdir = tempfile.TemporaryDirectory(prefix="bimacosr-demo-")  # removed at exit
        self.outdir.mkdir()
        self._count = 0
        self.name = files.deploy.name if files.deploy is not None else files.ckpt.name

    @property
    def workdir(self) -> Path:
        """This process's folder, removed at exit: :attr:`outdir` and, under :func:`build_ui`, Gradio's
        cache (the uploads)."""
        return Path(self._workdir.name)

    @property
    def outdir(self) -> Path:
        """Where the files of the latest requests are written, one folder per request."""
        return self.workdir / "results"

    def pipeline(self, precision: str) -> tuple[SRPipeline, str]:
        """The pipeline for a UI precision and the precision's resolved name."""
        prec = build.resolve_precision(precision, self.device, self.cfg)
        with self._lock:
            if prec.name not in self._pipes:
                base = self._pipes["fp32"]
                vq = base.autoencoder
                if prec.autoencoder_dtype != torch.float32 or prec.autoencoder_format != torch.contiguous_format:
                    vq = copy.deepcopy(vq).to(dtype=prec.autoencoder_dtype, memory_format=prec.autoencoder_format)
                self._pipes[prec.name] = dataclasses.replace(base, autoencoder=vq, autocast=prec.autocast,
                                                             fast_float32=prec.fast_float32)
            return self._pipes[prec.name], prec.name

    def __call__(self, path: str | os.PathLike, tile: int = default("chop_size"), seed: int = default("seed"),
                 blend: str = default("blend"), precision: str = default("precision")) -> Result:
        """Super-resolve the image file at ``path``; raises ``gr.Error`` with a message for a user. The
        file is decoded only once :func:`check_upload` has read its size from the header."""
        if blend not in BLENDS or precision not in UI_PRECISIONS:
            raise gr.Error(f"blend must be one of {BLENDS}, precision one of {UI_PRECISIONS}")
        check_upload(path, self.max_side)
        try:
            image = read_image(path)
        except ImageReadError as e:
            raise gr.Error(f"cannot read image {Path(path).name}: {e.reason}") from None
        h, w = image.rgb.shape[-2:]
        pipe, prec = self.pipeline(precision)
        start = time.perf_counter()
        generator = torch.Generator(pipe.device).manual_seed(int(seed))
        try:
            sr = pipe(image.rgb, tile=int(tile), blend=blend, generator=generator).cpu()
        except ValueError as e:  # a tile size the pipeline refuses
            raise gr.Error(str(e)) from None
        took = time.perf_counter() - start
        bicubic = F.interpolate(image.rgb, scale_factor=pipe.sf, mode="bicubic").clamp(0, 1)
        alpha = None  # kept as inference_quant.py keeps it: bicubic, not through the model
        if image.alpha is not None:
            alpha = F.interpolate(image.alpha, scale_factor=pipe.sf, mode="bicubic").clamp(0, 1)
        file = self._next_dir() / f"{Path(path).stem}_x{pipe.sf}.png"
        write_image(file, sr, alpha=alpha, mode=image.mode, bit_depth=image.bit_depth)
        status = (f"{w}x{h} -> {sr.shape[-1]}x{sr.shape[-2]} in {took:.1f} s on {self.device} ({prec}), "
                  f"{self.name}, tile {int(tile)}, {blend} blending, seed {int(seed)}")
        return Result(to_uint8(bicubic), to_uint8(sr), to_uint8(compare_panel(image.rgb, sr)), file, status)

    def _next_dir(self) -> Path:
        """A fresh folder for one request's files; with it, only the latest ``keep`` are kept."""
        with self._lock:
            self._count += 1
            folder = self.outdir / f"{self._count:06d}"
            older = sorted(self.outdir.iterdir())
            for old in older[:len(older) - (self.keep - 1)]:
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir()
        return folder


def precision_info(device: torch.device, cfg: DictConfig) -> str:
    """The precision choice's hint: what ``auto`` is here, and :func:`build.emulated_bf16_note`."""
    note = build.emulated_bf16_note(device)
    return f"auto is {build.resolve_precision('auto', device, cfg).name} here" + (f"; {note}" if note else "")


def build_ui(upscaler: Upscaler, note: str = "", title: str = "BiMaCoSR x4 super-resolution") -> gr.Blocks:
    """The page: input image, tile size, seed, blending, precision and a button on the left; the
    before/after slider, the comparison panel, the SR PNG and a status line on the right; ``note``
    is shown under the title. The button's API name is ``/upscale`` (inputs in that order; outputs
    slider, panel, file, status).

    Gradio's cache is set to ``upscaler.workdir`` (``GRADIO_TEMP_DIR`` of this process, read by the
    components and the server as they are made): the result files are served from where they are
    written, never copied, and the uploads of the latest ``upscaler.keep`` requests are kept, so the
    files on disk stay bounded and all go with the folder at exit."""
    os.environ["GRADIO_TEMP_DIR"] = str(upscaler.workdir)

    def run(upload: dict | None, tile: float, seed: float, blend: str, precision: str):
        if upload is None:  # gr.Image's payload as sent (preprocessing off, below): the file is unread
            raise gr.Error("upload an image first")
        try:
            r = upscaler(upload["path"], int(tile), int(seed), blend, precision)
        finally:
            _keep_latest(page.upload_file_set, upscaler.keep, upload["path"])
        views = [r.file.parent / f"{view}.png" for view in ("before", "after", "panel")]
        for pixels, view in zip((r.before, r.sr, r.panel), views):
            Image.fromarray(pixels).save(view, compress_level=1)  # read once by the browser: fast rather than small
        return (str(views[0]), str(views[1])), str(views[2]), str(r.file), r.status

    examples = find_images(REPO_ROOT / "examples") if (REPO_ROOT / "examples").is_dir() else []
    # analytics off: no telemetry or version-check requests leave the machine
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}\nUpload a low-resolution photo; the model returns it 4x larger. "
                    f"Weights: `{upscaler.name}` on `{upscaler.device}`." + (f"\n\n**{note}**" if note else ""))
        with gr.Row():
            with gr.Column(scale=1):
                # the uploaded file as it is (16-bit, grey, alpha: read_image handles them)
                image = gr.Image(type="filepath", label="low-resolution input", sources=["upload", "clipboard"])
                tile = gr.Slider(64, 512, value=default("chop_size"), step=32, label="tile size (LR pixels)",
                                 info="larger images are cut into tiles of this size")
                seed = gr.Number(value=default("seed"), precision=0, label="seed")
                blend = gr.Radio(list(BLENDS), value=default("blend"), label="tile blending",
                                 info="average: the original's; gaussian: seam-free")
                precision = gr.Radio(list(UI_PRECISIONS), value=default("precision"), label="precision",
                                     info=precision_info(upscaler.device, upscaler.cfg))
                button = gr.Button("Upscale x4", variant="primary")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="examples/ (degraded photographs)")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="before (bicubic x4) | after (BiMaCoSR x4)", format="png",
                                        type="numpy")
                with gr.Accordion("comparison panel (LR nearest | bicubic | SR, and a zoomed detail)", open=False):
                    panel = gr.Image(label="comparison", format="png", type="numpy")
                file = gr.File(label="SR image (PNG)")
                status = gr.Textbox(label="run", interactive=False)
        # preprocess off: gr.Image opens the upload with Pillow first, so a file that is not an image, or
        # one over Pillow's pixel limit, ended in Gradio's generic error before check_upload could name it
        button.click(run, [image, tile, seed, blend, precision], [slider, panel, file, status], api_name="upscale",
                     preprocess=False)
    return page
