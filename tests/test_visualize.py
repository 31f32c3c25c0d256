"""Comparison panels: geometry, the pixels in each tile, the detail crop, and the written file."""
import numpy as np
import pytest
import torch

from bimacosr.imageio import read_image
from bimacosr.smoke import photo
from bimacosr.visualize import (BOX, LABEL_H, SEP, ZOOM, compare_panel, detail_window, label_height, panel,
                                save_compare)


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] Keys cubic resampling (half-pixel centres, edge-clamped taps)."""
    def w(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        for off in (-1, 0, 1, 2):
            m[i, min(max(i0 + off, 0), n_in - 1)] += w(src - (i0 + off))
    return m


def panel_shape(h: int, w: int, crop: int | None, s: int = 4) -> tuple[int, int, int]:
    ch, cw = (max(1, s * h // 2), max(1, s * w // 2)) if crop is None else (
        min(crop, s * h), min(crop, s * w))
    height = LABEL_H + s * h + SEP + LABEL_H + ZOOM * ch
    width = max(3 * s * w, 3 * ZOOM * cw) + 2 * SEP
    return 3, height, width


@pytest.mark.parametrize("h,w", [(1, 1), (1, 3), (3, 1), (2, 2), (8, 8), (5, 8), (8, 3), (16, 12)])
@pytest.mark.parametrize("crop", [None, 1, 3, 1000])
def test_geometry_and_range(h, w, crop):
    g = torch.Generator().manual_seed(h * 100 + w)
    lr, sr = torch.rand(1, 3, h, w, generator=g), torch.rand(1, 3, 4 * h, 4 * w, generator=g)
    panel = compare_panel(lr, sr, crop=crop)
    assert tuple(panel.shape) == panel_shape(h, w, crop)
    assert panel.dtype == torch.float32 and panel.min() >= 0 and panel.max() <= 1


def test_tiles_hold_nearest_bicubic_sr_and_the_zoomed_crop():
    g = torch.Generator().manual_seed(0)
    h, w = 6, 5
    lr, sr = torch.rand(1, 3, h, w, generator=g), torch.rand(1, 3, 4 * h, 4 * w, generator=g)
    panel = compare_panel(lr, sr).numpy()
    big_h, big_w = 4 * h, 4 * w
    low = lr[0].numpy().astype(np.float64)
    expected = [
        low.repeat(4, axis=1).repeat(4, axis=2),
        np.clip(np.einsum("Hh,chw,Ww->cHW", cubic_matrix(h, big_h), low, cubic_matrix(w, big_w)),
                0, 1),
        sr[0].numpy(),
    ]
    ch, cw = big_h // 2, big_w // 2
    y, x = detail_window(sr[0], (ch, cw))
    top, bottom = LABEL_H, LABEL_H + big_h + SEP + LABEL_H
    box = np.zeros((big_h, big_w), bool)  # the red outline marking the crop, BOX px inside it
    box[y:y + ch, x:x + cw] = True
    box[y + BOX:y + ch - BOX, x + BOX:x + cw - BOX] = False
    for k, tile in enumerate(expected):
        x0 = k * (big_w + SEP)
        full = panel[:, top:top + big_h, x0:x0 + big_w]
        np.testing.assert_allclose(full[:, ~box], tile[:, ~box], atol=1e-5)
        assert (full[:, box] == np.array([[1.0], [0.0], [0.0]])).all()
        crop = np.kron(tile[:, y:y + ch, x:x + cw], np.ones((1, ZOOM, ZOOM)))
        x0 = k * (ZOOM * cw + SEP)
        np.testing.assert_allclose(panel[:, bottom:bottom + ZOOM * ch, x0:x0 + ZOOM * cw], crop,
                                   atol=1e-5)
        label = panel[:, :LABEL_H, k * (big_w + SEP):k * (big_w + SEP) + big_w]
        assert label.max() == 1 and label.min() < 0.5  # black text on white
    assert (panel[:, :, big_w:big_w + SEP] == 1).all()  # column separator, both rows
    assert (panel[:, LABEL_H + big_h:LABEL_H + big_h + SEP] == 1).all()  # row separator


def test_crop_lands_on_the_detailed_region():
    sr = torch.full((1, 3, 64, 48), 0.5)
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(10), indexing="ij")
    sr[..., 40:52, 6:16] = ((yy + xx) % 2).float()  # checkerboard patch, flat elsewhere
    y, x = detail_window(sr[0], (32, 24))
    assert y <= 40 and y + 32 >= 52 and x <= 6 and x + 24 >= 16
    panel = compare_panel(sr[..., ::4, ::4], sr)
    bottom = LABEL_H + 64 + SEP + LABEL_H
    sr_crop = panel[:, bottom:bottom + 64, 2 * (48 + SEP):2 * (48 + SEP) + 48]
    assert torch.equal(sr_crop, sr[0, :, y:y + 32, x:x + 24].repeat_interleave(2, 1)
                       .repeat_interleave(2, 2))


def test_bad_shapes():
    with pytest.raises(ValueError, match="integer upscale"):
        compare_panel(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        compare_panel(torch.rand(3, 4, 4), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="crop"):
        compare_panel(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 16, 16), crop=0)


def test_save_compare_writes_a_readable_png(tmp_path):
    g = torch.Generator().manual_seed(1)
    lr, sr = torch.rand(1, 3, 3, 7, generator=g), torch.rand(1, 3, 12, 28, generator=g)
    path = save_compare(tmp_path / "out" / "cmp.png", lr, sr)
    assert path == tmp_path / "out" / "cmp.png"
    assert [p.name for p in path.parent.iterdir()] == ["cmp.png"]  # no temp file left
    image = read_image(path)
    panel = compare_panel(lr, sr)
    assert image.mode == "rgb" and image.rgb.shape[1:] == panel.shape
    assert (image.rgb[0] - panel).abs().max() <= 0.5 / 255 + 1e-6


def test_panel_lays_out_labelled_rows_of_any_width():
    a, b = torch.zeros(3, 4, 5), torch.full((3, 6, 3), 0.5)
    out = panel([[("a", a), (None, a)], [(None, b)]])
    assert tuple(out.shape) == (3, LABEL_H + 4 + SEP + 6, 5 + SEP + 5)
    assert torch.equal(out[:, LABEL_H:LABEL_H + 4, :5], a)
    assert (out[:, :LABEL_H, :5].min() < 0.5) and (out[:, :LABEL_H, 5 + SEP:] == 1).all()  # only "a" labelled
    assert torch.equal(out[:, LABEL_H + 4 + SEP:, :3], b) and (out[:, LABEL_H + 4 + SEP:, 3:] == 1).all()


def ink_rows(strip: torch.Tensor) -> int:
    """Rows of a label strip with dark (text) pixels: the text's height."""
    return int((strip.min(dim=0).values.min(dim=1).values < 0.5).sum())


def test_labels_grow_with_the_panel():
    """A 256² input gives a 3076 px wide panel: its labels are proportionally as tall as a small
    panel's once both are fitted to a screen, not 22 px."""
    small = compare_panel(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 256, 256))
    large = compare_panel(torch.rand(1, 3, 256, 256), torch.rand(1, 3, 1024, 1024))
    assert label_height(small.shape[2]) == LABEL_H and label_height(3076) == 53
    assert tuple(large.shape) == (3, 53 + 1024 + SEP + 53 + ZOOM * 512, 3076)
    assert ink_rows(large[:, :53, :1024]) >= 2 * ink_rows(small[:, :LABEL_H, :256]) > 0


def test_crop_label_names_its_window():
    sr = torch.full((1, 3, 64, 256), 0.5)
    sr[..., 40:52, 150:160] = torch.rand(12, 10)
    y, x = detail_window(sr[0], (32, 128))
    text = f"SR crop x{ZOOM} (x {x}-{x + 127}, y {y}-{y + 31})"
    strip = panel([[(text, torch.zeros(3, 1, ZOOM * 128))]])[:, :LABEL_H]
    crop_labels = LABEL_H + 64 + SEP
    x0 = 2 * (ZOOM * 128 + SEP)
    assert torch.equal(compare_panel(sr[..., ::4, ::4], sr)[:, crop_labels:crop_labels + LABEL_H, x0:], strip)


def test_crop_lands_on_the_detail_of_a_photo_with_a_flat_area():
    """A photograph whose left two thirds are painted flat grey: the crop avoids the flat part."""
    img = torch.from_numpy(photo("astronaut")[:192, :192].copy()).permute(2, 0, 1).float().div(255)[None]
    img[..., :, :128] = 0.5
    y, x = detail_window(img[0], (96, 96))
    assert x >= 96  # within the photographed third, not the top-left corner
    panel_img = compare_panel(torch.nn.functional.avg_pool2d(img, 4), img)
    crop_top = LABEL_H + 192 + SEP + LABEL_H
    sr_crop = panel_img[:, crop_top:crop_top + 2 * 96, 2 * (2 * 96 + SEP):]
    assert torch.equal(sr_crop, img[0, :, y:y + 96, x:x + 96].repeat_interleave(2, 1).repeat_interleave(2, 2))
