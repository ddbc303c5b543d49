"""Find image/mask pairs in a Kaggle-layout root and read its metadata."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from bts_lightning.errors import DataError, format_names

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
METADATA_FILE = "metadata.csv"


@dataclass(frozen=True)
class SlicePair:
    """One slice: its identifier (file stem) and image and mask files."""

    stem: str
    image: Path
    mask: Path


def _files_by_stem(folder: Path) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    duplicates: list[str] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in by_stem:
            duplicates.append(f"{by_stem[path.stem].name} / {path.name}")
        by_stem[path.stem] = path
    if duplicates:
        raise DataError(
            f"{folder}: several files share a name stem ({format_names(duplicates)}); "
            "keep one file per slice."
        )
    return by_stem


def find_pairs(root: str | Path) -> list[SlicePair]:
    """Pair ``root/images/*`` with ``root/masks/*`` by file stem, sorted by stem.

    Raises :class:`DataError` naming the offending files when the layout is incomplete.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Dataset root {root} does not exist. Put the Kaggle 'brain-tumor-segmentation' "
            "download there (folders images/ and masks/), set data.root=DIR or BTS_DATA_ROOT, "
            "or use data=synthetic."
        )
    folders = {name: root / name for name in ("images", "masks")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"Dataset root {root} has no {name}/ folder; expected {root}/images and {root}/masks.")
    images = _files_by_stem(folders["images"])
    masks = _files_by_stem(folders["masks"])
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"No images ({suffixes}) found in {folders['images']}.")
    problems = []
    if missing := sorted(set(images) - set(masks), key=_natural_key):
        names = [images[stem].name for stem in missing]
        problems.append(f"{len(missing)} image(s) without a mask in {folders['masks']}: {format_names(names)}")
    if orphans := sorted(set(masks) - set(images), key=_natural_key):
        names = [masks[stem].name for stem in orphans]
        problems.append(f"{len(orphans)} mask(s) without an image in {folders['images']}: {format_names(names)}")
    if problems:
        raise DataError("; ".join(problems) + ". Every slice needs an image and a mask with the same name stem.")
    return [SlicePair(stem, images[stem], masks[stem]) for stem in sorted(images, key=_natural_key)]


def _natural_key(stem: str) -> tuple[int, int | str]:
    """Sort numeric stems numerically ('2' before '10'), others alphabetically after them."""
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def read_metadata(root: str | Path, stems: list[str]) -> dict[str, dict[str, str]] | None:
    """Read ``root/metadata.csv`` keyed by ``index``; ``None`` when the file is absent.

    Every row must name an existing slice and every slice must have a row.
    """
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "index" not in reader.fieldnames:
            raise DataError(f"{path}: missing header with an 'index' column (expected index,label,fold[,pid]).")
        rows = {row["index"].strip(): {k: (v or "").strip() for k, v in row.items()} for row in reader}
    unknown = sorted(set(rows) - set(stems), key=_natural_key)
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} row(s) name slices that have no image/mask files: "
            f"{format_names(unknown)}. Remove those rows or add the files."
        )
    unlisted = sorted(set(stems) - set(rows), key=_natural_key)
    if unlisted:
        raise DataError(
            f"{path}: {len(unlisted)} slice(s) have no metadata row: {format_names(unlisted)}. "
            "Add rows for them or remove the files."
        )
    return rows
