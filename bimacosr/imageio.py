"""Image reading/writing for inference (Pillow-based replacement of the original OpenCV I/O).

Differences from the original (docs/pipeline.md §4.3/§4.6), all deliberate fixes:
16-bit PNGs are scaled by 1/65535 (the original used 1/255) and can be written back as 16-bit;
alpha is split off and can be re-attached on write (the original dropped it); grayscale and
alpha inputs remember their mode; EXIF orientation is applied; folders are listed sorted by
name; writes are atomic (temp file + ``os.replace``).
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bimacosr.atomic import atomic_write

Mode = Literal["rgb", "gray", "rgba", "gray_alpha"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
GIF_EXTENSIONS = (".gif",)
"""Left out of image folders (animations of 256-colour frames) -- and named, never silently;
:func:`read_image` reads the first frame of one given as a file."""
# Pillow format and save options per extension. JPEG: quality 95 with 4:4:4 chroma (no
# subsampling); WebP: lossless, keeping RGB under fully transparent pixels (exact).
_SAVE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"lossless": True, "exact": True}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
}
SAVE_EXTENSIONS = tuple(_SAVE_FORMATS)
"""Extensions :func:`write_image` can write."""
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
# Pillow decodes 16-bit colour PNGs to 8 bits (high bytes only). Decoding the same stream a second
# time with a little-endian raw mode yields the low bytes; 16-bit LA is decoded as raw RGBA bytes.
_PNG16_LOW_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)


class ImageReadError(OSError):
    """An input image could not be read; ``path`` and ``reason`` are kept as attributes."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image '{path}': {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image.

    rgb: float32 [1, 3, H, W] in [0, 1] (grayscale replicated to 3 channels).
    alpha: float32 [1, 1, H, W] in [0, 1], or None when the file has no alpha.
    mode: what the file held, so ``write_image`` can write the result back the same way.
    bit_depth: 8 or 16 bits per channel in the file.
    frames: frames in the file (GIF, animated PNG / WebP, multi-page TIFF); only the first is read.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    mode: Mode
    bit_depth: int
    path: Path
    frames: int = 1


def _decode(path: Path, rawmode: str | None = None) -> Image.Image:
    """Open and fully decode (optionally overriding the PNG raw mode), EXIF orientation applied."""
    with Image.open(path) as im:
        if rawmode is not None:
            im.tile = [im.tile[0]._replace(args=rawmode)]
        im.load()
        return ImageOps.exif_transpose(im)


def _probe(path: Path) -> tuple[str | None, int]:
    """From the header: the raw mode of a single-tile PNG (None otherwise) and how many frames
    the file holds (1 for a still image)."""
    with Image.open(path) as probe:
        rawmode = probe.tile[0].args if probe.format == "PNG" and len(probe.tile) == 1 else None
        return rawmode, int(getattr(probe, "n_frames", 1))


def _pixels(path: Path, rawmode: str | None) -> tuple[np.ndarray, Mode, int]:
    """Return (H x W x C array of integer samples, mode, bit depth) with C = 1, 2, 3 or 4, of the
    first frame; ``rawmode`` as :func:`_probe` found it."""
    if rawmode in _PNG16_LOW_RAWMODE:
        low = np.asarray(_decode(path, _PNG16_LOW_RAWMODE[rawmode])).astype(np.uint16)
        if rawmode == "LA;16B":
            return low[..., 0::2] * 256 + low[..., 1::2], "gray_alpha", 16
        high = np.asarray(_decode(path)).astype(np.uint16)
        return high * 256 + low, ("rgb" if rawmode == "RGB;16B" else "rgba"), 16
    im = _decode(path)
    if im.mode in ("P", "PA", "L", "RGB") and "transparency" in im.info:
        im = im.convert("LA" if im.mode == "L" else "RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16)[..., None], "gray", 16
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))[..., None], "gray", 8
    if im.mode in ("LA", "La"):
        return np.asarray(im.convert("LA")), "gray_alpha", 8
    if im.mode in ("RGBA", "RGBa", "PA"):
        return np.asarray(im.convert("RGBA")), "rgba", 8
    if im.mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")), "rgb", 8
    raise ImageReadError(path, f"unsupported pixel mode {im.mode!r}")


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file (PNG 8/16-bit, JPEG, WebP, BMP, TIFF, ...) into a ``LoadedImage``.

    Raises ImageReadError (naming the file and the reason) for missing, unreadable, truncated,
    corrupt or unsupported files.
    """
    path = Path(path)
    try:
        rawmode, frames = _probe(path)
        samples, mode, bit_depth = _pixels(path, rawmode)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "cannot identify image file (not an image, or an "
                                   "unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, str(e) or type(e).__name__) from None
    x = torch.from_numpy(samples.astype(np.float32) / (255.0 if bit_depth == 8 else 65535.0))
    x = x.permute(2, 0, 1).unsqueeze(0).contiguous()
    color, alpha = (x[:, :-1], x[:, -1:]) if mode in ("rgba", "gray_alpha") else (x, None)
    rgb = color.expand(-1, 3, -1, -1).contiguous() if color.shape[1] == 1 else color
    return LoadedImage(rgb=rgb, alpha=alpha, mode=mode, bit_depth=bit_depth, path=path, frames=frames)


def _chw(x: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """[1, C, H, W] or [C, H, W] -> finite float32 CPU [C, H, W]."""
    x = x.detach().to("cpu", torch.float32)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != channels:
        raise ValueError(f"{name} must be [1, {channels}, H, W] or [{channels}, H, W], "
                         f"got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _quantize(x: torch.Tensor, bit_depth: int) -> np.ndarray:
    """Float [C, H, W] in [0, 1] -> H x W x C uint8/uint16: clamp, scale, round half-to-even."""
    peak, dtype = (255.0, np.uint8) if bit_depth == 8 else (65535.0, np.uint16)
    return torch.round(x.clamp(0.0, 1.0) * peak).permute(1, 2, 0).numpy().astype(dtype)


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """rgb [1, 3, H, W] or [3, H, W] in [0, 1] -> H x W x 3 uint8 (clamped, round half-to-even)."""
    return _quantize(_chw(rgb, 3, "rgb"), 8)


def _png16(samples: np.ndarray) -> bytes:
    """Encode H x W x C uint16 (C = 1..4) as a 16-bit PNG (Pillow cannot write 16-bit colour)."""
    h, w, c = samples.shape
    rows = np.ascontiguousarray(samples.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    filtered = rows.copy()
    filtered[:, 2 * c:] -= rows[:, :-2 * c]  # PNG "Sub" filter (wraps modulo 256)
    data = np.concatenate([np.ones((h, 1), np.uint8), filtered], axis=1).tobytes()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", w, h, 16, _PNG_COLOR_TYPE[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(data, 6)) + chunk(b"IEND", b""))


def _atomic_write(path: Path, save: Callable[[BinaryIO], None]) -> None:
    """``save(file)`` into a temp file, then moved into place (bimacosr/atomic.py)."""
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            save(f)
    atomic_write(path, write)


def write_image(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
                mode: Mode = "rgb", bit_depth: int = 8) -> Path:
    """Atomically write rgb ([1, 3, H, W] or [3, H, W], [0, 1]) in the format of the extension.

    mode 'gray'/'gray_alpha' write one colour channel: ITU-R BT.601 luma
    (0.299 R + 0.587 G + 0.114 B, the weights of Pillow's ``convert('L')``) computed in float
    before rounding. 'rgba'/'gray_alpha' need ``alpha`` ([1, 1, H, W] or [1, H, W], [0, 1]);
    JPEG and BMP cannot store alpha, so it is dropped there with a warning. bit_depth 16 is
    honoured for PNG only; other formats are written with 8 bits. Parent folders are created.
    Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() not in _SAVE_FORMATS:
        raise ValueError(f"cannot write '{path}': extension must be one of {IMAGE_EXTENSIONS}")
    if mode not in ("rgb", "gray", "rgba", "gray_alpha") or bit_depth not in (8, 16):
        raise ValueError(f"unsupported mode {mode!r} / bit_depth {bit_depth}")
    fmt, options = _SAVE_FORMATS[path.suffix.lower()]
    color = _chw(rgb, 3, "rgb")
    if mode in ("gray", "gray_alpha"):
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        color = (color * weights).sum(0, keepdim=True)
    has_alpha = mode in ("rgba", "gray_alpha")
    if has_alpha != (alpha is not None):
        raise ValueError(f"mode {mode!r} {'needs' if has_alpha else 'takes no'} alpha")
    planes = [color]
    if alpha is not None:
        a = _chw(alpha, 1, "alpha")
        if a.shape[1:] != color.shape[1:]:
            raise ValueError(f"alpha size {tuple(a.shape[1:])} != "
                             f"rgb size {tuple(color.shape[1:])}")
        if fmt in _ALPHA_FORMATS:
            planes.append(a)
        else:
            warnings.warn(f"{fmt} cannot store alpha; writing '{path}' without it", stacklevel=2)
    samples = _quantize(torch.cat(planes), 16 if bit_depth == 16 and fmt == "PNG" else 8)
    if samples.dtype == np.uint16:
        _atomic_write(path, lambda f: f.write(_png16(samples)))
    else:
        im = Image.fromarray(samples[..., 0] if samples.shape[2] == 1 else samples)  # L/LA/RGB/A
        _atomic_write(path, lambda f: im.save(f, format=fmt, **options))
    return path


_SAME_FORMAT = {".jpg": (".jpg", ".jpeg"), ".jpeg": (".jpg", ".jpeg"), ".tif": (".tif", ".tiff"),
                ".tiff": (".tif", ".tiff")}


def image_extensions(im_exts: str | Iterable[str]) -> tuple[str, ...]:
    """Extensions to match, lower case with a dot, JPEG and TIFF spellings together:
    'JPEG' -> ('.jpg', '.jpeg'); ['png', '.WebP'] -> ('.png', '.webp')."""
    exts = [im_exts] if isinstance(im_exts, str) else list(im_exts)
    dotted = ["." + e.lower().lstrip(".") for e in exts]
    return tuple(dict.fromkeys(x for e in dotted for x in _SAME_FORMAT.get(e, (e,))))


def find_images(folder: str | os.PathLike, im_exts: str | Iterable[str] = IMAGE_EXTENSIONS,
                recursive: bool = False) -> list[Path]:
    """The one rule for image folders: files under ``folder`` (recursively or not) whose extension
    is one of ``im_exts`` in any case ('jpg'/'jpeg' and 'tif'/'tiff' interchangeable), hidden
    (dot) files skipped, sorted by path. A missing folder raises FileNotFoundError."""
    folder, exts = Path(folder), image_extensions(im_exts)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: '{folder}'")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file())


def list_images(path: str | os.PathLike) -> list[Path]:
    """A file -> [file]; a folder -> its image files (:func:`find_images`, not recursive); a
    folder without any is an error naming the accepted extensions (and its GIFs, if any)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: '{path.absolute()}'")
    if not path.is_dir():
        return [path]
    files = find_images(path)
    if not files:
        gifs = len(find_images(path, GIF_EXTENSIONS))
        hint = f"; its {gifs} GIF file(s) are left out: give one as a file to use its first frame" if gifs else ""
        raise ValueError(f"no image files in folder '{path}' (accepted extensions, any case: "
                         f"{', '.join(IMAGE_EXTENSIONS)}){hint}")
    return files
