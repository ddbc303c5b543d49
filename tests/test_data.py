"""Pairing, reading, bad-input errors and the DataModule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.discovery import find_pairs, read_metadata
from bts_lightning.data.io import binarize_mask, read_grayscale
from bts_lightning.errors import ConfigError, DataError


def write_metadata(root: Path, rows: list[str], header: str = "index,label,fold") -> None:
    (root / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")


def datamodule(root: Path, **kwargs) -> BrainTumorDataModule:
    defaults = dict(image_size=32, batch_size=4, num_workers=0, download=False)
    return BrainTumorDataModule(root, **{**defaults, **kwargs})


def test_pairs_by_stem_across_formats_in_natural_order(make_dataset):
    root = make_dataset(["10", "2", "1"], image_ext=".png", mask_ext=".tif")
    blank = np.zeros((32, 32), np.uint8)
    cv2.imwrite(str(root / "images" / "3.jpg"), blank)
    cv2.imwrite(str(root / "images" / "4.jpeg"), blank)
    cv2.imwrite(str(root / "masks" / "3.png"), blank)
    cv2.imwrite(str(root / "masks" / "4.bmp"), blank)
    (root / "images" / "notes.txt").write_text("ignored")
    pairs = find_pairs(root)
    assert [p.stem for p in pairs] == ["1", "2", "3", "4", "10"]
    assert pairs[2].image.name == "3.jpg" and pairs[2].mask.name == "3.png"
    assert pairs[0].mask.suffix == ".tif"


def test_missing_root_says_where_to_put_data(tmp_path):
    with pytest.raises(DataError, match="does not exist") as error:
        datamodule(tmp_path / "nowhere").setup("fit")
    assert "data=synthetic" in str(error.value) and "nowhere" in str(error.value)


def test_no_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="No images"):
        find_pairs(tmp_path)


def test_unpaired_files_are_named(make_dataset):
    root = make_dataset(["1", "2", "3"])
    (root / "masks" / "2.png").unlink()
    cv2.imwrite(str(root / "masks" / "7.png"), np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError) as error:
        find_pairs(root)
    message = str(error.value)
    assert "image(s) without a mask" in message and "2.png" in message
    assert "mask(s) without an image" in message and "7.png" in message


def test_duplicate_stems_are_rejected(make_dataset):
    root = make_dataset(["1"])
    cv2.imwrite(str(root / "images" / "1.jpg"), np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match="1.jpg"):
        find_pairs(root)


def test_corrupt_and_mismatched_files_fail_setup_with_names(make_dataset):
    root = make_dataset([str(i) for i in range(1, 7)])
    (root / "images" / "3.png").write_bytes(b"not a png at all")
    (root / "masks" / "5.png").write_bytes(b"")
    cv2.imwrite(str(root / "masks" / "6.png"), np.zeros((20, 32), np.uint8))
    with pytest.raises(DataError) as error:
        datamodule(root).setup("fit")
    message = str(error.value)
    assert "3.png" in message and "5.png" in message and "unreadable" in message
    assert "6.png" in message and "size mismatch" in message


def test_metadata_rows_must_match_files(make_dataset):
    root = make_dataset(["1", "2"])
    write_metadata(root, ["1,1,1", "2,1,2", "99,1,1"])
    with pytest.raises(DataError, match="99"):
        read_metadata(root, ["1", "2"])
    write_metadata(root, ["1,1,1"])
    with pytest.raises(DataError, match="no metadata row: 2"):
        read_metadata(root, ["1", "2"])


def test_unknown_fold_lists_available_folds(make_dataset):
    root = make_dataset(["1", "2", "3"])
    write_metadata(root, ["1,1,1", "2,1,2", "3,1,3"])
    with pytest.raises(ConfigError, match=r"data.val_fold=7 .*available folds: 1, 2, 3"):
        datamodule(root, val_fold=7).setup("fit")


def test_reads_16bit_rgb_and_binarizes_at_half_max(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.tif"), ramp)
    image = read_grayscale(tmp_path / "deep.tif")
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    cv2.imwrite(str(tmp_path / "rgb.png"), np.full((4, 4, 3), 200, np.uint8))
    assert read_grayscale(tmp_path / "rgb.png").shape == (4, 4)
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    assert binarize_mask(mask).tolist() == [[0, 0], [1, 1]]
    assert binarize_mask(np.zeros((2, 2), np.uint8)).sum() == 0


def test_datamodule_batches_resized_uint8_and_no_augmentation_on_validation(synthetic_root):
    import albumentations as A

    dm = datamodule(synthetic_root, image_size=48, val_fold=1, test_fold=2, augmentations=[A.VerticalFlip(p=1.0)])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 48, 48) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 48, 48) and set(batch["mask"].unique().tolist()) <= {0, 1}
    val = dm.datasets["val"]
    image, mask = val.load(0)
    assert torch.equal(val[0]["image"][0], torch.from_numpy(image))
    train = dm.datasets["train"]
    image, mask = train.load(0)
    assert torch.equal(train[0]["image"][0], torch.from_numpy(image[::-1].copy()))
    assert torch.equal(train[0]["mask"], torch.from_numpy(mask[::-1].copy()))
    assert dm.has_test and dm.label_of(dm.split.val[0]) in {"1", "2", "3"}


def test_cache_gives_the_same_slices_as_reading_from_disk(synthetic_root):
    cached, uncached = datamodule(synthetic_root, cache=True), datamodule(synthetic_root, cache=False)
    cached.setup("fit")
    uncached.setup("fit")
    for position in (0, 3):
        for a, b in zip(cached.datasets["val"].load(position), uncached.datasets["val"].load(position)):
            np.testing.assert_array_equal(a, b)


def test_missing_root_is_fetched_with_kagglehub(tmp_path, make_dataset, monkeypatch):
    import types

    from bts_lightning.data import download

    downloaded = make_dataset(["1", "2"]).parent
    fake = types.SimpleNamespace(dataset_download=lambda handle: str(downloaded))
    monkeypatch.setitem(__import__("sys").modules, "kagglehub", fake)
    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name: object())
    assert download.resolve_root(tmp_path / "missing", download=True) == downloaded / "dataset"

    def offline(handle):
        raise ConnectionError("no network")

    fake.dataset_download = offline
    with pytest.raises(DataError, match="kagglehub download failed: no network") as error:
        download.resolve_root(tmp_path / "missing", download=True)
    assert "data=synthetic" in str(error.value)
