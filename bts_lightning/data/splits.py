"""Train/val/test splits: whole folds (the data's own, or made per patient), patient groups, or (explicitly) random slices."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from bts_lightning.errors import ConfigError, DataError, format_names

log = logging.getLogger(__name__)

SPLIT_BY = ("auto", "fold", "patient", "slice")


@dataclass(frozen=True)
class Split:
    """Indices (into the sorted slice list) of each subset, and how they were chosen.

    ``method`` is "folds" (the data's own), "patient_folds" (made from patient ids), "patients" or
    "slices"; only slice-level splits are ``leaky`` (slices of one patient may be in several subsets,
    so validation scores are optimistic).
    """

    train: list[int]
    val: list[int]
    test: list[int]
    method: str

    @property
    def leaky(self) -> bool:
        return self.method == "slices"


def slice_ids_digest(ids: Iterable[str]) -> str:
    """SHA-256 hex digest of slice ids (file stems), sorted and joined by newlines: independent of order."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def split_by_folds(folds: list[str], val_fold: int | str, test_fold: int | str | None) -> Split:
    """Validation and test are whole folds; every other fold trains."""
    available = sorted(set(folds), key=lambda f: (not f.isdecimal(), int(f) if f.isdecimal() else f))
    chosen = {"data.val_fold": val_fold, "data.test_fold": test_fold}
    for key, fold in chosen.items():
        if fold is not None and str(fold) not in available:
            raise ConfigError(f"{key}={fold} is not one of the data's folds; available folds: {', '.join(available)}.")
    if test_fold is not None and str(test_fold) == str(val_fold):
        raise ConfigError(f"data.val_fold and data.test_fold are both {val_fold}; choose different folds (or "
                          "data.test_fold=null: no test split, e.g. to sweep data.val_fold over every fold).")
    val = [i for i, f in enumerate(folds) if f == str(val_fold)]
    test = [i for i, f in enumerate(folds) if test_fold is not None and f == str(test_fold)]
    train = [i for i, f in enumerate(folds) if f not in {str(val_fold), str(test_fold)}]
    if not train:
        held_out = f"data.val_fold={val_fold}" + (f" and data.test_fold={test_fold}" if test_fold is not None else "")
        raise ConfigError(f"No training slices left: {held_out} hold(s) out every fold the data has "
                          f"({', '.join(available)}). Give the data more folds, or split it by patient "
                          "(data.split_by=patient).")
    return Split(train, val, test, "folds")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise :class:`ConfigError` unless 0 < val, 0 <= test and val + test < 1."""
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in (val_fraction, test_fraction)):
        raise ConfigError(
            f"data.val_fraction={val_fraction!r} and data.test_fraction={test_fraction!r} must be numbers."
        )
    if val_fraction <= 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must satisfy "
            "0 < val, 0 <= test and val + test < 1."
        )


def split_by_groups(groups: list[str], val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Shuffle groups (patients) by seed and fill val, then test, then train: no group spans two subsets."""
    check_fractions(val_fraction, test_fraction)
    unique = sorted(set(groups))
    if len(unique) < 2 + (test_fraction > 0):
        raise DataError(f"Only {len(unique)} patient id(s) in the data; a group-aware split needs more.")
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
    return Split(subsets["train"], subsets["val"], subsets["test"], "patients")


def split_randomly(count: int, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Random slice-level split by seed (slices of one patient may land in different subsets)."""
    check_fractions(val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_val = max(1, round(val_fraction * count))
    n_test = round(test_fraction * count)
    if n_val + n_test >= count:
        raise DataError(f"Only {count} slice(s): too few to split into train/val/test.")
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    log.warning(
        "data.split_by=slice: splitting slices at random. "
        "Slices of one patient may leak between train and validation, inflating validation scores."
    )
    return Split(sorted(train), sorted(val), sorted(test), "slices")


def make_patient_folds(pids: list[str], labels: list[str] | None, num_folds: int, seed: int) -> list[str]:
    """The fold ("1" ... ``num_folds``) of every slice: whole patients, dealt out in a ``seed``-shuffled order.

    With ``labels`` the deal is stratified: patients are dealt label by label (a patient's label is its
    most common one), continuing round the folds, so every fold gets about as many patients of each label.
    """
    patients = sorted(set(pids))
    if len(patients) < num_folds:
        raise DataError(
            f"Only {len(patients)} patient id(s): data.num_folds={num_folds} patient-wise folds need at least "
            f"{num_folds} patients; lower data.num_folds."
        )
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for pid, label in zip(pids, labels or [""] * len(pids)):
        counts[pid][label] += 1
    label_of = {pid: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for pid, c in counts.items()}
    shuffled = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    dealt = sorted(shuffled, key=lambda pid: label_of[pid])  # stable: shuffled order within each label
    fold_of = {pid: str(position % num_folds + 1) for position, pid in enumerate(dealt)}
    return [fold_of[pid] for pid in pids]


@dataclass(frozen=True)
class Origins:
    """Where a layout's folds and patient ids come from, for error messages: what is missing, and the fix."""

    no_folds: str = "no metadata.csv with a 'fold' column"
    no_pids: str = "no metadata.csv with a 'pid' column"
    remedy: str = "Add a metadata.csv with a 'fold' or 'pid' column (index,label,fold[,pid])"


METADATA_ORIGINS = Origins()  # the kaggle layout's: folds and patient ids come from metadata.csv


def check_patients_in_one_fold(metadata: dict[str, dict[str, str]], stems: list[str], source: str) -> None:
    """``DataError`` naming the patients (``pid``) whose slices sit in more than one ``fold``: a fold split would put
    one patient in training and in evaluation."""
    folds: dict[str, set[str]] = {}
    for stem in stems:
        folds.setdefault(metadata[stem]["pid"], set()).add(metadata[stem]["fold"])
    spread = {pid: sorted(found) for pid, found in folds.items() if len(found) > 1}
    if spread:
        shown = [f"pid {pid} in folds {', '.join(found)}" for pid, found in sorted(spread.items())]
        raise DataError(f"{source}: metadata.csv puts {len(spread)} patient(s) in more than one fold "
                        f"({format_names(shown)}), so a fold split would score slices of patients it trained on. Give "
                        "each patient's slices one fold.")


def make_split(
    metadata: dict[str, dict[str, str]] | None,
    stems: list[str],
    val_fold: int | str | None,
    test_fold: int | str | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_by: str = "auto",
    source: str = "the dataset",
    num_folds: int | None = None,
    origins: Origins = METADATA_ORIGINS,
) -> Split:
    """Split by ``split_by``: "fold", "patient", "slice", or "auto" (folds, else patient ids, else an error).

    Folds are the data's own (a ``fold`` column), else, when the data has patient ids and ``num_folds``
    is set, ``num_folds`` patient-wise folds made by :func:`make_patient_folds` (stratified by label).
    "auto" takes folds when there are (or can be made) and ``val_fold`` is set, else patient groups by
    the fractions. ``source`` (the dataset root) and ``origins`` name the data in error messages. A
    slice-level split is only made when asked for, since it leaks patients between subsets.
    """
    if split_by not in SPLIT_BY:
        raise ConfigError(f"data.split_by={split_by!r} is not one of {', '.join(SPLIT_BY)}.")
    columns = set(next(iter(metadata.values()))) if metadata else set()
    has_folds = "fold" in columns
    can_make_folds = not has_folds and "pid" in columns and num_folds is not None
    if split_by == "auto":
        if (has_folds or can_make_folds) and val_fold is not None:
            split_by = "fold"
        elif "pid" in columns:
            split_by = "patient"
        elif has_folds:
            raise ConfigError(
                f"data.val_fold=null, but {source} is split by its folds (metadata.csv's fold column) and has no "
                "patient ids to split by otherwise: set data.val_fold=K to hold out fold K, or pass "
                "data.split_by=slice to accept a slice-level split whose validation scores are optimistic."
            )
        else:
            raise DataError(
                f"{source} has no folds or patient ids to split by. {origins.remedy}, or pass "
                "data.split_by=slice to accept a slice-level split whose validation scores are optimistic "
                "(one patient's slices can be in train and validation)."
            )
    if split_by == "fold":
        if not (has_folds or can_make_folds):
            fix = ("Set data.num_folds=K to make K patient-wise folds from its patient ids, or choose data.split_by="
                   "auto, patient or slice" if "pid" in columns else f"{origins.remedy}, or choose data.split_by=slice")
            raise DataError(f"data.split_by=fold, but {source} has {origins.no_folds}. {fix}.")
        if val_fold is None:
            raise ConfigError("data.split_by=fold needs data.val_fold=K (the fold to validate on).")
        if test_fraction:  # a patient or slice split would have used it; folds take data.test_fold instead
            log.warning("data.test_fraction=%g is not used: the split is by folds, whose test split is data.test_fold "
                        "(%s).", test_fraction, "none" if test_fold is None else f"fold {test_fold}")
        if has_folds:
            if "pid" in columns:
                check_patients_in_one_fold(metadata, stems, source)
            own = len({metadata[s]["fold"] for s in stems})
            if num_folds is not None and num_folds != own:
                log.warning("data.num_folds=%d is not used: %s has %d folds of its own, which the split uses "
                            "(data.num_folds only makes folds for data without them), so a cross-validation validates "
                            "each of them: data.val_fold=%s (experiment=cv sweeps 1,2,3,4).", num_folds, source, own,
                            ",".join(str(fold) for fold in sorted({metadata[s]["fold"] for s in stems})))
            return split_by_folds([metadata[s]["fold"] for s in stems], val_fold, test_fold)
        pids = [metadata[s]["pid"] for s in stems]
        labels = [metadata[s]["label"] for s in stems] if "label" in columns else None
        folds = make_patient_folds(pids, labels, num_folds, seed)
        return replace(split_by_folds(folds, val_fold, test_fold), method="patient_folds")
    if test_fold is not None:  # a fold split would have used it; these take data.test_fraction instead
        log.warning("data.test_fold=%s is not used: the split is by %s (data.split_by=%s), whose test share is "
                    "data.test_fraction=%g%s.", test_fold, "patients" if split_by == "patient" else "slices", split_by,
                    test_fraction, " (no test split)" if not test_fraction else "")
    if split_by == "patient":
        if "pid" not in columns:
            raise DataError(
                f"data.split_by=patient, but {source} has {origins.no_pids}. {origins.remedy}, "
                "or choose data.split_by=auto, fold or slice."
            )
        return split_by_groups([metadata[s]["pid"] for s in stems], val_fraction, test_fraction, seed)
    return split_randomly(len(stems), val_fraction, test_fraction, seed)
