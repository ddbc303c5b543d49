"""Tumor-free training input: TumorFreeCrop, synthetic empty slices, data.negatives and data.empty_fraction."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from bts_lightning.data.augment import TumorFreeCrop
from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.sampling import EmptyFractionSampler, EpochShuffleSampler, RankShare
from bts_lightning.data.synthetic import ensure_dataset, generate_dataset, synthetic_app
from bts_lightning.distance_maps import signed_distance_map
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.train import train
from tests.conftest import compose_app, compose_train

SIZE = 32


@pytest.fixture(scope="module")
def tumor_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic slices, every one with a tumor (5 patients, 5 folds)."""
    return generate_dataset(tmp_path_factory.mktemp("tumor") / "ds", n=20, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def empty_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic slices (3 patients of 4), half of each patient's without tumor: 6 empty masks."""
    return generate_dataset(tmp_path_factory.mktemp("empty") / "ds", n=12, size=SIZE, seed=5, num_folds=2,
                            empty_fraction=0.5)


def datamodule(root: Path, **kwargs) -> BrainTumorDataModule:
    defaults = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, "download": False, "test_fold": None}
    return BrainTumorDataModule(root, **{**defaults, **kwargs})


def mask_maxima(root: Path) -> dict[str, int]:
    return {path.stem: int(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).max()) for path in (root / "masks").iterdir()}


# --- TumorFreeCrop ----------------------------------------------------------------------------------------------------


def painted_slice(rng: np.random.Generator, margin: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Background 0..200, a random box tumor painted 255 and its ``margin`` ring painted 250; its 0/1 mask."""
    image = rng.integers(0, 201, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    top, left = rng.integers(0, size - 12, 2)
    height, width = rng.integers(4, 12, 2)
    mask[top : top + height, left : left + width] = 1
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2)
    image[cv2.dilate(mask, disk) > 0] = 250
    image[mask > 0] = 255
    return image, mask


def test_tumor_free_crop_never_shows_the_tumor_or_its_margin():
    rng = np.random.default_rng(0)
    crop = A.Compose([TumorFreeCrop(min_scale=0.2, max_scale=0.4, margin=3, p=1.0)], seed=0)
    cropped = 0
    for _ in range(60):
        image, mask = painted_slice(rng, margin=3)
        out = crop(image=image, mask=mask)
        assert out["image"].shape == image.shape and out["image"].dtype == np.uint8
        if not np.array_equal(out["image"], image):
            cropped += 1
            assert not out["mask"].any()
            assert out["image"].max() < 250  # linear resizing mixes only pixels of the crop
    assert cropped >= 50


def test_tumor_free_crop_p0_is_identity_and_a_full_tumor_is_left_alone():
    rng = np.random.default_rng(1)
    image, mask = painted_slice(rng, margin=2)
    out = A.Compose([TumorFreeCrop(p=0.0)], seed=0)(image=image, mask=mask)
    assert np.array_equal(out["image"], image) and np.array_equal(out["mask"], mask)
    full = np.ones_like(mask)
    out = A.Compose([TumorFreeCrop(p=1.0)], seed=0)(image=image, mask=full)
    assert np.array_equal(out["image"], image) and np.array_equal(out["mask"], full)


@pytest.mark.parametrize("channels", [1, 3])
def test_tumor_free_crop_keeps_channel_axes_and_crops_empty_masks_anywhere(channels):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (48, 48, channels), dtype=np.uint8)
    empty = np.zeros((48, 48), np.uint8)
    out = A.Compose([TumorFreeCrop(p=1.0)], seed=0)(image=image, mask=empty)
    assert out["image"].shape == (48, 48, channels) and not out["mask"].any()
    assert not np.array_equal(out["image"], image)


def test_tumor_free_crop_is_reproducible_under_the_compose_seed():
    rng = np.random.default_rng(3)
    image, mask = painted_slice(rng, margin=2)

    def run(seed: int) -> list[np.ndarray]:
        pipeline = A.Compose([TumorFreeCrop(p=0.7)], seed=seed)
        return [pipeline(image=image, mask=mask)["image"] for _ in range(8)]

    first, again, other = run(4), run(4), run(5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("kwargs", [{"min_scale": 0.0}, {"min_scale": 0.6, "max_scale": 0.5}, {"max_scale": 1.0},
                                    {"margin": -1}, {"attempts": 0}])
def test_tumor_free_crop_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="TumorFreeCrop"):
        TumorFreeCrop(**kwargs)


def test_distance_maps_follow_the_cropped_mask(tumor_root):
    dm = datamodule(tumor_root, augmentations=[TumorFreeCrop(min_scale=0.2, max_scale=0.3, margin=1, p=1.0)],
                    distance_maps=True)
    dm.setup("fit")
    train = dm.datasets["train"]
    emptied = 0
    for position in range(len(train)):
        sample = train[position]
        assert np.array_equal(sample["distance"][0].numpy(), signed_distance_map(sample["mask"].numpy()))
        emptied += bool(train.load(position)[1].any() and not sample["mask"].any())
    assert emptied >= len(train) // 2


# --- synthetic slices without tumor -----------------------------------------------------------------------------------


def test_empty_fraction_empties_that_share_of_each_patients_slices(tmp_path, empty_root):
    def empties_per_patient(root: Path) -> dict[str, int]:
        maxima = mask_maxima(root)
        with open(root / "metadata.csv", newline="") as handle:
            return dict(Counter(row["pid"] for row in csv.DictReader(handle) if maxima[row["index"]] == 0))

    assert empties_per_patient(empty_root) == {"1": 2, "2": 2, "3": 2}
    quarter = generate_dataset(tmp_path / "q", n=10, size=SIZE, seed=5, num_folds=2, empty_fraction=0.25)
    assert empties_per_patient(quarter) == {"1": 1, "2": 1, "3": 1}  # 4, 4 and 2 slices: 1, 1, round(0.5) = 1


def test_default_is_byte_identical_and_tumor_slices_match_the_empty_variant(tmp_path, empty_root):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    plain = files(generate_dataset(tmp_path / "plain", n=12, size=SIZE, seed=5, num_folds=2))
    assert files(generate_dataset(tmp_path / "zero", n=12, size=SIZE, seed=5, num_folds=2, empty_fraction=0.0)) == plain
    assert "empty_fraction" not in plain["synthetic.json"].decode()
    emptied = files(empty_root)
    maxima = mask_maxima(empty_root)
    for stem, largest in maxima.items():
        same = emptied[f"images/{stem}.png"] == plain[f"images/{stem}.png"]
        assert same == (largest > 0), stem  # tumor slices unchanged; empty ones lost their lesion
    assert '"empty_fraction": 0.5' in emptied["synthetic.json"].decode()
    ensure_dataset(empty_root, n=12, size=SIZE, seed=5, num_folds=2, empty_fraction=0.5)  # its manifest matches
    ensure_dataset(tmp_path / "plain", n=12, size=SIZE, seed=5, num_folds=2, empty_fraction=0)  # no key = 0
    with pytest.raises(DataError, match="empty_fraction=0.5"):
        ensure_dataset(empty_root, n=12, size=SIZE, seed=5, num_folds=2)


@pytest.mark.parametrize(("value", "error"), [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError),
                                              (True, TypeError)])
def test_bad_empty_fraction_names_the_argument(tmp_path, value, error):
    with pytest.raises(error, match="empty_fraction"):
        generate_dataset(tmp_path / "ds", n=4, size=SIZE, num_folds=2, empty_fraction=value)
    assert not (tmp_path / "ds").exists()
    dm = datamodule(tmp_path / "cfg", synthetic={"n": 4, "size": SIZE, "num_folds": 2, "empty_fraction": value})
    with pytest.raises(ConfigError, match="data.synthetic: .*empty_fraction"):
        dm.prepare_data()


def test_synthetic_app_takes_empty_fraction(tmp_path, capsys):
    out = tmp_path / "cli"
    cfg = compose_app("synthetic", [f"out={out}", "n=8", "size=32", "num_folds=2", "empty_fraction=0.25"],
                      tmp_path / "run")
    assert synthetic_app(cfg) == out and capsys.readouterr().out.strip() == str(out)
    assert sorted(mask_maxima(out).values()).count(0) == 2
    bad = compose_app("synthetic", [f"out={tmp_path / 'bad'}", "n=8", "size=32", "empty_fraction=1.5"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"empty_fraction must be in \[0, 1\).*got 1.5.*Usage"):
        synthetic_app(bad)


# --- data.negatives ---------------------------------------------------------------------------------------------------


def test_negatives_add_only_the_empty_slices_of_the_other_root(tumor_root, empty_root, caplog):
    dm = datamodule(tumor_root, negatives={"root": str(empty_root)}, batch_size=64)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "Added 6 tumor-free slices" in caplog.text
    maxima = mask_maxima(empty_root)
    negatives = dm.negatives_dataset
    assert sorted(negatives.stem(i) for i in range(len(negatives))) == sorted(s for s, m in maxima.items() if m == 0)
    record = dm.split_record()
    n_train = len(dm.split.train)
    assert record["settings"]["negatives"] == {"root": str(empty_root.resolve()), "n": 6}
    assert record["subsets"]["train"]["n"] == len(dm.datasets["train"]) == n_train
    (batch,) = list(dm.train_dataloader())  # one batch of everything: len <= batch_size keeps the last
    assert len(batch["mask"]) == n_train + 6
    empty = batch["mask"].flatten(1).amax(1) == 0
    assert int(empty.sum()) == 6  # the in-domain slices all have a tumor
    negative_images = {negatives[i]["image"].numpy().tobytes() for i in range(len(negatives))}
    assert {image.numpy().tobytes() for image in batch["image"][empty]} == negative_images


def test_negatives_max_slices_is_a_seeded_choice_and_distance_maps_reach_them(tumor_root, empty_root):
    def chosen(seed: int) -> list[str]:
        dm = datamodule(tumor_root, seed=seed, negatives={"root": str(empty_root), "max_slices": 4}, cache=False)
        dm.setup("fit")
        dm.distance_maps = True
        assert "distance" in dm.negatives_dataset[0] and dm.n_negatives == 4
        return [dm.negatives_dataset.stem(i) for i in range(4)]

    assert chosen(0) == chosen(0)
    assert len({tuple(chosen(seed)) for seed in range(4)}) > 1


def test_negatives_errors_name_the_setting(tumor_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.negatives.channels=\[0, 1\] gives 2 .* data.channels=gray gives 1"):
        datamodule(tumor_root, negatives={"root": str(tumor_root), "channels": [0, 1]})
    with pytest.raises(ConfigError, match="unknown key.*folder"):
        datamodule(tumor_root, negatives={"folder": str(tumor_root)})
    with pytest.raises(ConfigError, match="data.negatives.root=None"):
        datamodule(tumor_root, negatives={"layout": "kaggle"})
    with pytest.raises(ConfigError, match="data.max_slices|data.negatives.max_slices=0"):
        datamodule(tumor_root, negatives={"root": str(tumor_root), "max_slices": 0})
    with pytest.raises(DataError, match=f"data.negatives.root={tumor_root} has no tumor-free slice"):
        datamodule(tumor_root, negatives={"root": str(tumor_root)}).setup("fit")
    with pytest.raises(DataError, match="does not exist"):
        datamodule(tumor_root, negatives={"root": str(tmp_path / "missing")}).setup("fit")
    # Negatives whose files lack a channel the negatives' own setting asks for: named by that setting and root.
    with pytest.raises(ConfigError, match=rf"^data.negatives.root={tumor_root}: data.negatives.channels=\[1\]: "
                                          r"every image \(\d+\) has 1 channel\(s\); choose indices below 1, or gray"):
        datamodule(tumor_root, channels=[0], negatives={"root": str(tumor_root), "channels": [1]}).setup("fit")
    evaluation = datamodule(tumor_root, negatives={"root": str(tmp_path / "missing")})
    evaluation.setup("test")  # negatives are training input only
    assert evaluation.n_negatives == 0 and "negatives" not in evaluation.split_record()["settings"]


# --- data.empty_fraction ----------------------------------------------------------------------------------------------


def test_empty_fraction_sampler_hits_the_target_share_deterministically():
    empty = [i % 10 == 0 for i in range(400)]  # 40 empty samples
    sampler = EmptyFractionSampler(empty, 0.5, seed=1)
    draws = list(sampler)
    assert len(draws) == 400 and abs(sum(empty[i] for i in draws) / 400 - 0.5) <= 0.1
    assert Counter(i for i in draws if empty[i]).most_common(1)[0][1] <= 5  # whole permutations: 200 / 40 each
    assert draws == list(EmptyFractionSampler(empty, 0.5, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != draws
    assert list(sampler) == list(sampler)
    assert not any(empty[i] for i in EmptyFractionSampler(empty, 0.0, seed=1))


def test_under_ddp_each_rank_gets_its_share_of_a_fresh_draw_every_epoch():
    """RankShare: the ranks' shares of an epoch are that epoch's single-process draw, and the next epoch draws
    again (Lightning's own wrapper would split the first epoch's draw every epoch)."""
    empty = [i % 10 == 0 for i in range(400)]
    single = EmptyFractionSampler(empty, 0.5, seed=1)
    shares = [RankShare(EmptyFractionSampler(empty, 0.5, seed=1), num_replicas=2, rank=rank) for rank in (0, 1)]
    assert all(isinstance(share, DistributedSampler) for share in shares)  # Lightning keeps it as it is
    epochs = []
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for share in shares:
            share.set_epoch(epoch)
        first, second = list(shares[0]), list(shares[1])
        assert len(first) == len(second) == len(shares[0]) == 200
        assert first + second != list(single) and Counter(first + second) == Counter(single)
        epochs.append(Counter(first + second))
    assert epochs[0] != epochs[1]  # 200 of the 360 tumor slices, another 200 each epoch
    odd = [RankShare(EmptyFractionSampler(empty[:41], 0.5, seed=1), num_replicas=2, rank=rank) for rank in (0, 1)]
    drawn = list(EmptyFractionSampler(empty[:41], 0.5, seed=1))
    assert list(odd[0]) + list(odd[1]) == drawn[0::2] + drawn[1::2] + drawn[:1]  # padded with the draw's start


def _batch_counts(draws: list[int], empty: list[bool], batch_size: int) -> list[tuple[int, int]]:
    """(size, empty count) of each batch of ``draws``."""
    batches = [draws[start : start + batch_size] for start in range(0, len(draws), batch_size)]
    return [(len(batch), sum(empty[i] for i in batch)) for batch in batches]


def test_per_batch_every_batch_holds_the_share_and_the_epoch_draws_the_same_slices():
    empty = [i % 10 == 0 for i in range(400)]
    per_batch = list(EmptyFractionSampler(empty, 0.5, seed=1, batch_size=16))
    assert Counter(per_batch) == Counter(EmptyFractionSampler(empty, 0.5, seed=1))  # the same draw, reordered
    assert {count for _, count in _batch_counts(per_batch, empty, 16)} == {8}
    assert per_batch != sorted(per_batch, key=lambda i: not empty[i])  # shuffled within each batch
    uneven = list(EmptyFractionSampler(empty[:95], 0.3, seed=2, batch_size=10))  # 28 of 95: 2.95 per batch of 10
    counts = _batch_counts(uneven, empty[:95], 10)
    assert sum(count for _, count in counts) == round(0.3 * 95)
    assert all(abs(count - size * 28 / 95) < 1 for size, count in counts)


def test_per_batch_under_ddp_every_rank_batch_holds_the_share():
    empty = [i % 4 == 0 for i in range(101)]
    shares = [list(RankShare(EmptyFractionSampler(empty, 0.25, seed=3, batch_size=8, num_replicas=2),
                             num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert Counter(shares[0][:50] + shares[1][:50] + shares[0][50:]) == Counter(
        EmptyFractionSampler(empty, 0.25, seed=3))  # rank 1 is padded with the draw's start
    for share in shares:  # 25 empty of 101: 12 and 13 per rank of 51 and 50, so 1.9 or 2.1 per batch of 8
        assert all(abs(count - size * 25 / 101) < 1 for size, count in _batch_counts(share, empty, 8))
    exact = [list(RankShare(EmptyFractionSampler(empty[:96], 0.25, seed=3, batch_size=8, num_replicas=2),
                            num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert {count for share in exact for _, count in _batch_counts(share, empty, 8)} == {2}


def test_the_training_sampler_is_sharded_under_ddp(empty_root):
    dm = datamodule(empty_root, empty_fraction=0.5)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, EmptyFractionSampler)  # one process
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, RankShare) and sampler.rank == 1 and isinstance(sampler.sampler, EmptyFractionSampler)
    plain = datamodule(empty_root)
    plain.setup("fit")
    plain.trainer = SimpleNamespace(world_size=2, global_rank=0)
    assert isinstance(plain.train_dataloader().sampler.sampler, EpochShuffleSampler)


def test_empty_fraction_draws_from_training_slices_and_negatives(tumor_root, empty_root, caplog):
    dm = datamodule(empty_root, empty_fraction=0.5, batch_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "drawn to 50% per epoch" in caplog.text
    masks = torch.cat([batch["mask"] for batch in dm.train_dataloader()])
    share = float((masks.flatten(1).amax(1) == 0).float().mean())
    assert abs(share - 0.5) <= 0.1
    baseline = datamodule(empty_root, empty_fraction=0.0, batch_size=2)
    baseline.setup("fit")
    assert all(batch["mask"].flatten(1).amax(1).min() > 0 for batch in baseline.train_dataloader())
    even = datamodule(empty_root, empty_fraction=0.5, empty_fraction_per_batch=True, batch_size=2)
    even.setup("fit")
    assert all(int((batch["mask"].flatten(1).amax(1) == 0).sum()) == 1 for batch in even.train_dataloader())
    with pytest.raises(ConfigError, match="empty_fraction_per_batch=true needs data.empty_fraction"):
        datamodule(empty_root, empty_fraction_per_batch=True)
    mixed = datamodule(tumor_root, empty_fraction=0.3, negatives={"root": str(empty_root)})
    mixed.setup("fit")
    assert mixed.train_empty.sum() == 6 and len(mixed.train_empty) == len(mixed.training_set)


@pytest.mark.parametrize("value", [1.0, -0.2, "0.3", True])
def test_bad_empty_fraction_is_a_config_error(tumor_root, value):
    with pytest.raises(ConfigError, match=r"data.empty_fraction=.* must be null .* \[0, 1\)"):
        datamodule(tumor_root, empty_fraction=value)


def test_empty_fraction_without_empty_slices_says_what_to_add(tumor_root):
    with pytest.raises(ConfigError, match="data.empty_fraction=0.3 .*data.negatives.*data=synthetic_empty"):
        datamodule(tumor_root, empty_fraction=0.3).setup("fit")
    datamodule(tumor_root, empty_fraction=0.0).setup("fit")  # tumor slices only: nothing missing


# --- training run -----------------------------------------------------------------------------------------------------


def test_fast_dev_run_with_empty_synthetic_slices_and_tumor_free_crops(tmp_path, caplog):
    crop = "[{_target_: bts_lightning.data.augment.TumorFreeCrop, p: 0.5}]"
    overrides = ["data=synthetic_empty", "data.synthetic.n=20", "data.synthetic.size=32", "data.batch_size=4",
                 "data.num_workers=0", "data.empty_fraction=0.3", f"data.extra_augmentations={crop}",
                 f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=fast_dev_run", "logger=csv",
                 "test=false", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]",
                 "model.net.num_res_units=1"]
    cfg = compose_train(overrides, tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert (tmp_path / "data" / "synthetic" / "n20-size32-seed0-empty0.5" / "metadata.csv").is_file()
    assert "tumor-free" in caplog.text and "drawn to 30% per epoch" in caplog.text


def test_negatives_that_are_held_out_slices_of_the_dataset_itself_are_refused(empty_root):
    """The training set's own root as negatives would add its val and test empty slices to training."""
    with pytest.raises(ConfigError, match=rf"data.negatives.root={empty_root} holds \d+ empty slice\(s\) of this "
                                          r"dataset's val or test split \(images/"):
        datamodule(empty_root, val_fold=1, negatives={"root": str(empty_root)}).setup("fit")
