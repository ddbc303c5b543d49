"""LightningDataModule over a dataset folder in any layout of :mod:`bts_lightning.data.layouts`."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from bts_lightning.callbacks.reproducibility import seed_worker_transform
from bts_lightning.data.channels import Channels, channel_count, channels_setting, parse_channels
from bts_lightning.data.dataset import CombinedSlices, Scan, SliceDataset, scan_pairs
from bts_lightning.data.discovery import SlicePair
from bts_lightning.data.download import resolve_root
from bts_lightning.data.io import BYTE_THRESHOLD, MIN_IMAGE_SIZE, binarize_mask, mask_threshold
from bts_lightning.data.layouts import CONTENTS, LAYOUTS, ORIGINS, find_slices, slice_metadata
from bts_lightning.data.neighbours import SCAN_LAYOUTS, check_neighbours, neighbour_windows, slice_position
from bts_lightning.data.sampling import EmptyFractionSampler, EpochShuffleSampler, RankShare
from bts_lightning.data.splits import SPLIT_BY, Split, check_fractions, make_split, slice_ids_digest
from bts_lightning.data.suffix_layout import MASK_SUFFIX
from bts_lightning.data.synthetic import ensure_dataset
from bts_lightning.errors import ConfigError, DataError, format_names

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_num_workers() -> int:
    """One loader worker per spare core (at most 12): the main process drives the accelerator."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores - 1, 12))


def _check_int(key: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``data.<key>`` unless ``value`` is an int >= ``minimum`` (or None)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"null or an integer >= {minimum}" if optional else f"an integer >= {minimum}"
        raise ConfigError(f"data.{key}={value!r} is invalid: it must be {allowed}.")


def _check_name(name: Any) -> None:
    """Raise :class:`ConfigError` unless ``name`` (``data.name``) is null or a short name usable as a folder name."""
    if name is None:
        return
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"data.name={name!r} is invalid: it must be a name of letters, digits, '_', '-' or '.', "
                          "such as lgg (it names output folders).")


def _check_pattern(pattern: Any, key: str = "data.patient_pattern") -> None:
    """Raise :class:`ConfigError` unless ``pattern`` (setting ``key``) is null or a valid regular expression."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ConfigError(f"{key}={pattern!r} is not a regular expression ({error}).") from None


def _check_empty_fraction(value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` (``data.empty_fraction``) is null or a number in [0, 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"data.empty_fraction={value!r} is invalid: it must be null (sample as the data comes) "
                          "or a number in [0, 1), the share of tumor-free slices drawn for training.")


@dataclass(frozen=True)
class Negatives:
    """``data.negatives``: a second dataset whose tumor-free slices join the training set."""

    root: Path
    layout: str
    channels: Channels
    mask_suffix: str
    patient_pattern: str | None
    max_slices: int | None


NEGATIVES_KEYS = ("root", "layout", "channels", "mask_suffix", "patient_pattern", "max_slices")


def parse_negatives(value: Mapping[str, Any] | None, channels: Channels) -> Negatives | None:
    """The checked ``data.negatives`` mapping (None: off); ``channels`` (``data.channels``) is its default.

    Raises :class:`ConfigError` for unknown keys, a missing root, bad values, or channels whose count
    differs from ``data.channels``' (the network takes one channel count).
    """
    if value is None:
        return None
    usage = "set data.negatives={root: DIR} (optional: layout, channels, mask_suffix, patient_pattern, max_slices)"
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.negatives={value!r} is invalid: {usage}, or null.")
    unknown = sorted(set(value) - set(NEGATIVES_KEYS))
    if unknown:
        raise ConfigError(f"data.negatives has unknown key(s) {', '.join(unknown)}: {usage}.")
    root = value.get("root")
    if not isinstance(root, (str, Path)) or not str(root):
        raise ConfigError(f"data.negatives.root={root!r} is invalid: {usage}.")
    layout = value.get("layout", "auto")
    if layout not in LAYOUTS:
        raise ConfigError(f"data.negatives.layout={layout!r} is not one of {', '.join(LAYOUTS)}.")
    mask_suffix = value.get("mask_suffix", MASK_SUFFIX)
    if not isinstance(mask_suffix, str) or not mask_suffix:
        raise ConfigError(f"data.negatives.mask_suffix={mask_suffix!r} must be a non-empty string such as _mask.")
    _check_pattern(value.get("patient_pattern"), "data.negatives.patient_pattern")
    _check_int("negatives.max_slices", value.get("max_slices"), 1, optional=True)
    given = value.get("channels")
    own = channels if given is None else parse_channels(given, "data.negatives.channels")
    if channel_count(channels_setting(own)) != channel_count(channels_setting(channels)):
        raise ConfigError(
            f"data.negatives.channels={channels_setting(own)} gives {channel_count(channels_setting(own))} "
            f"channel(s) but data.channels={channels_setting(channels)} gives "
            f"{channel_count(channels_setting(channels))}: choose as many channels of the negatives as the network "
            "takes."
        )
    return Negatives(Path(str(root)), layout, own, mask_suffix, value.get("patient_pattern"),
                     value.get("max_slices"))


class BrainTumorDataModule(L.LightningDataModule):
    """Finds (``layout``), validates, splits, caches and augments 2-D tumor slices.

    ``name`` names the dataset in outputs and the split record (default: the root folder's name).
    ``layout`` is ``auto``, ``kaggle``, ``suffix`` (with ``mask_suffix`` and ``patient_pattern``) or
    ``figshare_mat`` (:func:`~bts_lightning.data.layouts.find_slices`). ``channels`` is ``gray`` or
    a list of channel indices in file order (:mod:`bts_lightning.data.channels`); batches hold
    (N, C, H, W) uint8 images. Splits (``split_by``, see :func:`make_split`): whole folds
    (``val_fold``/``test_fold``), the data's own or ``num_folds`` made from patient ids, else patient
    groups by the fractions; random slices only with ``split_by="slice"``. Every file is decoded once
    in :meth:`setup`, so bad input fails before training starts; with ``cache`` the decoded slices are
    kept in RAM. Masks are binarized by one rule for the whole dataset (:func:`mask_threshold`).
    :meth:`state_dict` puts the split (:meth:`split_record`) into every checkpoint. :attr:`distance_maps` adds
    every mask's signed distance map to its sample (:class:`SliceDataset`).

    Tumor-free training input: ``extra_augmentations`` run before ``augmentations`` (e.g.
    :class:`~bts_lightning.data.augment.TumorFreeCrop`); ``negatives`` (:func:`parse_negatives`) adds the
    empty slices of another dataset to the training set (read in ``setup("fit")``); ``empty_fraction`` draws
    that share of tumor-free slices per epoch (:class:`EmptyFractionSampler`), in every batch with
    ``empty_fraction_per_batch``.

    2.5D input: with ``neighbours`` K > 0 each image also holds the channels of the K slices before and after it
    in its scan (:mod:`bts_lightning.data.neighbours`); only the scan layout (``suffix``) has scans.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        batch_size: int = 16,
        num_workers: int | None = None,
        split_by: str = "auto",
        val_fold: int | str | None = 1,
        test_fold: int | str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 42,
        cache: bool = True,
        augmentations: Sequence[A.BasicTransform] | None = None,
        synthetic: dict[str, Any] | None = None,
        download: bool = True,
        layout: str = "auto",
        channels: str | Sequence[int] = "gray",
        mask_suffix: str = MASK_SUFFIX,
        patient_pattern: str | None = None,
        num_folds: int | None = None,
        distance_maps: bool | None = None,
        name: str | None = None,
        extra_augmentations: Sequence[A.BasicTransform] | None = None,
        negatives: Mapping[str, Any] | None = None,
        empty_fraction: float | None = None,
        empty_fraction_per_batch: bool = False,
        neighbours: int = 0,
    ) -> None:
        super().__init__()
        _check_int("image_size", image_size, MIN_IMAGE_SIZE)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0, optional=True)
        _check_int("num_folds", num_folds, 2, optional=True)
        if split_by not in SPLIT_BY:
            raise ConfigError(f"data.split_by={split_by!r} is not one of {', '.join(SPLIT_BY)}.")
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout={layout!r} is not one of {', '.join(LAYOUTS)}.")
        if not isinstance(mask_suffix, str) or not mask_suffix:
            raise ConfigError(f"data.mask_suffix={mask_suffix!r} must be a non-empty string such as _mask.")
        _check_pattern(patient_pattern)
        _check_name(name)
        check_fractions(val_fraction, test_fraction)
        _check_empty_fraction(empty_fraction)
        flags = {"cache": cache, "download": download, "empty_fraction_per_batch": empty_fraction_per_batch}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"data.{key}={value!r} must be true or false.")
        if empty_fraction_per_batch and empty_fraction is None:
            raise ConfigError("data.empty_fraction_per_batch=true needs data.empty_fraction (the share of tumor-free "
                              "slices in each batch), e.g. data.empty_fraction=0.5.")
        self.channels = parse_channels(channels)
        self.neighbours = check_neighbours(neighbours)
        # How data without scan neighbours is put right, in errors; a model's scorer (evaluate) says the model needs them.
        self.neighbours_fix = "set data.neighbours=0"
        if self.neighbours and negatives is not None:
            raise ConfigError(f"data.negatives and data.neighbours={neighbours} do not combine (another dataset's empty "
                              "slices have no scan neighbours here); set data.negatives=null or data.neighbours=0.")
        self.negatives = parse_negatives(negatives, self.channels)
        self.empty_fraction, self.empty_fraction_per_batch = empty_fraction, empty_fraction_per_batch
        self.save_hyperparameters("image_size")  # stored in checkpoints: inference resizes to it
        self.root = Path(root)
        self.name = name or self.root.name
        self.layout, self.mask_suffix, self.patient_pattern = layout, mask_suffix, patient_pattern
        self.num_folds = num_folds
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.split_by = split_by
        self.val_fold, self.test_fold = val_fold, test_fold
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed = seed
        self.cache = cache
        transforms = [*(extra_augmentations or ()), *(augmentations or ())]
        self.train_transform = A.Compose(transforms, seed=seed) if transforms else None
        self.synthetic = dict(synthetic) if synthetic else None
        self.download = download
        self.pairs: list[SlicePair] = []
        self.metadata: dict[str, dict[str, str]] | None = None
        self.split: Split | None = None
        self.data_root: Path | None = None  # the resolved root, after setup
        self.found_layout: str | None = None  # the layout read, after setup (``auto`` resolved)
        self.mask_threshold = BYTE_THRESHOLD  # tumor = mask value above it; set for the dataset in setup
        self.datasets: dict[str, SliceDataset] = {}
        self.cache_arrays: tuple[np.ndarray, np.ndarray] | None = None  # (N, C, S, S) images, masks; after setup
        self.negatives_dataset: SliceDataset | None = None  # data.negatives' empty slices, after setup("fit")
        self.negatives_root: Path | None = None  # data.negatives' resolved root, after setup("fit")
        self.train_empty: np.ndarray | None = None  # (len(training_set),) bool: tumor-free mask, after setup("fit")
        self.distance_maps = distance_maps
        self.trained_split: dict[str, Any] | None = None  # split record of a loaded checkpoint
        self.sized_mask_max: np.ndarray | None = None  # largest value of each resized mask (pairs order); after setup
        self.windows: list[tuple[int, ...]] | None = None  # each slice's scan window (pairs order); after setup

    @property
    def distance_maps(self) -> bool | None:
        """Whether samples hold ``"distance"`` maps; settable before or after :meth:`setup`.

        None (``data.distance_maps: null``) is off until the train app sets it from the loss.
        """
        return self._distance_maps

    @distance_maps.setter
    def distance_maps(self, enabled: bool | None) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigError(f"data.distance_maps={enabled!r} is invalid: it must be true, false or null (auto).")
        self._distance_maps = enabled
        for dataset in [*self.datasets.values(), *([self.negatives_dataset] if self.negatives_dataset else [])]:
            dataset.distance_maps = bool(enabled)

    def prepare_data(self) -> None:
        """Generate the synthetic dataset on first use (atomic, so concurrent jobs are safe)."""
        if self.synthetic is not None:
            try:
                ensure_dataset(self.root, **self.synthetic)
            except (TypeError, ValueError) as error:  # invalid or unknown generator arguments
                raise ConfigError(f"data.synthetic: {error}") from error

    def setup(self, stage: str | None = None) -> None:
        """Find, validate, split and (optionally) cache the slices; runs once per process."""
        if self.datasets:
            return
        if self.synthetic is not None:
            self.prepare_data()
        if self.layout in CONTENTS and not self.root.expanduser().exists():  # nothing to download for these
            raise DataError(f"Dataset root {self.root} does not exist. Put {CONTENTS[self.layout]} there, or set "
                            "data.root=DIR to the folder holding them.")
        root = resolve_root(self.root, self.download)
        self.found_layout, self.pairs = find_slices(root, self.layout, self.mask_suffix, self.patient_pattern)
        if self.neighbours:
            self.windows = self._scan_windows(root)
            log.info("Input: each slice with the %d slice(s) before and after it in its scan (data.neighbours), "
                     "%d channel(s) per slice", self.neighbours, 1 if self.channels is None else len(self.channels))
        stems = [pair.stem for pair in self.pairs]
        self.metadata = slice_metadata(self.pairs)
        settings = (self.val_fold, self.test_fold, self.val_fraction, self.test_fraction, self.seed)
        self.split = make_split(self.metadata, stems, *settings, split_by=self.split_by, source=str(root),
                                num_folds=self.num_folds, origins=ORIGINS[self.found_layout])
        self.data_root = root.resolve()
        scan = scan_pairs(self.pairs, self.image_size, keep=self.cache, channels=self.channels)
        self.mask_threshold = mask_threshold(int(scan.mask_max.max()))
        self.sized_mask_max = scan.sized_max
        self._check_training_masks(scan)
        if scan.images is not None and scan.masks is not None:
            self.cache_arrays = (scan.images, binarize_mask(scan.masks, self.mask_threshold))
        for name, indices in self._subsets().items():
            self.datasets[name] = self.make_dataset(indices, self.train_transform if name == "train" else None)
        sizes = ", ".join(f"{name} {len(indices)}" for name, indices in self._subsets().items())
        log.info("Data %s (%s layout): %d slices, split by %s, %s (%s)", root, self.found_layout, len(self.pairs),
                 self.split.method, self._split_settings(), sizes)
        if stage in (None, "fit"):
            self._setup_training_negatives(scan)

    def _split_settings(self) -> str:
        """The settings that chose ``self.split``, and the one that did not (val_fold outside fold splits)."""
        if self.split.method in ("folds", "patient_folds"):
            test = f", test fold {self.test_fold}" if self.test_fold is not None else ""
            return f"val fold {self.val_fold}{test}"
        unused = f"; data.val_fold={self.val_fold} is not used" if self.val_fold is not None else ""
        return f"data.val_fraction={self.val_fraction:g}, data.test_fraction={self.test_fraction:g}{unused}"

    def _scan_windows(self, root: Path) -> list[tuple[int, ...]]:
        """Every slice's window of ``neighbours`` slices either side in its scan; errors for data without scans."""
        if self.found_layout not in SCAN_LAYOUTS:
            raise ConfigError(
                f"data.neighbours={self.neighbours} needs one folder per scan (the suffix layout, e.g. the LGG set), "
                f"but {root} is in the {self.found_layout} layout, whose folders mix slices of different patients, "
                f"so which slices are neighbours is unknown: {self.neighbours_fix}."
            )
        positions = [slice_position(pair.image) for pair in self.pairs]
        unnumbered = [pair.image.name for pair, position in zip(self.pairs, positions) if position is None]
        if unnumbered:
            raise DataError(
                f"data.neighbours={self.neighbours}: {len(unnumbered)} slice file(s) of {root} have no slice number at "
                f"the end of their name, so their place in the scan is unknown ({format_names(sorted(unnumbered))}). "
                f"Name each slice <scan>_<n> (as the LGG set does), or {self.neighbours_fix}."
            )
        return neighbour_windows(positions, self.neighbours)

    def _setup_training_negatives(self, scan: Scan) -> None:
        """Read ``data.negatives``, note which training samples are tumor-free and check ``data.empty_fraction``."""
        if self.negatives is not None:
            self.negatives_dataset = self._load_negatives(self.negatives)
            log.info("Added %d tumor-free slices of %s to the training set (data.negatives)",
                     len(self.negatives_dataset), self.negatives_root)
        in_domain = scan.sized_max[self._subsets()["train"]] <= self.mask_threshold
        self.train_empty = np.concatenate([in_domain, np.ones(self.n_negatives, bool)])
        empty, total = int(self.train_empty.sum()), len(self.train_empty)
        target = ("as they come" if self.empty_fraction is None else
                  f"drawn to {self.empty_fraction:.0%} per {'batch' if self.empty_fraction_per_batch else 'epoch'}")
        log.info("Training set: %d of %d slices tumor-free (%.1f%%), %s (data.empty_fraction)",
                 empty, total, 100 * empty / total, target)
        if self.empty_fraction and not empty:
            raise ConfigError(
                f"data.empty_fraction={self.empty_fraction} needs tumor-free training slices, but all {total} training "
                f"slices of {self.data_root} have a tumor. Add data.negatives={{root: DIR}} (a dataset with empty "
                "slices), use data=synthetic_empty, or train on a dataset with empty slices; TumorFreeCrop "
                "negatives are made on the fly and do not count."
            )

    def _load_negatives(self, negatives: Negatives) -> SliceDataset:
        """The tumor-free slices (by their dataset's own mask rule) of ``negatives``, up to ``max_slices`` (seeded)."""
        root = negatives.root.expanduser()
        if not root.exists():
            raise DataError(f"data.negatives.root={root} does not exist: point it at a dataset folder with "
                            "tumor-free slices, or set data.negatives=null.")
        layout, pairs = find_slices(root, negatives.layout, negatives.mask_suffix, negatives.patient_pattern)
        try:
            scan = scan_pairs(pairs, self.image_size, keep=self.cache, channels=negatives.channels,
                              key="data.negatives.channels")
        except (DataError, ConfigError) as error:
            raise type(error)(f"data.negatives.root={root}: {error}") from None
        threshold = mask_threshold(int(scan.mask_max.max()))
        empty = np.flatnonzero(scan.sized_max <= threshold)
        if not len(empty):
            raise DataError(f"data.negatives.root={root} has no tumor-free slice: all {len(pairs)} masks ({layout} "
                            "layout) have tumor pixels. Choose a dataset with empty masks, or set data.negatives=null.")
        if negatives.max_slices is not None and len(empty) > negatives.max_slices:
            empty = np.sort(np.random.default_rng(self.seed).choice(empty, negatives.max_slices, replace=False))
        subsets = self._subsets()
        held_out = {self.pairs[i].image.resolve() for name in ("val", "test") for i in subsets.get(name, [])}
        shared = sorted(str(pairs[i].image.relative_to(root)) for i in empty if pairs[i].image.resolve() in held_out)
        if shared:
            raise ConfigError(f"data.negatives.root={root} holds {len(shared)} empty slice(s) of this dataset's val or "
                              f"test split ({format_names(shared)}): training on them would score the model on slices "
                              "it learned from. Take the negatives from other patients (a folder without the val and "
                              "test patients), or set data.negatives=null.")
        cache = None
        if scan.images is not None and scan.masks is not None:
            cache = (scan.images[empty], binarize_mask(scan.masks[empty], threshold))
        self.negatives_root = root.resolve()
        return SliceDataset([pairs[i] for i in empty], range(len(empty)), self.image_size, self.train_transform,
                            cache, threshold, negatives.channels, bool(self.distance_maps))

    @property
    def n_negatives(self) -> int:
        """How many ``data.negatives`` slices the training set holds (0 without them, or before setup)."""
        return len(self.negatives_dataset) if self.negatives_dataset is not None else 0

    @property
    def training_set(self) -> Dataset:
        """What the training loader draws from: the train split, then the ``data.negatives`` slices (if any).

        ``"index"`` of a negative's sample is its position among the negatives, not a slice of this dataset.
        """
        train = self.datasets["train"]
        return CombinedSlices([train, self.negatives_dataset]) if self.negatives_dataset is not None else train

    def empty_slices(self, name: str) -> int:
        """Number of slices of subset ``name`` (train, val, test) whose mask has no tumor pixel (after setup)."""
        assert self.sized_mask_max is not None, "call setup() first"
        return int(np.sum(self.sized_mask_max[self._subsets()[name]] <= self.mask_threshold))

    def make_dataset(self, indices: Sequence[int], transform: A.Compose | None = None) -> SliceDataset:
        """A :class:`SliceDataset` of slices ``indices`` with this module's size, channels, cache and mask rule."""
        return SliceDataset(self.pairs, indices, self.image_size, transform, self.cache_arrays, self.mask_threshold,
                            self.channels, bool(self.distance_maps), self.windows)

    def _subsets(self) -> dict[str, list[int]]:
        assert self.split is not None, "call setup() first"
        return {"train": self.split.train, "val": self.split.val, "test": self.split.test}

    def _check_training_masks(self, scan: Scan) -> None:
        """Raise :class:`DataError` when no training mask has a tumor pixel (e.g. 0/1/2 class-label masks); warn about
        masks read as empty though they hold values (largest at most the threshold: 0/1 masks among 0/255 ones)."""
        train = self._subsets()["train"]
        faint = np.flatnonzero((scan.mask_max > 0) & (scan.mask_max <= self.mask_threshold))
        if len(faint) and (scan.mask_max > self.mask_threshold).any():
            log.warning(
                "%d mask(s) are read as empty though they hold values up to %d (%s): tumor is a value above %d in "
                "%s, whose largest mask value is %d. If they mark a tumor (e.g. 0/1 masks among 0/255 ones), save "
                "them as 0/255.", len(faint), int(scan.mask_max[faint].max()),
                format_names(sorted(str(self.pairs[i].mask) for i in faint), 5), self.mask_threshold, self.data_root,
                int(scan.mask_max.max()))
        if (scan.mask_max[train] > self.mask_threshold).any():
            return
        largest = int(scan.mask_max.max())
        names = [self.pairs[i].mask.name for i in train]
        raise DataError(
            f"All {len(train)} training masks in {self.data_root} are empty ({format_names(names)}): "
            f"the largest mask value is {largest}, and tumor is a value above {self.mask_threshold} "
            "(masks are 0/1, or 8-bit 0/255). If the masks hold class labels (0, 1, 2, ...), convert them to "
            "0/255 tumor masks; otherwise put the tumor masks where the layout expects them."
        )

    def split_record(self) -> dict[str, Any]:
        """The split as plain JSON-able data (after :meth:`setup`), stored in checkpoints.

        ``{"method", "leaky", "settings": {name, root, layout, channels, neighbours, mask_suffix, patient_pattern,
        split_by, val_fold, test_fold, num_folds, val_fraction, test_fraction, seed[, negatives]}, "subsets":
        {name: {"n", "sha256", "ids"}}}``; ``layout`` is the one read (``auto`` resolved), ``ids`` are slice
        ids in dataset order, ``sha256`` is :func:`slice_ids_digest` of them. ``negatives``, only when
        ``data.negatives`` added slices to training (they are in no subset), is ``{"root", "n"}``.
        """
        assert self.split is not None, "call setup() first"
        settings = {
            "name": self.name,
            "root": str(self.data_root),
            "layout": self.found_layout,
            "channels": channels_setting(self.channels),
            "neighbours": self.neighbours,
            "mask_suffix": self.mask_suffix,
            "patient_pattern": self.patient_pattern,
            "split_by": self.split_by,
            "val_fold": self.val_fold,
            "test_fold": self.test_fold,
            "num_folds": self.num_folds,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }
        if self.n_negatives:
            settings["negatives"] = {"root": str(self.negatives_root), "n": self.n_negatives}
        subsets = {}
        for name, indices in self._subsets().items():
            ids = [self.pairs[i].stem for i in indices]
            subsets[name] = {"n": len(ids), "sha256": slice_ids_digest(ids), "ids": ids}
        return {"method": self.split.method, "leaky": self.split.leaky, "settings": settings, "subsets": subsets}

    def state_dict(self) -> dict[str, Any]:
        """``{"split": split_record()}`` once set up (Lightning saves it in checkpoints), else ``{}``."""
        return {"split": self.split_record()} if self.split is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's split record as :attr:`trained_split`; the split itself stays as set up."""
        self.trained_split = state_dict.get("split")
        if self.trained_split is None or self.split is None:
            return
        digests = {name: subset["sha256"] for name, subset in self.split_record()["subsets"].items()}
        trained = {name: subset["sha256"] for name, subset in self.trained_split["subsets"].items()}
        if digests != trained:
            log.warning("The checkpoint was trained on a different split of the data than the one set up now.")

    @property
    def has_test(self) -> bool:
        """Whether a test split exists (after :meth:`setup`)."""
        return bool(self.datasets) and len(self.datasets["test"]) > 0

    def label_of(self, index: int) -> str | None:
        """The metadata ``label`` of slice ``index``, if the metadata has labels."""
        if self.metadata is None:
            return None
        return self.metadata[self.pairs[index].stem].get("label") or None

    def _eval_sampler(self, dataset: SliceDataset) -> Sampler[int] | None:
        """Under DDP an unpadded sampler (each slice once over all ranks), which Lightning keeps as it is.

        Lightning's own distributed sampler pads with repeated slices, biasing per-image means.
        Ranks may get one batch fewer than others. ``None`` (sequential) on a single process.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        if 0 < len(dataset) < trainer.world_size:
            raise ConfigError(
                f"An evaluation split has {len(dataset)} slice(s), fewer than the {trainer.world_size} processes; "
                "hold out more slices or run on fewer devices."
            )
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def _train_sampler(self) -> Sampler[int]:
        """Each epoch's order from (seed, epoch); with ``data.empty_fraction`` that share drawn tumor-free (in
        every batch of every rank with ``data.empty_fraction_per_batch``).

        Under DDP each rank gets its share of the same draw (:class:`RankShare`), drawn anew every epoch.
        """
        trainer = self.trainer
        world_size = 1 if trainer is None else trainer.world_size
        if self.empty_fraction is None:
            sampler = EpochShuffleSampler(len(self.training_set), self.seed)
        else:
            assert self.train_empty is not None, "call setup('fit') first"
            per_batch = self.batch_size if self.empty_fraction_per_batch else None
            sampler = EmptyFractionSampler(self.train_empty.tolist(), self.empty_fraction, self.seed, per_batch,
                                           world_size)
        if world_size <= 1:
            return sampler
        return RankShare(sampler, num_replicas=trainer.world_size, rank=trainer.global_rank)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.training_set if name == "train" else self.datasets[name]
        sampler = self._train_sampler() if shuffle else self._eval_sampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # a short last batch is dropped only when a full one comes first: on this rank's share under DDP
            drop_last=shuffle and len(sampler) > self.batch_size,
            worker_init_fn=seed_worker_transform,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
