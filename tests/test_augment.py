"""Augmentations: what survives per-image standardization, geometry keeps masks aligned, RandomBiasField."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bts_lightning.data.augment import RandomBiasField, bias_field
from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.preprocessing import standardize
from bts_lightning.runtime import CONFIG_DIR
from tests.conftest import compose_train

DRAWS = 32  # random draws per transform: slices cycle, parameters differ every draw
# The transform this module replaces in the defaults, as it was configured there.
BRIGHTNESS_CONTRAST = A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=1.0)


def default_entries() -> dict[str, DictConfig]:
    """The default augmentation configs of conf/data/brain_tumor.yaml by class name (OneOf: its members too)."""
    entries = {}
    for entry in OmegaConf.load(Path(CONFIG_DIR) / "data" / "brain_tumor.yaml").augmentations:
        for config in [entry, *entry.get("transforms", [])]:
            entries[config._target_.rsplit(".", 1)[1]] = config
    return entries


def forced(name: str) -> A.BasicTransform:
    """The default ``name`` transform, applied on every call."""
    return instantiate(default_entries()[name], p=1.0)


def z_shift(transform: A.BasicTransform, slices: list[np.ndarray]) -> float:
    """Median over draws of the mean |change| of the standardized slice over the pixels the transform changed.

    Over changed pixels, so a local transform (cut-out) and a global one are measured alike.
    """
    pipeline = A.Compose([transform], seed=0)
    shifts = []
    for draw in range(DRAWS):
        image = slices[draw % len(slices)]
        out = pipeline(image=image)["image"]
        assert out.shape == image.shape and out.dtype == image.dtype
        before, after = (standardize(torch.from_numpy(x)[None, None])[0, 0].numpy() for x in (image, out))
        changed = out != image
        shifts.append(float(np.abs(after - before)[changed].mean()) if changed.any() else 0.0)
    return float(np.median(shifts))


@pytest.fixture(scope="module")
def slices(synthetic_root: Path) -> list[np.ndarray]:
    """Eight 64x64 synthetic MRI-like slices (uint8)."""
    paths = sorted((synthetic_root / "images").glob("*.png"))[:8]
    return [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]


def test_brightness_contrast_is_near_no_op_after_standardization_and_new_transforms_are_not(slices):
    baseline = z_shift(BRIGHTNESS_CONTRAST, slices)
    assert baseline < 0.02
    for name in ("RandomBiasField", "RandomGamma", "GaussianBlur", "Sharpen", "GaussNoise", "CoarseDropout"):
        shift = z_shift(forced(name), slices)
        assert shift > max(0.04, 3 * baseline), (name, shift, baseline)


def test_cut_out_leaves_the_mask_as_it_is(slices):
    mask = np.ones_like(slices[0])  # tumor everywhere: any hole punched into the mask would show
    pipeline = A.Compose([forced("CoarseDropout")], seed=0)
    out = pipeline(image=slices[0], mask=mask)
    assert not np.array_equal(out["image"], slices[0])
    np.testing.assert_array_equal(out["mask"], mask)


@pytest.mark.parametrize("kind", ["grid", "elastic"])
def test_geometric_transforms_move_image_and_mask_together(kind):
    transform = forced("GridDistortion") if kind == "grid" else A.ElasticTransform(alpha=60, sigma=6, p=1.0)
    image = np.full((64, 64), 30, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[20:44, 14:38], mask[20:44, 14:38] = 220, 1
    pipeline = A.Compose([transform], seed=0)
    for _ in range(4):
        out = pipeline(image=image, mask=mask)
        moved_mask, bright = out["mask"], out["image"] > 125
        assert moved_mask.dtype == np.uint8 and set(np.unique(moved_mask)) <= {0, 1}
        assert not np.array_equal(moved_mask, mask)  # the square did move
        overlap = np.count_nonzero(bright & (moved_mask == 1)) / np.count_nonzero(bright | (moved_mask == 1))
        assert overlap > 0.98  # the unmoved mask: 0.75-0.95


def test_bias_field_polynomial_and_bounds():
    gain = bias_field((4, 6), degree=1, coefficients=np.array([0.0, 2.0]), peak=0.5)  # order: y, x
    log_gain = np.log(gain)
    np.testing.assert_allclose(log_gain, np.broadcast_to(log_gain[0], (4, 6)), atol=1e-6)  # varies along x only
    assert np.all(np.diff(log_gain[0]) > 0)
    assert np.abs(log_gain).max() == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_array_equal(bias_field((3, 3), 2, np.zeros(5), 0.4), np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="takes 9 coefficients"):
        bias_field((3, 3), 3, np.zeros(5), 0.4)
    for kwargs in ({"degree": 0}, {"strength": (0.5, 0.2)}, {"strength": (-0.1, 0.2)}):
        with pytest.raises(ValueError):
            RandomBiasField(**kwargs)


@pytest.mark.parametrize(("dtype", "level"), [(np.uint8, 120), (np.uint16, 20000), (np.float32, 0.4)])
def test_random_bias_field_is_a_smooth_positive_bounded_gain(dtype, level):
    image = np.full((64, 64), level, dtype)
    out = A.Compose([RandomBiasField(strength=(0.3, 0.6), p=1.0)], seed=3)(image=image)["image"]
    assert out.dtype == dtype and out.shape == image.shape
    gain = out.astype(np.float64) / level
    assert gain.min() > 0
    peak = np.abs(np.log(gain)).max()
    assert 0.3 - 0.02 < peak < 0.6 + 0.02
    window = np.outer(np.hanning(64), np.hanning(64))  # no wrap-around edge in the spectrum
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((gain - gain.mean()) * window))) ** 2
    frequency = np.hypot(*np.meshgrid(np.arange(-32, 32), np.arange(-32, 32)))
    # Over 99 % of the variation within 4 cycles per slice (an upsampled 8x8 random grid: 85 %; noise: 2 %).
    assert spectrum[frequency > 4].sum() < 0.01 * spectrum.sum()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_random_bias_field_clips_to_the_dtype_range_and_leaves_the_mask(dtype):
    top = np.iinfo(dtype).max
    image = np.linspace(0, top, 64 * 64).reshape(64, 64).astype(dtype)
    mask = (image > top // 2).astype(np.uint8)
    out = A.Compose([RandomBiasField(strength=(0.6, 0.6), p=1.0)], seed=0)(image=image, mask=mask)
    assert out["image"].dtype == dtype and out["image"].max() == top  # bright pixels saturate, not wrap around
    assert np.count_nonzero(out["image"] < image) > 0
    np.testing.assert_array_equal(out["mask"], mask)


def test_random_bias_field_is_reproducible_by_compose_seed(slices):
    def run(seed: int) -> list[np.ndarray]:
        pipeline = A.Compose([RandomBiasField(p=1.0)], seed=seed)
        return [pipeline(image=slices[0])["image"] for _ in range(3)]

    first, again, other = run(7), run(7), run(8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    assert not np.array_equal(first[0], first[1])  # a new field every call


def test_default_augmentations_instantiate_and_feed_the_datamodule(synthetic_root, tmp_path):
    config = compose_train(["data=brain_tumor"], tmp_path).data.augmentations
    transforms = instantiate(config)
    names = [type(t).__name__ for t in transforms]
    assert names[:2] == ["HorizontalFlip", "Affine"] and "RandomBiasField" in names
    assert "RandomBrightnessContrast" not in names
    synthetic = instantiate(compose_train(["data=synthetic"], tmp_path).data.augmentations)
    assert [type(t).__name__ for t in synthetic] == ["HorizontalFlip", "Affine"]

    dm = BrainTumorDataModule(synthetic_root, image_size=48, batch_size=4, num_workers=0, download=False,
                              val_fold=1, test_fold=2, augmentations=transforms)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 48, 48) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (4, 48, 48) and batch["mask"].dtype == torch.uint8
    assert set(batch["mask"].unique().tolist()) <= {0, 1}
    train = dm.datasets["train"]
    altered = [not np.array_equal(train[i]["image"][0].numpy(), train.load(i)[0]) for i in range(8)]
    assert sum(altered) >= 4
