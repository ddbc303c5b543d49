"""Which slices ``evaluate`` scores, checked against the split a checkpoint was trained with.

Training checkpoints hold the data module's split record (``BrainTumorDataModule.split_record``:
data root, split settings, and the slice ids of every subset). By default ``evaluate`` rebuilds the
data exactly as in training from it; a ``val``/``test`` split whose slices differ from the trained
one is refused unless the user asked for other data on purpose (explicit ``data...`` overrides) or
for ``split=all``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.splits import slice_ids_digest
from bts_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# data.* keys that define the slices and split; each comes from the checkpoint unless overridden.
SPLIT_KEYS = ("layout", "channels", "mask_suffix", "patient_pattern", "split_by", "val_fold", "test_fold", "num_folds",
              "val_fraction", "test_fraction", "seed")
# Overrides that choose the data folder: with none of them (nor BTS_DATA_ROOT), the training root is used.
_ROOT_KEYS = ("data", "data.root", "data.synthetic", "paths.data_dir", "paths")


def stored_split(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The split record a training checkpoint holds, or ``None`` (exported models, older checkpoints)."""
    path = Path(ckpt_path)
    if path.suffix.lower() != ".ckpt":
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    record = (checkpoint.get(BrainTumorDataModule.__qualname__) or {}).get("split")
    return record if isinstance(record, dict) else None


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The keys of command-line overrides (``data.val_fold=3`` -> ``data.val_fold``)."""
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides}


def _given(keys: set[str], *names: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for key in keys for name in names)


def explicit_data(keys: set[str]) -> bool:
    """Whether the user chose data on the command line (any ``data``, ``seed`` or ``paths.data_dir`` override)."""
    return _given(keys, "data", "seed", "paths.data_dir") or bool(os.environ.get("BTS_DATA_ROOT"))


def data_config(data: DictConfig, record: dict[str, Any] | None, keys: set[str], image_size: int | None) -> DictConfig:
    """``data`` with the training root, split settings and image size for every key not overridden.

    ``record`` is the checkpoint's split record (``None``: ``data`` as given); ``image_size`` the
    checkpoint's training size (``None``: unknown).
    """
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
    with open_dict(data):
        if image_size is not None and not _given(keys, "data.image_size"):
            data.image_size = image_size
        if record is None:
            return data
        settings = record["settings"]
        for key in SPLIT_KEYS:
            if key in settings and not _given(keys, f"data.{key}") and not (key == "seed" and _given(keys, "seed")):
                data[key] = settings[key]
        if not _given(keys, *_ROOT_KEYS) and not os.environ.get("BTS_DATA_ROOT"):
            if not Path(settings["root"]).is_dir():
                raise ConfigError(
                    f"The checkpoint was trained on {settings['root']}, which is not here; pass data.root=DIR "
                    "with the same data (the split is checked against the checkpoint), or split=all for other data."
                )
            data.root, data.synthetic, data.download = settings["root"], None, False
    return data


def describe_settings(settings: dict[str, Any], method: str) -> str:
    """One phrase for a split's settings, e.g. ``folds (val_fold=3, test_fold=None)``."""
    if method in ("folds", "patient_folds"):
        made = f", num_folds={settings.get('num_folds')}, seed={settings['seed']}" if method == "patient_folds" else ""
        return f"{method} (val_fold={settings['val_fold']}, test_fold={settings['test_fold']}{made})"
    return (f"{method} (val_fraction={settings['val_fraction']}, test_fraction={settings['test_fraction']}, "
            f"seed={settings['seed']})")


def describe_scored(scored: dict[str, Any]) -> str:
    """One line saying which slices were scored and how they relate to the trained split."""
    settings = scored["settings"]
    where = f"{scored['n']} slices of {settings['root']}, {describe_settings(settings, scored['method'])}"
    leaky = "; slice-level split: patients may span train and evaluation (optimistic)" if scored["leaky"] else ""
    if scored["matches_trained_split"] is None:
        relation = "no training split recorded to compare with" if scored["training_slices_scored"] is None else \
            f"{scored['training_slices_scored']} of them training slices"
    elif scored["matches_trained_split"]:
        relation = f"the checkpoint's own {scored['split']} split, {scored['training_slices_scored']} training slices"
    else:
        relation = f"NOT the checkpoint's {scored['split']} split; {scored['training_slices_scored']} training slices"
    return f"Scored {where}: {relation}{leaky}."


def check_scored_slices(
    split: str, ids: Sequence[str], record: dict[str, Any] | None, explicit: bool, current: dict[str, Any]
) -> dict[str, Any]:
    """Compare the slices about to be scored with the checkpoint's split; returns what metrics.json records.

    ``current`` is the data module's own split record. For ``val``/``test``, slices that differ from
    the trained subset raise ``ConfigError`` unless ``explicit`` (the user chose other data); then a
    warning says how many of them were training slices.
    """
    scored = {
        "split": split,
        "n": len(ids),
        "sha256": slice_ids_digest(ids),
        "method": current["method"],
        "leaky": current["leaky"],
        "settings": current["settings"],
    }
    if record is None:
        log.warning("The model file records no training split (exported model or older checkpoint): make sure the "
                    "data overrides give the split it was trained with; %d slices scored.", len(ids))
        return {**scored, "matches_trained_split": None, "training_slices_scored": None}
    training = set(record["subsets"]["train"]["ids"])
    overlap = sum(stem in training for stem in ids)
    matches = scored["sha256"] == record["subsets"][split]["sha256"] if split in record["subsets"] else None
    trained_as = f"{record['subsets'].get(split, {}).get('n', 0)} slices of {record['settings']['root']}, split by " \
                 f"{describe_settings(record['settings'], record['method'])}"
    if matches is False and not explicit:
        raise ConfigError(
            f"The {split} split here ({len(ids)} slices, {overlap} of them training slices) is not the {split} split "
            f"this checkpoint was trained with ({trained_as}): the data on disk changed. Pass split=all to score "
            "every slice, or data overrides (data.root, data.val_fold, ...) to score other slices on purpose."
        )
    if matches is False:
        log.warning("Scoring %d slices that are NOT the checkpoint's %s split (%s); %d of them were training slices.",
                    len(ids), split, trained_as, overlap)
    elif overlap:
        log.warning("%d of the %d scored slices were training slices.", overlap, len(ids))
    return {**scored, "matches_trained_split": matches, "training_slices_scored": overlap}
