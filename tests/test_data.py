"""Pairing, reading, bad-input errors and the DataModule."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.discovery import find_pairs, natural_key, read_metadata
from bts_lightning.data.io import binarize_mask, mask_threshold, read_mask, resize
from bts_lightning.data.sampling import EpochShuffleSampler, RankShare
from bts_lightning.data.splits import slice_ids_digest
from bts_lightning.errors import ConfigError, DataError


def write_metadata(root: Path, rows: list[str], header: str = "index,label,fold") -> None:
    (root / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")


def datamodule(root: Path, **kwargs) -> BrainTumorDataModule:
    defaults = {"image_size": 32, "batch_size": 4, "num_workers": 0, "download": False}
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
    assert sorted(["b", "10", "a", "9", "010"], key=natural_key) == ["9", "10", "010", "a", "b"]
    assert sorted(["\u00b2", "10", "\u0663"], key=natural_key) == ["\u0663", "10", "\u00b2"]  # ² is no number; ٣ is 3
    from bts_lightning.data.splits import split_by_folds
    from bts_lightning.data.suffix_layout import id_key

    assert id_key("\u00b2") == ["\u00b2"] and split_by_folds(["1", "\u00b2", "2"], 1, None).val == [0]


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


def test_masks_named_after_their_images_with_a_suffix_are_told_to_be_renamed(make_dataset):
    root = make_dataset(["1", "2", "10"])
    for mask in list((root / "masks").iterdir()):
        mask.rename(mask.with_name(f"{mask.stem}_mask.png"))
    with pytest.raises(DataError, match=r"The masks are named after their images plus '_mask' \((\d+)_mask.png for "
                                        r"\1\): rename them without it"):
        find_pairs(root)


def test_hidden_files_are_not_slices(make_dataset):
    """macOS copies leave ``._1.png`` resource forks beside each file; they are no images (nor metadata rows)."""
    root = make_dataset(["1", "2"])
    for folder in ("images", "masks"):
        (root / folder / "._1.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    assert [pair.stem for pair in find_pairs(root)] == ["1", "2"]


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
        datamodule(root, split_by="slice").setup("fit")
    message = str(error.value)
    assert "3.png" in message and "5.png" in message and "unreadable" in message
    assert "images/6.png is 32x32 but its mask masks/6.png is 32x20" in message and "size mismatch" in message


def test_unreadable_files_are_named_with_the_reason(make_dataset):
    """A stack of pages is not "corrupt": the message says what it is and what to do."""
    root = make_dataset([str(i) for i in range(1, 5)])
    (root / "images" / "2.png").unlink()
    cv2.imwritemulti(str(root / "images" / "2.tif"), [np.zeros((32, 32), np.uint8)] * 2)
    (root / "images" / "3.png").write_text("notes")
    with pytest.raises(DataError) as error:
        datamodule(root, split_by="slice").setup("fit")
    assert re.search(r"1 unreadable file\(s\) \(.*images/2\.tif\): holds 2 pages \(a volume or a stack\), not one "
                     r"slice; save each slice as its own image file; 1 unreadable file\(s\) \(.*images/3\.png\): not a "
                     r"readable image \(corrupt or unsupported format\)", str(error.value))


def test_many_reasons_are_one_clause_with_an_example(make_dataset):
    root = make_dataset([str(i) for i in range(1, 6)])
    for stem, pages in zip("2345", (2, 3, 4, 5)):
        (root / "images" / f"{stem}.png").unlink()
        cv2.imwritemulti(str(root / "images" / f"{stem}.tif"), [np.zeros((32, 32), np.uint8)] * pages)
    with pytest.raises(DataError, match=r"4 unreadable file\(s\) \(.*2\.tif, .*5\.tif\), e\.g\. holds 2 pages"):
        datamodule(root, split_by="slice").setup("fit")


def test_a_float_image_with_a_nan_pixel_is_named_not_read_as_black(make_dataset):
    """Min-max scaling with a NaN makes every pixel 0: such a file is refused, in training and in predict's reader."""
    root = make_dataset([str(i) for i in range(1, 5)])
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    image[3, 4] = np.nan
    (root / "images" / "2.png").unlink()
    cv2.imwrite(str(root / "images" / "2.tif"), image)
    with pytest.raises(DataError, match=r"1 float file\(s\) with NaN or infinite pixel values, whose scaling to "
                                        r"0-255 cannot be told: .*images/2\.tif"):
        datamodule(root, split_by="slice").setup("fit")
    with pytest.raises(ValueError, match=r"2\.tif: holds NaN or infinite pixel values"):
        read_mask(root / "images" / "2.tif")
    image[3, 4] = 0.5
    cv2.imwrite(str(root / "images" / "2.tif"), image)
    assert read_mask(root / "images" / "2.tif").max() == 255  # finite floats are scaled as before


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


def test_reads_16bit_rgb_and_binarizes_by_the_dataset_rule(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.tif"), ramp)
    image = read_mask(tmp_path / "deep.tif")
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert image.ravel()[12] == 49  # 12000 / 63000 * 255 = 48.57: min-max scaled to the nearest level
    cv2.imwrite(str(tmp_path / "rgb.png"), np.full((4, 4, 3), 200, np.uint8))
    assert read_mask(tmp_path / "rgb.png").shape == (4, 4)
    for colour in range(3):  # a tumor drawn in blue, green or red (OpenCV's BGR), with an opaque alpha plane
        drawn = np.zeros((4, 4, 4), np.uint8)
        drawn[..., 3] = 255
        drawn[1:3, 1:3, colour] = 255
        cv2.imwrite(str(tmp_path / "colour.png"), drawn)
        assert read_mask(tmp_path / "colour.png").tolist() == (drawn[..., colour]).tolist()  # luma: 29, 150, 76
    drawn = np.full((4, 4, 4), 255, np.uint8)  # white, transparent outside the tumor
    drawn[..., 3] = 0
    drawn[1:3, 1:3, 3] = 255
    cv2.imwrite(str(tmp_path / "transparent.png"), drawn)
    assert read_mask(tmp_path / "transparent.png").tolist() == drawn[..., 3].tolist()
    drawn[..., :3] = 0  # the tumor in the alpha plane only
    cv2.imwrite(str(tmp_path / "alpha.png"), drawn)
    assert read_mask(tmp_path / "alpha.png").tolist() == drawn[..., 3].tolist()
    assert (mask_threshold(0), mask_threshold(1), mask_threshold(2), mask_threshold(255)) == (0, 0, 127, 127)
    mask = np.array([[0, 1], [3, 128]], np.uint8)
    assert binarize_mask(mask, 0).tolist() == [[0, 1], [1, 1]]
    assert binarize_mask(mask, 127).tolist() == [[0, 0], [0, 1]]  # a few faint noise pixels are not tumor


def test_datamodule_batches_resized_uint8_and_no_augmentation_on_validation(synthetic_root):
    import albumentations as A

    dm = datamodule(synthetic_root, image_size=48, val_fold=1, test_fold=2, augmentations=[A.VerticalFlip(p=1.0)])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 48, 48) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 48, 48) and set(batch["mask"].unique().tolist()) <= {0, 1}
    val = dm.datasets["val"]
    image, mask = val.load(0)
    assert image.shape == (1, 48, 48) and torch.equal(val[0]["image"], torch.from_numpy(image))
    train = dm.datasets["train"]
    image, mask = train.load(0)
    assert torch.equal(train[0]["image"], torch.from_numpy(image[:, ::-1].copy()))
    assert torch.equal(train[0]["mask"], torch.from_numpy(mask[::-1].copy()))
    assert dm.has_test and dm.label_of(dm.split.val[0]) in {"1", "2", "3"}


def test_distance_maps_are_those_of_the_augmented_masks(synthetic_root):
    import albumentations as A

    from bts_lightning.distance_maps import signed_distance_map

    augmentations = [A.HorizontalFlip(p=1.0), A.Affine(rotate=(20, 30), translate_percent=(0.1, 0.2), p=1.0)]
    dm = datamodule(synthetic_root, image_size=48, val_fold=1, test_fold=2, augmentations=augmentations, num_workers=1)
    dm.setup("fit")
    assert dm.distance_maps is None and "distance" not in dm.datasets["train"][0]  # off unless the train app sets it
    dm.distance_maps = True  # as the train app does for loss=dice_boundary, after setup
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        maps = torch.stack([torch.from_numpy(signed_distance_map(mask)) for mask in batch["mask"].numpy()])
        assert batch["distance"].dtype == torch.float32 and torch.equal(batch["distance"], maps[:, None])
        assert (batch["distance"] < 0).any() and (batch["distance"] > 0).any()
    train = dm.datasets["train"]
    sample, (_, unaugmented) = train[0], train.load(0)
    assert not np.array_equal(sample["mask"].numpy(), unaugmented)  # so the map follows the augmented mask
    with pytest.raises(ConfigError, match=r"data.distance_maps='auto' is invalid"):
        datamodule(synthetic_root, distance_maps="auto")


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

    cause = "no network: " + "retrying " * 40

    def offline(handle):
        raise ConnectionError(cause + "\nTraceback and more lines")

    fake.dataset_download = offline
    with pytest.raises(DataError, match="kagglehub download failed, ConnectionError: no network") as error:
        download.resolve_root(tmp_path / "missing", download=True)
    assert "data=synthetic" in str(error.value) and "\n" not in str(error.value)  # the cause's first line, cut short
    assert str(error.value).endswith(f"ConnectionError: {cause[:160]}...)")


# --- Split policy and split record --------------------------------------------------------------------------------


def test_folder_without_folds_or_patients_needs_split_by_slice(make_dataset):
    root = make_dataset([str(i) for i in range(1, 9)])
    with pytest.raises(DataError) as error:
        datamodule(root).setup("fit")
    assert str(root) in str(error.value) and "data.split_by=slice" in str(error.value)
    dm = datamodule(root, split_by="slice")
    dm.setup("fit")
    assert (dm.split.method, dm.split.leaky) == ("slices", True)
    assert dm.split_record()["leaky"] is True and dm.split_record()["method"] == "slices"


def test_the_data_line_names_the_settings_that_chose_the_split(make_dataset, synthetic_root, caplog):
    """A fold split names its folds; a fraction split its fractions and that data.val_fold is not used."""
    root = make_dataset([str(i) for i in range(1, 9)])
    with caplog.at_level(logging.INFO, logger="bts_lightning.data.datamodule"):
        datamodule(root, split_by="slice", val_fold=1, val_fraction=0.25).setup("fit")
        datamodule(synthetic_root, val_fold=1, test_fold=2).setup("fit")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data ")]
    assert "split by slices, data.val_fraction=0.25, data.test_fraction=0; data.val_fold=1 is not used (" in lines[0]
    assert "split by folds, val fold 1, test fold 2 (train " in lines[1]


def test_split_record_round_trips_through_state_dict(synthetic_root, caplog):
    dm = datamodule(synthetic_root, val_fold=1, test_fold=2)
    assert dm.state_dict() == {}
    dm.setup("fit")
    record = dm.split_record()
    assert json.loads(json.dumps(record)) == record  # plain JSON-able data
    assert (record["method"], record["leaky"]) == ("folds", False)
    assert record["settings"] == {"name": "data", "root": str(synthetic_root.resolve()), "layout": "kaggle",
                                  "channels": "gray", "neighbours": 0, "mask_suffix": "_mask", "patient_pattern": None,
                                  "split_by": "auto", "val_fold": 1, "test_fold": 2, "num_folds": None,
                                  "val_fraction": 0.2, "test_fraction": 0.0, "seed": 42}
    for name, dataset in dm.datasets.items():
        ids = [dataset.stem(i) for i in range(len(dataset))]
        assert record["subsets"][name] == {"n": len(ids), "sha256": slice_ids_digest(ids), "ids": ids}
    assert record["subsets"]["test"]["n"] == 8 and sum(s["n"] for s in record["subsets"].values()) == 40

    same = datamodule(synthetic_root, val_fold=1, test_fold=2)
    same.setup("fit")
    with caplog.at_level(logging.WARNING):
        same.load_state_dict(dm.state_dict())
    assert same.trained_split == record and same.split == dm.split and not caplog.records
    other = datamodule(synthetic_root, val_fold=3, test_fold=2)
    other.setup("fit")
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(dm.state_dict())
    assert other.trained_split == record and other.split_record()["subsets"]["val"] != record["subsets"]["val"]
    assert "different split" in caplog.text


class TinySegmenter(L.LightningModule):
    """One convolution: enough to run Lightning's fit loop and write a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def step(self, batch: dict) -> torch.Tensor:
        logits = self.conv(batch["image"].float() / 255)[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["mask"].float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.step(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_writes_the_split_record_into_the_checkpoint(synthetic_root, tmp_path):
    dm = datamodule(synthetic_root, val_fold=1, test_fold=2)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(TinySegmenter(), datamodule=dm)
    [path] = (tmp_path / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["BrainTumorDataModule"] == {"split": dm.split_record()}
    resumed = datamodule(synthetic_root, val_fold=1, test_fold=2)
    resumed.setup("fit")
    resumed.load_state_dict(checkpoint["BrainTumorDataModule"])
    assert resumed.trained_split == dm.split_record()


def test_distributed_evaluation_scores_every_slice_once(make_dataset):
    root = make_dataset([str(i) for i in range(1, 12)])
    write_metadata(root, [f"{i},1,{1 if i <= 5 else 2 if i <= 8 else 3}" for i in range(1, 12)])
    dm = datamodule(root, val_fold=1, test_fold=2, batch_size=2)
    dm.setup("fit")
    assert (len(dm.split.val), len(dm.split.test)) == (5, 3)  # odd sizes: a padded sampler would repeat slices
    seen: dict[str, list[int]] = {"val": [], "test": []}
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        train_sampler = dm.train_dataloader().sampler  # this rank's share of the epoch's shuffle, padded
        assert isinstance(train_sampler, RankShare) and isinstance(train_sampler.sampler, EpochShuffleSampler)
        for name, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
            assert isinstance(loader.sampler, DistributedSampler)  # so Lightning keeps it
            seen[name] += [index for batch in loader for index in batch["index"].tolist()]
    assert sorted(seen["val"]) == dm.split.val and sorted(seen["test"]) == dm.split.test
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert [i for batch in dm.val_dataloader() for i in batch["index"].tolist()] == dm.split.val


def test_each_rank_trains_its_share_when_it_is_no_full_batch(make_dataset):
    """12 training slices, batch 8: one process drops the short last batch (8 trained), but under 2 processes each
    rank's share of 6 is its only batch and is kept (a rank whose one batch were dropped would train nothing)."""
    root = make_dataset([str(i) for i in range(1, 15)])
    write_metadata(root, [f"{i},1,{1 if i <= 2 else 2}" for i in range(1, 15)])
    dm = datamodule(root, val_fold=1, batch_size=8)
    dm.setup("fit")
    assert len(dm.split.train) == 12
    assert [len(batch["index"]) for batch in dm.train_dataloader()] == [8]
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        assert [len(batch["index"]) for batch in dm.train_dataloader()] == [6]


# --- Masks ---------------------------------------------------------------------------------------------------------


def block(value: int, dtype: type = np.uint8, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype)
    mask[8:16, 8:16] = value
    return mask


def write_slices(root: Path, masks: dict[str, np.ndarray], val: tuple[str, ...] = ("1",)) -> Path:
    """Random 8-bit images, the given masks as PNG, and metadata: ``val`` stems in fold 1, the rest in fold 2."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, mask in masks.items():
        cv2.imwrite(str(root / "images" / f"{stem}.png"), rng.integers(0, 256, mask.shape, dtype=np.uint8))
        assert cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    write_metadata(root, [f"{stem},1,{1 if stem in val else 2}" for stem in masks])
    return root


def labels() -> np.ndarray:
    mask = block(1)
    mask[10:12, 10:12] = 2
    return mask


def masks_by_stem(dm: BrainTumorDataModule) -> dict[str, np.ndarray]:
    return {d.stem(i): d.load(i)[1] for d in dm.datasets.values() for i in range(len(d))}


@pytest.mark.parametrize("cache", [True, False])
def test_masks_are_binarized_by_one_rule_for_the_whole_dataset(tmp_path, cache, caplog):
    tumor = np.zeros((32, 32), np.uint8)
    tumor[4:8, 4:8] = 1  # the 8:16 block of the 64x64 masks at image_size 32 (nearest)
    binary = write_slices(tmp_path / "binary", {"1": block(1), "2": block(1), "3": block(0)})
    dm = datamodule(binary, cache=cache)
    dm.setup("fit")
    assert dm.mask_threshold == 0
    got = masks_by_stem(dm)
    assert [got[s].tolist() for s in "123"] == [tumor.tolist(), tumor.tolist(), np.zeros((32, 32)).tolist()]

    noise = np.zeros((64, 64), np.uint8)
    noise[20, 20:23] = 3  # a tumor-free mask with faint noise: not tumor
    masks = {"1": block(255), "2": noise, "3": block(65535, np.uint16), "4": block(1, np.uint16), "5": block(255)}
    eight_bit = write_slices(tmp_path / "eight_bit", masks)
    dm = datamodule(eight_bit, cache=cache)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.mask_threshold == 127
    got = masks_by_stem(dm)
    assert got["2"].sum() == 0
    # Said, in case it is a 0/1 mask among 0/255 ones (a tumor, silently lost otherwise):
    assert (f"1 mask(s) are read as empty though they hold values up to 3 ({eight_bit / 'masks' / '2.png'}): tumor is "
            "a value above 127") in caplog.text
    for stem in "1345":
        np.testing.assert_array_equal(got[stem], tumor, err_msg=stem)


@pytest.mark.parametrize("source, size", [(256, 128), (256, 64), (256, 32), (100, 256), (64, 256)])
def test_resized_masks_stay_on_their_resized_images(source, size):
    """A mask resized for training lies where its resized image shows the tumor (OpenCV's INTER_NEAREST put it
    0.375 px below and right at 64 px)."""
    rng = np.random.default_rng(0)
    rows, cols = np.indices((size, size))
    shifts = []  # (rows, columns) of the mask's centroid minus the image's, in pixels at `size`
    for _ in range(50):
        mask = np.zeros((source, source), np.uint8)
        top, left = rng.integers(0, source * 3 // 4, 2)
        mask[top:top + rng.integers(source // 28, source // 5), left:left + rng.integers(source // 28, source // 5)] = 255
        as_image = resize(mask, size, is_mask=False).astype(np.float64)
        as_mask = binarize_mask(resize(mask, size, is_mask=True), mask_threshold(255)).astype(np.float64)  # the loader's
        shifts.append([(grid * as_mask).sum() / as_mask.sum() - (grid * as_image).sum() / as_image.sum()
                       for grid in (rows, cols)])
    # each block's edges round by up to half a pixel either way; on average they must not lean one way
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.1, np.mean(shifts, axis=0)


def test_empty_slice_counts_are_those_of_the_masks_training_sees(tmp_path):
    """A tumor smaller than a pixel at ``image_size`` is gone from the resized mask, so the slice counts as empty."""
    masks = {"1": block(255), "2": block(255)}
    for stem, (row, col) in {"3": (8, 8), "4": (9, 9), "5": (8, 9), "6": (9, 8)}.items():  # one pixel each
        masks[stem] = np.zeros((64, 64), np.uint8)
        masks[stem][row, col] = 255
    dm = datamodule(write_slices(tmp_path / "data", masks, val=("1", "3", "4")), image_size=32)
    dm.setup("fit")
    for name in ("train", "val"):
        loaded = [dm.datasets[name].load(i)[1] for i in range(len(dm.datasets[name]))]
        assert dm.empty_slices(name) == sum(int(mask.sum() == 0) for mask in loaded), name
    assert dm.empty_slices("train") + dm.empty_slices("val") == 4  # each one-pixel tumor is a quarter of a pixel


@pytest.mark.parametrize(
    "masks, expected",
    [
        ({"1": block(1), "2": block(2), "3": labels()}, "largest mask value is 2"),
        ({"1": block(255), "2": block(0), "3": block(0)}, "2.png, 3.png"),  # only the validation mask has tumor
        ({"1": block(0), "2": block(0), "3": block(0)}, "largest mask value is 0"),
    ],
    ids=["labels-0-1-2", "train-empty", "all-empty"],
)
def test_empty_training_masks_are_an_error(tmp_path, masks, expected):
    root = write_slices(tmp_path / "data", masks)
    with pytest.raises(DataError) as error:
        datamodule(root).setup("fit")
    message = str(error.value)
    assert "All 2 training masks" in message and "empty" in message and expected in message
    assert "class labels" in message


def test_copied_or_grey_masks_are_named_and_jpeg_masks_accepted(synthetic_root, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in "12345":
        (root / "images" / f"{stem}.png").write_bytes((synthetic_root / "images" / f"{stem}.png").read_bytes())
        (root / "masks" / f"{stem}.png").write_bytes((synthetic_root / "masks" / f"{stem}.png").read_bytes())
    (root / "masks" / "1.png").write_bytes((root / "images" / "1.png").read_bytes())  # images copied into masks/
    (root / "masks" / "2.png").write_bytes((root / "images" / "3.png").read_bytes())  # an MRI slice, not a mask
    original = cv2.imread(str(root / "masks" / "4.png"), cv2.IMREAD_GRAYSCALE)
    (root / "masks" / "4.png").unlink()
    cv2.imwrite(str(root / "masks" / "4.jpg"), original, [cv2.IMWRITE_JPEG_QUALITY, 50])
    with pytest.raises(DataError) as error:
        datamodule(root, image_size=64, split_by="slice").setup("fit")
    message = str(error.value)
    assert "1 mask(s) identical to their image" in message and "masks/1.png" in message
    assert "1 mask(s) with many grey levels" in message and "masks/2.png" in message
    assert "4.jpg" not in message and "3.png" not in message

    for stem in "12":
        (root / "masks" / f"{stem}.png").write_bytes((synthetic_root / "masks" / f"{stem}.png").read_bytes())
    dm = datamodule(root, image_size=64, split_by="slice")
    dm.setup("fit")
    jpeg_mask = masks_by_stem(dm)["4"].astype(bool)
    true_mask = original > 127
    assert (jpeg_mask & true_mask).sum() / (jpeg_mask | true_mask).sum() > 0.9


# --- metadata.csv --------------------------------------------------------------------------------------------------


def test_duplicated_index_names_values_and_rows(make_dataset):
    root = make_dataset(["1", "2", "3"])
    write_metadata(root, ["1,1,1", "2,1,2", "3,1,2", "1,1,2", "2,1,1"])
    with pytest.raises(DataError, match=r"2 index value\(s\) on several rows: 1 \(rows 2, 5\), 2 \(rows 3, 6\)"):
        read_metadata(root, ["1", "2", "3"])


@pytest.mark.parametrize("column, rows, row_numbers", [
    ("fold", ["1,1,1,p1", "2,1,,p2", "3,1, ,p3"], "3, 4"),
    ("pid", ["1,1,1,p1", "2,1,2,p2", "3,1,2,"], "4"),
])
def test_blank_fold_or_pid_cells_are_named_by_row(make_dataset, column, rows, row_numbers):
    root = make_dataset(["1", "2", "3"])
    write_metadata(root, rows, header="index,label,fold,pid")
    with pytest.raises(DataError, match=rf"empty '{column}' cell\(s\) on row\(s\) {row_numbers}\. Fill them in"):
        read_metadata(root, ["1", "2", "3"])


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"index,label,fold\n1,1,\x00\x01\n"])
def test_binary_metadata_is_named(make_dataset, content):
    root = make_dataset(["1"])
    (root / "metadata.csv").write_bytes(content)
    with pytest.raises(DataError, match="metadata.csv") as error:
        read_metadata(root, ["1"])
    assert "UTF-8" in str(error.value)


def test_metadata_with_excel_bom_is_read(make_dataset):
    root = make_dataset(["1", "2"])
    (root / "metadata.csv").write_bytes("index,label,fold\r\n1,1,1\r\n2,3,2\r\n".encode("utf-8-sig"))
    assert read_metadata(root, ["1", "2"]) == {
        "1": {"index": "1", "label": "1", "fold": "1"},
        "2": {"index": "2", "label": "3", "fold": "2"},
    }


# --- Config values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"image_size": 0}, "data.image_size=0"),
        ({"image_size": 13}, "data.image_size=13"),
        ({"image_size": 64.0}, "data.image_size=64.0"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"num_workers": -1}, "data.num_workers=-1"),
        ({"num_workers": "2"}, "data.num_workers='2'"),
        ({"val_fraction": 1.5}, "data.val_fraction=1.5"),
        ({"test_fraction": -0.1}, "data.test_fraction=-0.1"),
        ({"val_fraction": "a lot"}, "data.val_fraction='a lot'"),
        ({"split_by": "patients"}, "data.split_by='patients'"),
        ({"num_folds": 1}, "data.num_folds=1"),
        ({"num_folds": "5"}, "data.num_folds='5'"),
        ({"layout": "lgg"}, "data.layout='lgg' is not one of auto, kaggle, suffix, figshare_mat"),
        ({"mask_suffix": ""}, "data.mask_suffix=''"),
        ({"patient_pattern": "(unclosed"}, "data.patient_pattern='(unclosed' is not a regular expression"),
        ({"channels": "rgb"}, "data.channels='rgb' is invalid"),
        ({"name": "my data/v2"}, "data.name='my data/v2' is invalid"),
    ],
)
def test_bad_data_config_values_are_named(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        datamodule(tmp_path, **kwargs)


def test_valid_edge_config_values_are_accepted(tmp_path):
    dm = BrainTumorDataModule(tmp_path, image_size=32, batch_size=1, num_workers=None, test_fraction=0.5,
                              val_fraction=0.4, split_by="patient")
    assert dm.num_workers >= 1 and dm.split_by == "patient"


def test_bad_or_mismatched_synthetic_arguments_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.synthetic: size must be >= 32"):
        datamodule(tmp_path / "ds", synthetic={"n": 4, "size": 8}).prepare_data()
    with pytest.raises(ConfigError, match="data.synthetic: n must be a whole number, got 'abc'"):
        datamodule(tmp_path / "ds", synthetic={"n": "abc"}).prepare_data()
    with pytest.raises(ConfigError, match="data.synthetic: .*'bogus'"):  # e.g. +data.synthetic.bogus=1
        datamodule(tmp_path / "ds", synthetic={"n": 4, "bogus": 1}).prepare_data()
    assert not (tmp_path / "ds").exists()
    datamodule(tmp_path / "ds", synthetic={"n": 4, "size": 32, "num_folds": 2}).prepare_data()
    with pytest.raises(DataError, match="not the requested n=4, size=32, seed=0, slices_per_patient=4, num_folds=3"):
        datamodule(tmp_path / "ds", synthetic={"n": 4, "size": 32, "num_folds": 3}).setup("fit")


def test_root_that_is_a_file_says_so(tmp_path):
    root = tmp_path / "data.zip"
    root.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file, not a folder holding images/ and masks/"):
        datamodule(root).setup("fit")
    mat = tmp_path / "1.mat"  # one slice file of the Figshare release given as its root
    mat.write_bytes(b"MATLAB")
    with pytest.raises(DataError, match=r"is a file, not a folder holding the Figshare release's 1\.mat .*"
                                        r"\(or BTS_FIGSHARE_ROOT\)"):
        datamodule(mat, layout="figshare_mat").setup("fit")


def test_a_multi_page_tiff_is_refused_not_read_as_its_first_page(tmp_path):
    from bts_lightning.data.io import UnreadableImageError, decode

    assert cv2.imwritemulti(str(tmp_path / "volume.tif"), [np.zeros((8, 8), np.uint8), np.full((8, 8), 9, np.uint8)])
    with pytest.raises(UnreadableImageError, match=r"volume.tif: holds 2 pages \(a volume or a stack\), not one slice"):
        decode(tmp_path / "volume.tif")
    assert cv2.imwrite(str(tmp_path / "slice.tif"), np.full((8, 8), 9, np.uint8))
    assert decode(tmp_path / "slice.tif").shape == (8, 8)
