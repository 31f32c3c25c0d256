"""Training (Real-ESRGAN) and validation (paired folder) datasets on real photographs, the crop /
pad / resize transforms and the builders from the config sections."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from skimage import data as skdata

from bimacosr.data.datasets import (
    PairedFolderDataset,
    RealESRGANDataset,
    build_train_dataset,
    build_val_dataset,
    find_images,
)
from bimacosr.data.transforms import area_matrix, area_resize, augment, pad_to_square, random_crop
from bimacosr.imageio import ImageReadError, read_image, write_image


def write(path: Path, rgb_uint8: np.ndarray) -> Path:
    return write_image(path, torch.from_numpy(rgb_uint8).permute(2, 0, 1).float() / 255)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Crops of skimage photographs in mixed-case extensions: 80x120 (crop + area resize to 64),
    50x40 JPEG (padded to 64), 64x64 WebP in a subfolder (used whole), and a text file."""
    root = tmp_path_factory.mktemp("train")
    write(root / "a_astronaut.PNG", skdata.astronaut()[100:180, 150:270])
    write(root / "b_coffee.jpg", skdata.coffee()[100:150, 200:240])
    write(root / "sub" / "c_chelsea.webp", skdata.chelsea()[60:124, 180:244])
    (root / "notes.txt").write_text("not an image")
    return root


def dataset(folder: Path, **kw) -> RealESRGANDataset:
    return RealESRGANDataset([folder], ["png", "JPEG", "webp"], gt_size=64, **kw)


def test_files_any_case_recursive_sorted(photos: Path) -> None:
    names = [p.name for p in dataset(photos).paths]
    assert names == ["a_astronaut.PNG", "b_coffee.jpg", "c_chelsea.webp"]
    assert [p.name for p in find_images(photos, "JPG")] == ["b_coffee.jpg"]
    assert find_images(photos, "webp", recursive=False) == []


def test_items_shapes_ranges_and_kernels(photos: Path) -> None:
    ds = dataset(photos)
    for i in range(len(ds)):
        item = ds[i]
        assert item["gt"].shape == (3, 64, 64) and item["gt"].dtype == torch.float32
        assert 0 <= item["gt"].min() and item["gt"].max() <= 1
        assert item["kernel1"].shape == (21, 21) and item["kernel2"].shape == (15, 15)
        assert item["sinc_kernel"].shape == (15, 15) and item["gt_path"] == str(ds.paths[i])
        for k in ("kernel1", "kernel2", "sinc_kernel"):
            assert item[k].dtype == torch.float32 and abs(item[k].double().sum() - 1) < 1e-5


def test_items_are_deterministic_per_seed_epoch_index(photos: Path) -> None:
    ds = dataset(photos, seed=3)
    later = ds[2]
    first = ds[0]
    again = dataset(photos, seed=3)[0]  # other object, other access order
    assert all(torch.equal(first[k], again[k]) for k in ("gt", "kernel1", "kernel2", "sinc_kernel"))
    ds.set_epoch(1)
    moved = ds[0]
    assert not all(torch.equal(first[k], moved[k]) for k in ("gt", "kernel1", "kernel2"))
    ds.set_epoch(0)
    assert torch.equal(ds[0]["kernel1"], first["kernel1"]) and torch.equal(ds[2]["gt"], later["gt"])
    assert not torch.equal(dataset(photos, seed=4)[0]["kernel1"], first["kernel1"])


def test_hflip_happens_about_half_the_time(photos: Path) -> None:
    ds = dataset(photos)
    whole = read_image(ds.paths[2]).rgb[0]  # 64x64: no crop, no resize
    flips = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        gt = ds[2]["gt"]
        assert torch.equal(gt, whole) or torch.equal(gt, whole.flip(-1))
        flips.append(torch.equal(gt, whole.flip(-1)))
    assert 0 < sum(flips) < 12


def test_small_image_is_reflect_padded(photos: Path) -> None:
    gt = dataset(photos, use_hflip=False)[1]["gt"]
    img = read_image(photos / "b_coffee.jpg").rgb[0]  # 50x40
    assert torch.equal(gt[:, :50, :40], img)
    assert torch.equal(gt[:, 50:, :40], img[:, 35:49].flip(-2))  # reflect-101: the edge row is not repeated
    assert torch.equal(gt[:, :50, 40:], img[:, :, 15:39].flip(-1))


def test_large_image_is_cropped_then_area_resized(photos: Path) -> None:
    gt = dataset(photos, use_hflip=False)[0]["gt"]
    img = read_image(photos / "a_astronaut.PNG").rgb[0]  # 80x120 -> 80x80 crop -> 64x64
    diffs = [(area_resize(img[:, :, left:left + 80], 64) - gt).abs().max().item() for left in range(41)]
    assert min(diffs) == 0.0


def test_missing_folder_no_images_and_unreadable_file(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no training images found in .*'\.png', '\.jpg'"):
        RealESRGANDataset([photos / "sub"], ["png", "jpg"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    ds = dataset(tmp_path)
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[0]


def test_transforms() -> None:
    img = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert pad_to_square(img, 12).shape == (2, 12, 12)  # several rounds: 5x3 -> 10x6 -> 12x12
    assert torch.equal(pad_to_square(img, 4)[:, :, 3], img[:, :, 1])  # 5x3 -> 5x4
    assert random_crop(img, 3, random.Random(0)).shape == (2, 3, 3)
    rng = random.Random(0)
    assert torch.equal(augment(img, False, False, rng), img) and rng.getstate() == random.Random(0).getstate()
    m = area_matrix(10, 4)
    torch.testing.assert_close(m.sum(1), torch.ones(4, dtype=torch.float64))
    x = torch.rand(3, 8, 12)
    box = F.avg_pool2d(x[None, :, :, :8], 2)[0]
    torch.testing.assert_close(area_resize(x[:, :, :8], 4), box, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="only shrinks"):
        area_resize(x, 9)


def test_transforms_match_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    a = np.random.default_rng(0).random((300, 410, 3)).astype(np.float32)
    ref = cv2.resize(a[:, :300], (256, 256), interpolation=cv2.INTER_AREA)
    got = area_resize(torch.from_numpy(a[:, :300]).permute(2, 0, 1), 256).permute(1, 2, 0).numpy()
    assert np.abs(ref - got).max() < 1e-6
    small = a[:7, :5]
    ref = cv2.copyMakeBorder(cv2.copyMakeBorder(small, 0, 7, 0, 5, cv2.BORDER_REFLECT_101), 0, 6, 0, 10,
                             cv2.BORDER_REFLECT_101)
    got = pad_to_square(torch.from_numpy(small).permute(2, 0, 1), 20).permute(1, 2, 0).numpy()
    assert np.array_equal(ref, got)


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    lr, hr = tmp_path / "LR", tmp_path / "HR"
    photo = skdata.rocket()
    for name, top in (("x.png", 0), ("y.PNG", 100)):
        write(hr / name, photo[top:top + 64, :64])
        write(lr / name, photo[top:top + 64:4, :64:4])
    return lr, hr


def test_paired_folder_dataset(pairs: tuple[Path, Path]) -> None:
    lr, hr = pairs
    ds = PairedFolderDataset(lr, hr, "png")
    assert len(ds) == 2 and ds[1]["path"] == str(lr / "y.PNG")
    item = ds[0]
    assert item["lq"].shape == (3, 16, 16) and item["gt"].shape == (3, 64, 64)
    torch.testing.assert_close(item["gt"], read_image(hr / "x.png").rgb[0] * 2 - 1)
    assert -1 <= item["lq"].min() and item["lq"].max() <= 1
    assert len(PairedFolderDataset(lr, hr, "png", length=1)) == 1


def test_paired_folder_errors(pairs: tuple[Path, Path], tmp_path: Path) -> None:
    lr, hr = pairs
    (hr / "y.PNG").unlink()
    with pytest.raises(ValueError, match=r"without an HR image .*: y\.PNG"):
        PairedFolderDataset(lr, hr)
    with pytest.raises(FileNotFoundError, match="nothing"):
        PairedFolderDataset(lr, tmp_path / "nothing")
    with pytest.raises(ValueError, match="no validation images in .*HR"):
        PairedFolderDataset(hr, lr, "webp")


def test_builders_from_config_sections(photos: Path, pairs: tuple[Path, Path], smoke_config) -> None:
    train = OmegaConf.merge(smoke_config.data.train, {"params": {"dir_paths": [str(photos)]}})
    ds = build_train_dataset(train, seed=1)
    assert len(ds) == 3 and ds.gt_size == 64 and ds.blur2.pad_size == 15 and ds.seed == 1
    assert ds[0]["gt"].shape == (3, 64, 64)
    lr, hr = pairs
    val = OmegaConf.merge(smoke_config.data.val, {"params": {"dir_path": str(lr), "dir_path_extra": str(hr)}})
    assert len(build_val_dataset(val)) == 2
    with pytest.raises(ValueError, match=r"data.train.type must be one of \['realesrgan'\], got 'paired'"):
        build_train_dataset(OmegaConf.merge(train, {"type": "paired"}))
    with pytest.raises(ValueError, match=r"must be one of \['folder'\]"):
        build_val_dataset(OmegaConf.merge(val, {"type": "realesrgan"}))
    with pytest.raises(ValueError, match=r"unknown realesrgan dataset parameter\(s\) \['blur_sigma3'\]"):
        build_train_dataset(OmegaConf.merge(train, {"params": {"blur_sigma3": [1, 2]}}))
