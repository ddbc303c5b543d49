"""The slice record every layout yields, and the Kaggle layout: ``images/`` + ``masks/`` paired by stem, ``metadata.csv``."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bts_lightning.errors import DataError, format_names

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
METADATA_FILE = "metadata.csv"


@dataclass(frozen=True)
class SlicePair:
    """One slice record, the same for every layout (:mod:`bts_lightning.data.layouts`).

    ``stem`` is the slice id, unique in the dataset (Kaggle: the file stem; suffix layout: the image's
    path relative to the root, without extension; Figshare: the slice number). ``image`` and ``mask``
    are image files, or both the same Figshare ``.mat`` file (``cjdata.image``, ``cjdata.tumorMask``).
    ``pid`` (patient id), ``label`` and ``fold`` are ``None`` where the layout has none.
    """

    stem: str
    image: Path
    mask: Path
    pid: str | None = None
    label: str | None = None
    fold: str | None = None


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """The image files of ``folder`` by stem; hidden files (macOS ``._1.png`` resource forks) are not slices, as in the
    suffix layout."""
    by_stem: dict[str, Path] = {}
    duplicates: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
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
    if root.is_file():
        raise DataError(
            f"Dataset root {root} is a file, not a folder holding images/ and masks/; "
            "set data.root=DIR (or BTS_DATA_ROOT) to that folder."
        )
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
    if missing := sorted(set(images) - set(masks), key=natural_key):
        names = [images[stem].name for stem in missing]
        problems.append(f"{len(missing)} image(s) without a mask in {folders['masks']}: {format_names(names)}")
    if orphans := sorted(set(masks) - set(images), key=natural_key):
        names = [masks[stem].name for stem in orphans]
        problems.append(f"{len(orphans)} mask(s) without an image in {folders['images']}: {format_names(names)}")
    if problems:
        hint = ""
        if suffix := _shared_mask_suffix(missing, orphans):
            example = next(stem for stem in orphans if stem.endswith(suffix))
            hint = (f" The masks are named after their images plus '{suffix}' ({masks[example].name} for "
                    f"{example[: -len(suffix)]}): rename them without it (images/X.png pairs with masks/X.png).")
        raise DataError("; ".join(problems) + ". Every slice needs an image and a mask with the same name stem." + hint)
    return [SlicePair(stem, images[stem], masks[stem]) for stem in sorted(images, key=natural_key)]


def _shared_mask_suffix(image_stems: list[str], mask_stems: list[str]) -> str | None:
    """The suffix (``_mask``) that turns most unpaired image stems into unpaired mask stems, if it pairs half of them."""
    unpaired = set(image_stems)
    counts: dict[str, int] = {}
    for stem in mask_stems:
        for cut in range(1, len(stem)):
            if stem[:cut] in unpaired:
                counts[stem[cut:]] = counts.get(stem[cut:], 0) + 1
    if not counts:
        return None
    suffix, paired = max(counts.items(), key=lambda item: item[1])
    return suffix if 2 * paired >= max(len(image_stems), len(mask_stems)) else None


def read_csv_rows(path: Path) -> dict[int, dict[str, str]]:
    """The rows of CSV file ``path`` with stripped cells, keyed by spreadsheet row number (header = row 1)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not a UTF-8 text file ({error.reason} at byte {error.start}). "
            "Save it as CSV (UTF-8) with the header index,label,fold[,pid]."
        ) from error
    if "\x00" in text:
        raise DataError(f"{path} is a binary file. Save it as CSV (UTF-8) with the header index,label,fold[,pid].")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: dict[int, dict[str, str]] = {}
    try:
        if reader.fieldnames is None or "index" not in reader.fieldnames:
            raise DataError(f"{path}: missing header with an 'index' column (expected index,label,fold[,pid]).")
        for row in reader:
            if None in row:
                raise DataError(f"{path}: row {reader.line_num} has more cells than the header; fix or remove it.")
            rows[reader.line_num] = {key: (value or "").strip() for key, value in row.items()}
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error} near row {reader.line_num}).") from error
    return rows


def natural_key(stem: str) -> tuple[int, int | str]:
    """Sort key for names: numeric ones numerically ('2' before '10'), others alphabetically after them.

    ``sorted(stems, key=natural_key)``; for files, ``key=lambda p: (natural_key(p.stem), p.name)``.
    """
    return (0, int(stem)) if stem.isdecimal() else (1, stem)


def read_metadata(root: str | Path, stems: list[str]) -> dict[str, dict[str, str]] | None:
    """Read ``root/metadata.csv`` (UTF-8, a BOM is fine) keyed by ``index``; ``None`` when the file is absent.

    Every row must name an existing slice, every slice must have exactly one row, and ``fold``/``pid``
    cells (when the column exists) must not be blank. Errors give row numbers as a spreadsheet shows them.
    """
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return None
    rows_by_number = read_csv_rows(path)
    numbers: dict[str, list[int]] = defaultdict(list)
    for number, row in rows_by_number.items():
        numbers[row["index"]].append(number)
    if duplicated := sorted((i for i, lines in numbers.items() if len(lines) > 1), key=natural_key):
        listed = [f"{i} (rows {', '.join(map(str, numbers[i]))})" for i in duplicated]
        raise DataError(
            f"{path}: {len(duplicated)} index value(s) on several rows: {format_names(listed)}. "
            "Keep one row per slice."
        )
    for column in ("fold", "pid"):
        blank = [str(number) for number, row in rows_by_number.items() if column in row and not row[column]]
        if blank:
            raise DataError(
                f"{path}: empty '{column}' cell(s) on row(s) {format_names(blank)}. "
                f"Fill them in (every slice needs a {column}) or remove the '{column}' column."
            )
    rows = {row["index"]: row for row in rows_by_number.values()}
    unknown = sorted(set(rows) - set(stems), key=natural_key)
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} row(s) name slices that have no image/mask files: "
            f"{format_names(unknown)}. Remove those rows or add the files."
        )
    unlisted = sorted(set(stems) - set(rows), key=natural_key)
    if unlisted:
        raise DataError(
            f"{path}: {len(unlisted)} slice(s) have no metadata row: {format_names(unlisted)}. "
            "Add rows for them or remove the files."
        )
    return rows
