"""Tests for bimacosr.imageio on small crops of real photographs from skimage.data."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from bimacosr import imageio
from bimacosr.imageio import ImageReadError, list_images, read_image, to_uint8, write_image
from tests.conftest import animation


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut()[100:148, 180:244].copy()  # 48x64x3 uint8, non-square


@pytest.fixture(scope="module")
def gray_photo() -> np.ndarray:
    return data.camera()[60:108, 200:264].copy()  # 48x64 uint8


def as_tensor(a: np.ndarray, peak: float = 255.0) -> torch.Tensor:
    """H x W x C integer array -> [1, C, H, W] float32."""
    return torch.from_numpy(a.astype(np.float32) / peak).permute(2, 0, 1).unsqueeze(0)


def test_rgb_png_round_trip_exact(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert (img.mode, img.bit_depth, img.alpha, img.path) == ("rgb", 8, None, tmp_path / "a.png")
    assert img.rgb.dtype == torch.float32 and img.rgb.shape == (1, 3, 48, 64)
    assert np.array_equal(to_uint8(img.rgb), photo)
    write_image(tmp_path / "out" / "b.png", img.rgb, mode=img.mode)  # creates the folder
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "b.png")), photo)


def test_gray_png_round_trip_exact(tmp_path, gray_photo):
    Image.fromarray(gray_photo).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert (img.mode, img.bit_depth) == ("gray", 8) and img.rgb.shape == (1, 3, 48, 64)
    assert np.array_equal(to_uint8(img.rgb), np.repeat(gray_photo[..., None], 3, axis=2))
    write_image(tmp_path / "g2.png", img.rgb, mode="gray")
    out = Image.open(tmp_path / "g2.png")
    assert out.mode == "L" and np.array_equal(np.asarray(out), gray_photo)


def test_gray_write_uses_bt601_luma(tmp_path, photo):
    write_image(tmp_path / "l.png", as_tensor(photo), mode="gray")
    luma = photo.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(np.asarray(Image.open(tmp_path / "l.png")).astype(float) - luma).max() <= 0.51


def test_rgba_and_gray_alpha_png_round_trip_exact(tmp_path, photo, gray_photo):
    rgba = np.dstack([photo, gray_photo])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.mode == "rgba" and img.alpha.shape == (1, 1, 48, 64)
    assert np.array_equal(to_uint8(img.rgb), photo)
    assert np.array_equal(to_uint8(img.alpha.expand(-1, 3, -1, -1))[..., 0], gray_photo)
    write_image(tmp_path / "b.png", img.rgb, img.alpha, mode="rgba")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), rgba)

    la = np.dstack([gray_photo, photo[..., 0]])
    Image.fromarray(la).save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    assert img.mode == "gray_alpha"
    write_image(tmp_path / "la2.png", img.rgb, img.alpha, mode="gray_alpha")
    out = Image.open(tmp_path / "la2.png")
    assert out.mode == "LA" and np.array_equal(np.asarray(out), la)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trip_exact(tmp_path, channels):
    ramp = (np.arange(40 * 56 * channels, dtype=np.int64) * 977 + 13) % 65536
    ramp = ramp.reshape(40, 56, channels).astype(np.uint16)
    assert (ramp % 257 != 0).mean() > 0.99  # not representable as 8-bit * 257
    mode = {1: "gray", 2: "gray_alpha", 3: "rgb", 4: "rgba"}[channels]
    x = as_tensor(ramp, 65535.0)
    color = x[:, :-1] if channels in (2, 4) else x
    alpha = x[:, -1:] if channels in (2, 4) else None
    rgb = color.expand(-1, 3, -1, -1)
    write_image(tmp_path / "r.png", rgb, alpha, mode=mode, bit_depth=16)
    # Independent check of our encoder: Pillow decodes 16-bit gray fully and, for colour/alpha,
    # keeps the high bytes (16-bit LA comes back as RGBA = L, L, L, A).
    pil = np.asarray(Image.open(tmp_path / "r.png"))
    if channels == 1:
        assert np.array_equal(pil, ramp[..., 0])
    else:
        high = pil[..., [0, 3]] if channels == 2 else pil
        assert np.array_equal(high, (ramp >> 8).astype(np.uint8))
    img = read_image(tmp_path / "r.png")
    assert (img.mode, img.bit_depth) == (mode, 16)
    back = torch.cat([img.rgb[:, :1] if channels in (1, 2) else img.rgb]
                     + ([img.alpha] if img.alpha is not None else []), dim=1)
    samples = torch.round(back[0] * 65535).permute(1, 2, 0).numpy().astype(np.uint16)
    assert np.array_equal(samples, ramp)
    assert float(back.max()) <= 1.0


def test_16bit_gray_png_written_by_pillow(tmp_path, gray_photo):
    g16 = gray_photo.astype(np.uint16) * 256 + 255 - gray_photo  # low byte differs from high
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert (img.mode, img.bit_depth) == ("gray", 16)
    assert torch.equal(torch.round(img.rgb[0, 1] * 65535), torch.from_numpy(g16.astype(np.float32)))


def test_16bit_request_falls_back_to_8bit_for_jpeg(tmp_path, photo):
    write_image(tmp_path / "a.jpg", as_tensor(photo), bit_depth=16)
    assert read_image(tmp_path / "a.jpg").bit_depth == 8


def test_jpeg_reads_back_close(tmp_path, photo):
    write_image(tmp_path / "a.JPG", as_tensor(photo))
    img = read_image(tmp_path / "a.JPG")
    assert img.mode == "rgb" and img.rgb.shape == (1, 3, 48, 64)
    err = np.abs(to_uint8(img.rgb).astype(int) - photo.astype(int))
    assert err.mean() < 3.0 and err.max() < 40


def test_webp_lossless_exact(tmp_path, photo, gray_photo):
    rgba = np.dstack([photo, gray_photo])
    alpha = as_tensor(gray_photo[..., None])
    write_image(tmp_path / "a.webp", as_tensor(photo), alpha, mode="rgba")
    img = read_image(tmp_path / "a.webp")
    assert img.mode == "rgba"
    alpha_back = to_uint8(img.alpha.expand(-1, 3, -1, -1))[..., :1]
    assert np.array_equal(np.dstack([to_uint8(img.rgb), alpha_back]), rgba)


def test_bmp_and_tiff(tmp_path, photo):
    for name in ("a.bmp", "a.tiff"):
        write_image(tmp_path / name, as_tensor(photo))
        assert np.array_equal(to_uint8(read_image(tmp_path / name).rgb), photo)


def test_alpha_dropped_with_warning_for_jpeg(tmp_path, photo):
    with pytest.warns(UserWarning, match="cannot store alpha"):
        write_image(tmp_path / "a.jpg", as_tensor(photo), torch.ones(1, 1, 48, 64), mode="rgba")
    assert read_image(tmp_path / "a.jpg").mode == "rgb"


def test_exif_orientation_6_rotates_clockwise(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "r.jpg", quality=95, exif=exif)
    raw = np.asarray(Image.open(tmp_path / "r.jpg"))  # stored (unrotated) pixels
    img = read_image(tmp_path / "r.jpg")
    assert img.rgb.shape == (1, 3, 64, 48)
    assert np.array_equal(to_uint8(img.rgb), np.rot90(raw, k=-1))


def test_palette_png(tmp_path):
    coffee = data.coffee()[150:198, 250:314].copy()
    pal = Image.fromarray(coffee).quantize(colors=32)
    pal.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    assert img.mode == "rgb" and img.alpha is None
    assert np.array_equal(to_uint8(img.rgb), np.asarray(pal.convert("RGB")))

    pal.save(tmp_path / "pt.png", transparency=0)
    img = read_image(tmp_path / "pt.png")
    assert img.mode == "rgba"
    transparent = np.asarray(pal) == 0
    assert transparent.any() and np.array_equal(img.alpha[0, 0].numpy() == 0, transparent)


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, 254.5, 300.0, -3.0]) / 255
    assert to_uint8(x.view(1, 1, 6).expand(3, 1, 6))[0, :, 0].tolist() == [0, 2, 2, 254, 255, 0]


def test_random_bytes_raise_read_error(tmp_path):
    bad = tmp_path / "noise.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="cannot identify image file") as info:
        read_image(bad)
    assert "noise.png" in str(info.value) and info.value.path == bad


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_file_raises_read_error(tmp_path, photo, name):
    full = tmp_path / ("full" + name[-4:])
    Image.fromarray(photo).save(full)
    payload = full.read_bytes()
    (tmp_path / name).write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_image(tmp_path / name)
    assert name in str(info.value)


def test_missing_file_raises_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="not found") as info:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_list_images_sorted_case_insensitive(tmp_path):
    for name in ("b.PNG", "a.jpg", "C.JpEg", "d.webp", "e.Tif", "f.bmp", "g.tiff", "notes.txt",
                 ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == [
        "C.JpEg", "a.jpg", "b.PNG", "d.webp", "e.Tif", "f.bmp", "g.tiff"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no image files in folder .*\.png"):
        list_images(tmp_path)


def test_an_animation_is_read_as_its_first_frame_and_says_how_many(tmp_path, photo):
    image = read_image(animation(tmp_path / "anim.gif"))
    assert image.frames == 3 and image.rgb.shape == (1, 3, 6, 8) and torch.all(image.rgb == 10 / 255)
    Image.fromarray(photo).save(tmp_path / "still.png")
    assert read_image(tmp_path / "still.png").frames == 1


def test_a_folder_of_gifs_only_names_them(tmp_path):
    animation(tmp_path / "anim.gif")
    with pytest.raises(ValueError, match="no image files in folder .*; its 1 GIF file.s. are left out: give one"):
        list_images(tmp_path)


def test_write_rejects_bad_input(tmp_path, photo):
    x = as_tensor(photo)
    with pytest.raises(ValueError, match="extension"):
        write_image(tmp_path / "a.gif", x)
    with pytest.raises(ValueError, match="needs alpha"):
        write_image(tmp_path / "a.png", x, mode="rgba")
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "a.png", x * float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_existing_file_on_failure(tmp_path, photo, monkeypatch):
    target = tmp_path / "keep.png"
    write_image(target, as_tensor(photo))
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, as_tensor(photo[::-1].copy()))
    monkeypatch.setattr(imageio, "_png16", lambda samples: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_image(target, as_tensor(photo), bit_depth=16)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_successful_write_leaves_no_temp_file(tmp_path, photo):
    write_image(tmp_path / "x.png", as_tensor(photo))
    write_image(tmp_path / "x.png", as_tensor(photo), bit_depth=16)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert read_image(tmp_path / "x.png").bit_depth == 16
    reference = tmp_path.parent / f"{tmp_path.name}-plain"
    reference.write_bytes(b"")  # permissions follow the umask like any plain file, not 0600
    assert os.stat(tmp_path / "x.png").st_mode == os.stat(reference).st_mode
