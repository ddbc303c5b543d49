"""LightningDataModule over a Kaggle-layout folder (``images/``, ``masks/``, optional ``metadata.csv``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import torch
from torch.utils.data import DataLoader

from bts_lightning.callbacks.reproducibility import seed_worker_transform
from bts_lightning.data.dataset import SliceDataset, scan_pairs
from bts_lightning.data.discovery import SlicePair, find_pairs, read_metadata
from bts_lightning.data.download import resolve_root
from bts_lightning.data.sampling import EpochShuffleSampler
from bts_lightning.data.splits import Split, make_split
from bts_lightning.data.synthetic import ensure_dataset

log = logging.getLogger(__name__)


def default_num_workers() -> int:
    """One loader worker per spare core (at most 12): the main process drives the accelerator."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores - 1, 12))


class BrainTumorDataModule(L.LightningDataModule):
    """Pairs, validates, splits, caches and augments 2-D tumor slices.

    Splits come from ``metadata.csv``: whole folds (``val_fold``/``test_fold``), else patient
    groups (``pid``), else random slices. Every file is decoded once in :meth:`setup`, so bad
    input fails before training starts; with ``cache`` the decoded slices are kept in RAM.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 256,
        batch_size: int = 16,
        num_workers: int | None = None,
        val_fold: int | str | None = 1,
        test_fold: int | str | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 42,
        cache: bool = True,
        augmentations: Sequence[A.BasicTransform] | None = None,
        synthetic: dict[str, Any] | None = None,
        download: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters("image_size")  # stored in checkpoints: inference resizes to it
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_fold, self.test_fold = val_fold, test_fold
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.seed = seed
        self.cache = cache
        self.train_transform = A.Compose(list(augmentations), seed=seed) if augmentations else None
        self.synthetic = dict(synthetic) if synthetic else None
        self.download = download
        self.pairs: list[SlicePair] = []
        self.metadata: dict[str, dict[str, str]] | None = None
        self.split: Split | None = None
        self.datasets: dict[str, SliceDataset] = {}

    def prepare_data(self) -> None:
        """Generate the synthetic dataset on first use (atomic, so concurrent jobs are safe)."""
        if self.synthetic is not None:
            ensure_dataset(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        """Find, validate, split and (optionally) cache the slices; runs once per process."""
        if self.datasets:
            return
        if self.synthetic is not None:
            self.prepare_data()
        root = resolve_root(self.root, self.download)
        self.pairs = find_pairs(root)
        stems = [pair.stem for pair in self.pairs]
        self.metadata = read_metadata(root, stems)
        self.split = make_split(
            self.metadata, stems, self.val_fold, self.test_fold, self.val_fraction, self.test_fraction, self.seed
        )
        cache = scan_pairs(self.pairs, self.image_size, keep=self.cache)
        subsets = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        for name, indices in subsets.items():
            transform = self.train_transform if name == "train" else None
            self.datasets[name] = SliceDataset(self.pairs, indices, self.image_size, transform, cache)
        sizes = ", ".join(f"{name} {len(indices)}" for name, indices in subsets.items())
        log.info("Data %s: %d slices, %s split (%s)", root, len(self.pairs), self.split.method, sizes)

    @property
    def has_test(self) -> bool:
        """Whether a test split exists (after :meth:`setup`)."""
        return bool(self.datasets) and len(self.datasets["test"]) > 0

    def label_of(self, index: int) -> str | None:
        """The metadata ``label`` of slice ``index``, if the metadata has labels."""
        if self.metadata is None:
            return None
        return self.metadata[self.pairs[index].stem].get("label") or None

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[name]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=shuffle and len(dataset) > self.batch_size,
            worker_init_fn=seed_worker_transform,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
