"""The one place that decides a dataset's layout (``data.layout``) and lists its slice records.

- ``kaggle``: ``ROOT/images/*`` and ``ROOT/masks/*`` paired by stem, optional ``metadata.csv``
  (``index,label,fold[,pid]``) for labels, folds and patient ids (:mod:`bts_lightning.data.discovery`);
- ``suffix``: nested folders, each mask beside its image under ``mask_suffix``, the patient id from
  the folder name (:mod:`bts_lightning.data.suffix_layout`);
- ``figshare_mat``: the original Figshare release, ``1.mat ... 3064.mat`` (+ ``cvind.mat``)
  (:mod:`bts_lightning.data.figshare_layout`);
- ``auto``: whichever of these the root shows; none or several is an error naming what was found.

Every layout yields the same :class:`~bts_lightning.data.discovery.SlicePair` records, so splitting,
decoding, caching and augmentation are shared.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

from bts_lightning.data.discovery import SlicePair, find_pairs, read_metadata
from bts_lightning.data.figshare_layout import find_mat_slices
from bts_lightning.data.figshare_metadata import CVIND_FILE, SLICE_NAME
from bts_lightning.data.splits import METADATA_ORIGINS, Origins
from bts_lightning.data.suffix_layout import MASK_SUFFIX, find_suffix_slices, image_files
from bts_lightning.errors import DataError

LAYOUTS = ("auto", "kaggle", "suffix", "figshare_mat")
# What a root of each layout that is not downloaded holds, for the error when the root is missing.
CONTENTS = {
    "suffix": "folders of slices X.tif with their masks X_mask.tif beside them (e.g. the LGG set's kaggle_3m/)",
    "figshare_mat": "the Figshare release's 1.mat ... 3064.mat (its zips unpacked) and cvind.mat",
}
# Where each layout's folds and patient ids come from, for split error messages.
ORIGINS = {
    "kaggle": METADATA_ORIGINS,
    "suffix": Origins(
        no_folds="no folds (the suffix layout has none of its own)",
        no_pids="no patient ids (its slices are not in patient folders)",
        remedy="Put each patient's slices in a folder of its own (the patient id comes from its name)",
    ),
    "figshare_mat": Origins(
        no_folds=f"no {CVIND_FILE} (the release's folds)",
        no_pids="no patient ids",
        remedy=f"Add the release's {CVIND_FILE} to the root",
    ),
}


def _evidence(root: Path, mask_suffix: str) -> dict[str, str]:
    """For each layout whose marks ``root`` shows, one example of them (relative to ``root``)."""
    found = {}
    if (root / "images").is_dir() and (root / "masks").is_dir():
        found["kaggle"] = "images/ and masks/"
    mats = (p for p in itertools.chain(root.glob("*.mat"), root.glob("*/*.mat")) if SLICE_NAME.match(p.name))
    if mat := next(mats, None):
        found["figshare_mat"] = mat.relative_to(root).as_posix()
    masks = (p for p in image_files(root) if p.stem.endswith(mask_suffix) and len(p.stem) > len(mask_suffix))
    if mask := next(masks, None):
        found["suffix"] = mask.relative_to(root).as_posix()
    return found


def detect_layout(root: Path, mask_suffix: str = MASK_SUFFIX) -> str:
    """The layout ``root`` shows; raises :class:`DataError` when it shows none or several (a mixed root)."""
    found = _evidence(root, mask_suffix)
    if len(found) == 1:
        return next(iter(found))
    if not found:
        raise DataError(
            f"{root} holds no dataset layout: expected images/ and masks/ (kaggle), masks named X{mask_suffix}.tif "
            "beside their images X.tif (suffix), or the Figshare release's 1.mat, 2.mat, ... (figshare_mat)."
        )
    shown = "; ".join(f"{layout} ({example})" for layout, example in found.items())
    raise DataError(
        f"{root} mixes dataset layouts: {shown}. Keep one dataset per root, or choose one with "
        f"data.layout={'|'.join(found)}."
    )


def _kaggle_slices(root: Path) -> list[SlicePair]:
    pairs = find_pairs(root)
    metadata = read_metadata(root, [pair.stem for pair in pairs])
    if metadata is None:
        return pairs
    columns = ("pid", "label", "fold")
    return [replace(pair, **{key: metadata[pair.stem].get(key) or None for key in columns}) for pair in pairs]


def find_slices(root: Path, layout: str, mask_suffix: str, patient_pattern: str | None) -> tuple[str, list[SlicePair]]:
    """``(layout used, slice records)`` of the dataset in ``root`` (``layout`` ``auto`` is detected).

    Raises :class:`DataError` naming the offending files for a missing, mixed, unpaired or unreadable layout.
    """
    if root.is_file():
        holding = CONTENTS.get(layout, "images/ and masks/ (or another data.layout)")
        variable = "BTS_FIGSHARE_ROOT" if layout == "figshare_mat" else "BTS_DATA_ROOT"
        raise DataError(f"Dataset root {root} is a file, not a folder holding {holding}; set data.root=DIR (or "
                        f"{variable}) to that folder.")
    if layout == "auto":
        layout = detect_layout(root, mask_suffix)
    if layout == "kaggle":
        return layout, _kaggle_slices(root)
    if layout == "suffix":
        return layout, find_suffix_slices(root, mask_suffix, patient_pattern)
    return layout, find_mat_slices(root)


def slice_metadata(pairs: list[SlicePair]) -> dict[str, dict[str, str]] | None:
    """The records' labels, folds and patient ids as metadata rows keyed by slice id (``None`` without any).

    Rows are ``{"index": id, column: value}`` with the columns (``label``, ``fold``, ``pid``) some record has.
    """
    columns = [column for column in ("label", "fold", "pid") if any(getattr(pair, column) for pair in pairs)]
    if not columns:
        return None
    return {pair.stem: {"index": pair.stem, **{c: getattr(pair, c) or "" for c in columns}} for pair in pairs}
