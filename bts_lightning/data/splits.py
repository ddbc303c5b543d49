"""Train/val/test splits: patient-wise folds, patient groups, or random slices."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from bts_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Indices (into the sorted slice list) of each subset, and how they were chosen."""

    train: list[int]
    val: list[int]
    test: list[int]
    method: str


def split_by_folds(folds: list[str], val_fold: int | str, test_fold: int | str | None) -> Split:
    """Validation and test are whole folds; every other fold trains."""
    available = sorted(set(folds), key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else f))
    chosen = {"data.val_fold": val_fold, "data.test_fold": test_fold}
    for key, fold in chosen.items():
        if fold is not None and str(fold) not in available:
            raise ConfigError(f"{key}={fold} is not a fold in metadata.csv; available folds: {', '.join(available)}.")
    if test_fold is not None and str(test_fold) == str(val_fold):
        raise ConfigError(f"data.val_fold and data.test_fold are both {val_fold}; choose different folds.")
    val = [i for i, f in enumerate(folds) if f == str(val_fold)]
    test = [i for i, f in enumerate(folds) if test_fold is not None and f == str(test_fold)]
    train = [i for i, f in enumerate(folds) if f not in {str(val_fold), str(test_fold)}]
    if not train:
        raise ConfigError(f"No training slices left after holding out folds {val_fold} and {test_fold}.")
    return Split(train, val, test, "folds")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction <= 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must satisfy "
            "0 < val, 0 <= test and val + test < 1."
        )


def split_by_groups(groups: list[str], val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffle groups (patients) by seed and fill val, then test, then train: no group spans two subsets."""
    _check_fractions(val_fraction, test_fraction)
    unique = sorted(set(groups))
    if len(unique) < 2 + (test_fraction > 0):
        raise DataError(f"Only {len(unique)} patient id(s) in metadata.csv; a group-aware split needs more.")
    order = np.random.default_rng(seed).permutation(len(unique))
    sizes = {g: groups.count(g) for g in unique}
    targets = {"val": val_fraction * len(groups), "test": test_fraction * len(groups)}
    assignment: dict[str, str] = {}
    filled = {"val": 0, "test": 0}
    for position in order:
        group = unique[position]
        subset = next((s for s in ("val", "test") if filled[s] < targets[s]), "train")
        assignment[group] = subset
        if subset != "train":
            filled[subset] += sizes[group]
    subsets = {s: [i for i, g in enumerate(groups) if assignment[g] == s] for s in ("train", "val", "test")}
    if not subsets["train"]:
        raise ConfigError("The group-aware split left no training patients; lower data.val_fraction/test_fraction.")
    return Split(subsets["train"], subsets["val"], subsets["test"], "groups")


def split_randomly(count: int, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Random slice-level split by seed (slices of one patient may land in different subsets)."""
    _check_fractions(val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = max(1, round(val_fraction * count))
    n_test = round(test_fraction * count)
    if n_val + n_test >= count:
        raise DataError(f"Only {count} slice(s): too few to split into train/val/test.")
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    log.warning(
        "No folds or patient ids (metadata.csv with 'fold' or 'pid'): splitting slices at random. "
        "Slices of one patient may leak between train and validation, inflating validation scores."
    )
    return Split(sorted(train), sorted(val), sorted(test), "random")


def make_split(
    metadata: dict[str, dict[str, str]] | None,
    stems: list[str],
    val_fold: int | str | None,
    test_fold: int | str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Split:
    """Choose the split from what the metadata offers: folds, else patient ids, else random."""
    columns = set(next(iter(metadata.values()))) if metadata else set()
    if "fold" in columns and val_fold is not None:
        return split_by_folds([metadata[s]["fold"] for s in stems], val_fold, test_fold)
    if "pid" in columns:
        return split_by_groups([metadata[s]["pid"] for s in stems], val_fraction, test_fraction, seed)
    return split_randomly(len(stems), val_fraction, test_fraction, seed)
