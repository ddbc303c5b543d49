"""Which slices ``evaluate`` scores, checked against the split a checkpoint was trained with.

Training checkpoints hold the data module's split record (``BrainTumorDataModule.split_record``:
dataset name, data root, split settings, and the slice ids of every subset). By default ``evaluate``
rebuilds the data exactly as in training from it; a ``val``/``test`` split whose slices differ from
the trained one is refused unless the user asked for other data on purpose (explicit ``data...``
overrides) or for ``split=all``. A data group naming another dataset (``data=lgg`` for a model
trained on ``brain_tumor``) takes nothing from the record: that config's root, layout, channels and
split apply, and :func:`channel_mapping` checks and says which of its channels feed the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bts_lightning.data.channels import Channels, channel_count, channels_setting
from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.neighbours import SCAN_LAYOUTS
from bts_lightning.data.splits import slice_ids_digest
from bts_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# data.* keys that define the dataset, its slices and split; each comes from the checkpoint unless overridden.
SPLIT_KEYS = ("name", "layout", "channels", "mask_suffix", "patient_pattern", "split_by", "val_fold", "test_fold",
              "num_folds", "val_fraction", "test_fraction", "seed")
# Overrides that choose the data folder: a group choice (data=lgg, paths=...), or these keys and their sub-keys.
# With none of them (nor BTS_DATA_ROOT), the training root is used.
_ROOT_GROUPS = ("data", "paths")
_ROOT_KEYS = ("data.root", "data.synthetic", "paths.data_dir")
# data.* settings that change neither which slices there are nor how they are split.
_NEUTRAL_KEYS = ("data.num_workers", "data.batch_size", "data.cache", "data.download", "data.image_size",
                 "data.augmentations", "data.distance_maps", "data.neighbours")


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


def _chooses_root(keys: set[str]) -> bool:
    return bool(keys & set(_ROOT_GROUPS)) or _given(keys, *_ROOT_KEYS) or bool(os.environ.get("BTS_DATA_ROOT"))


def explicit_data(keys: set[str]) -> bool:
    """Whether the user chose data on the command line: a ``data`` group or a ``data.*`` setting that picks
    slices (not ``data.num_workers``, ``data.batch_size``, ...), ``seed``, ``paths.data_dir``, or BTS_DATA_ROOT."""
    chosen = {key for key in keys if not _given({key}, *_NEUTRAL_KEYS)}
    return _given(chosen, "data", "seed", "paths.data_dir") or bool(os.environ.get("BTS_DATA_ROOT"))


def other_dataset(data: DictConfig, record: dict[str, Any] | None, keys: set[str]) -> bool:
    """Whether a ``data=<group>`` override chose another dataset (``data.name``) than the checkpoint's record names."""
    trained = ((record or {}).get("settings") or {}).get("name")
    return "data" in keys and trained is not None and data.get("name") != trained


def data_config(data: DictConfig, record: dict[str, Any] | None, keys: set[str], image_size: int | None) -> DictConfig:
    """``data`` with the training root, split settings and image size for every key not overridden.

    ``record`` is the checkpoint's split record (``None``: ``data`` as given); ``image_size`` the
    checkpoint's training size (``None``: unknown). Another dataset (:func:`other_dataset`) keeps
    its own settings: only the image size comes from the model.
    """
    data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
    with open_dict(data):
        if image_size is not None and not _given(keys, "data.image_size"):
            data.image_size = image_size
        if record is None or other_dataset(data, record, keys):
            return data
        settings = record["settings"]
        for key in SPLIT_KEYS:
            if key in settings and not _given(keys, f"data.{key}") and not (key == "seed" and _given(keys, "seed")):
                data[key] = settings[key]
        if not _chooses_root(keys):
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
    where = f"{scored['n']} slices of {settings['name']} ({settings['root']}), " \
            f"{describe_settings(settings, scored['method'])}"
    leaky = "; slice-level split: patients may span train and evaluation (optimistic)" if scored["leaky"] else ""
    if scored["matches_trained_split"] is None:
        relation = "no training split recorded to compare with" if scored["training_slices_scored"] is None else \
            f"{scored['training_slices_scored']} of them training slices"
    elif scored["matches_trained_split"]:
        relation = f"the checkpoint's own {scored['split']} split, {scored['training_slices_scored']} training slices"
    else:
        relation = f"NOT the checkpoint's {scored['split']} split; {scored['training_slices_scored']} training slices"
    return f"Scored {where}: {relation}{leaky}."


class TrainedSlices:
    """The slices of a checkpoint's split record (its subsets' ``ids``), found whatever root they are read from.

    With ``across_roots`` (data in one folder per scan: ids are paths relative to the root), a scored id that is a
    path suffix of a trained one, or has one as its suffix, is the same slice: ``TCGA_x/TCGA_x_1`` read from
    ``kaggle_3m/`` is ``kaggle_3m/TCGA_x/TCGA_x_1`` of a model trained on its parent, or of one patient folder linked
    elsewhere. Otherwise (flat layouts, whose ids are file stems) ids match exactly.
    """

    def __init__(self, record: dict[str, Any], across_roots: bool) -> None:
        self.subset_of: dict[tuple[str, ...], str] = {}
        self._suffixes: dict[tuple[str, ...], tuple[str, ...]] = {}
        for name, subset in record["subsets"].items():
            for slice_id in subset.get("ids") or []:
                parts = tuple(slice_id.split("/"))
                self.subset_of[parts] = name
                for start in range(1, len(parts) if across_roots else 1):
                    self._suffixes.setdefault(parts[start:], parts)
        self.across_roots = across_roots

    def find(self, slice_id: str) -> tuple[str, ...] | None:
        """The trained id (as path parts) that ``slice_id`` is, or ``None``."""
        parts = tuple(slice_id.split("/"))
        if parts in self.subset_of:
            return parts
        if parts in self._suffixes:
            return self._suffixes[parts]
        for start in range(1, len(parts) if self.across_roots else 1):
            if parts[start:] in self.subset_of:
                return parts[start:]
        return None

    def are(self, ids: Sequence[str], trained_ids: Sequence[str]) -> bool:
        """Whether ``ids`` are exactly the slices ``trained_ids`` (ids of this record), each found once."""
        expected = {tuple(slice_id.split("/")) for slice_id in trained_ids}
        return len(ids) == len(expected) and {self.find(slice_id) for slice_id in ids} == expected

    def subsets(self, ids: Sequence[str]) -> dict[str, int]:
        """How many of ``ids`` are in each subset of the record (``train``, ``val``, ``test``) and in none."""
        counts = dict.fromkeys(("train", "val", "test", "none"), 0)
        for found in map(self.find, ids):
            name = "none" if found is None else self.subset_of[found]
            counts[name] = counts.get(name, 0) + 1
        return counts


def same_held_out(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two split records hold out the same val and test slices, whatever root each read them from (data in
    one folder per scan; flat layouts by their ids' digest)."""
    layouts = {first["settings"].get("layout"), second["settings"].get("layout")}
    trained = TrainedSlices(first, across_roots=layouts <= set(SCAN_LAYOUTS))
    for name in ("val", "test"):
        mine, theirs = first["subsets"].get(name) or {}, second["subsets"].get(name) or {}
        if mine.get("sha256") == theirs.get("sha256"):
            continue
        if "ids" not in mine or "ids" not in theirs or not trained.are(theirs["ids"], mine["ids"]):
            return False
    return True


def check_scored_slices(
    split: str, ids: Sequence[str], record: dict[str, Any] | None, explicit: bool, current: dict[str, Any]
) -> dict[str, Any]:
    """Compare the slices about to be scored with the checkpoint's split; returns what metrics.json records.

    ``current`` is the data module's own split record. For ``val``/``test``, slices that differ from
    the trained subset raise ``ConfigError`` unless ``explicit`` (the user chose other data); then a
    warning says how many of them were training slices (flat layouts read from another root: how many have the names of
    training slices, ``matched_by`` "file names only", since their ids are file stems any data can share).
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
    layouts = {record["settings"].get("layout"), current["settings"].get("layout")}
    trained = TrainedSlices(record, across_roots=layouts <= set(SCAN_LAYOUTS))
    # flat layouts' ids are file stems ("1", "2", ...): read from another root, they match any data named alike
    by_name_only = not trained.across_roots and record["settings"].get("root") != current["settings"].get("root")
    in_subsets = trained.subsets(ids)
    overlap = in_subsets["train"]
    subset = record["subsets"].get(split)
    if subset is None:
        matches = None
    elif "ids" in subset:  # the same slices, whatever root they were read from
        matches = trained.are(ids, subset["ids"])
    else:
        matches = scored["sha256"] == subset["sha256"]
    trained_as = f"{record['subsets'].get(split, {}).get('n', 0)} slices of {record['settings']['root']}, split by " \
                 f"{describe_settings(record['settings'], record['method'])}"
    if matches is False and not explicit:
        raise ConfigError(
            f"The {split} split here ({len(ids)} slices, {overlap} of them training slices) is not the {split} split "
            f"this checkpoint was trained with ({trained_as}): the data on disk changed. Pass split=all to score "
            "every slice, or data overrides (data.root, data.val_fold, ...) to score other slices on purpose."
        )
    if by_name_only:
        overlap_text = (f"{overlap} of them have the names of training slices of {record['settings']['root']} (the "
                        "same slices read from elsewhere, or other data named alike)")
    else:
        overlap_text = f"{overlap} of them were training slices"
    if matches is False:
        log.warning("Scoring %d slices that are NOT the checkpoint's %s split (%s); %s.", len(ids), split, trained_as,
                    overlap_text)
    elif overlap:
        log.warning("Of the %d scored slices, %s.", len(ids), overlap_text)
    elif by_name_only and matches:
        log.warning("The %d scored slices match the checkpoint's %s split by file names only (trained from %s, read "
                    "from %s): the same slices copied elsewhere, or other data named alike.", len(ids), split,
                    record["settings"].get("root"), current["settings"].get("root"))
    return {**scored, "matches_trained_split": matches, "training_slices_scored": overlap,
            "in_trained_subsets": in_subsets, "matched_by": "file names only" if by_name_only else "slice"}


def _channels_text(setting: Any) -> str:
    return "gray" if setting == "gray" else f"[{', '.join(str(index) for index in setting)}]"


def channel_mapping(in_channels: int, trained: dict[str, Any], channels: Channels, dataset: str,
                    key: str = "data.channels") -> str:
    """One line saying which of ``dataset``'s channels feed the model, checked against its input channels.

    ``trained``: what the model was trained on (``name`` and ``channels`` of its split record, either may
    be missing); ``channels``: the parsed setting ``key`` of the data scored.

    Raises:
        ConfigError: ``key`` gives another number of channels than ``in_channels``, naming it.
    """
    setting = channels_setting(channels)
    trained_setting = trained.get("channels")
    trained_as = f"trained on {trained.get('name') or 'unknown data'}" + (
        f": {_channels_text(trained_setting)}" if trained_setting is not None else "")
    model = f"model ({in_channels} channel{'s' * (in_channels != 1)}, {trained_as})"
    count = channel_count(setting)
    if count != in_channels:
        if trained_setting is not None and channel_count(trained_setting) == in_channels:
            example = _channels_text(trained_setting).replace(" ", "")
        else:
            example = "[1]" if in_channels == 1 else f"[{','.join(str(i) for i in range(in_channels))}]"
        raise ConfigError(
            f"{key}={_channels_text(setting).replace(' ', '')} gives {count} channel(s) of {dataset}, but the "
            f"{model} takes {in_channels}: pass {key} with {in_channels} channel index(es) in {dataset}'s file "
            f"order{' (or gray)' if in_channels == 1 else ''}, e.g. {key}={example}."
        )
    if setting == "gray":
        return f"{model} reads {dataset} as gray (each image converted to one grayscale channel)"
    return f"{model} reads channel{'s' * (count != 1)} {_channels_text(setting)} of {dataset} (file order)"
