"""The ``suffix`` layout: nested folders, each mask beside its image under a suffix (the LGG set's layout).

``ROOT/**/<name>.<ext>`` is a slice and ``<name><mask_suffix>.<ext>`` (any image extension) its mask,
in the same folder. The slice id is the image's path relative to the root, without extension (unique
across folders). The patient id comes from the name of the folder holding the slice: the first group
of ``patient_pattern`` (a regular expression matched at the start of that name; the whole match when it
has no group), or the whole name when the pattern is ``None``. Slices directly in the root have no
patient id. Hidden files and folders (``.name``) are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bts_lightning.data.discovery import IMAGE_SUFFIXES, SlicePair
from bts_lightning.errors import DataError, format_names

MASK_SUFFIX = "_mask"  # the default: X_mask.tif beside X.tif, as in the LGG set (data.mask_suffix)


def id_key(slice_id: str) -> list[str | int]:
    """Sort key putting numbered names in numeric order (``p/s_2`` before ``p/s_10``)."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", slice_id)]


def image_files(root: Path) -> list[Path]:
    """Image files anywhere under ``root`` (not hidden, nor in hidden folders), sorted. Linked folders are followed
    (e.g. patient folders linked into a new root), each real folder once, so a link loop ends."""
    found, seen = [], set()
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(folder) / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(path for path in found if path.is_file())


def _slice_files(root: Path, mask_suffix: str) -> tuple[dict[Path, Path], dict[Path, Path]]:
    """Images and masks keyed by their path without extension (masks: without the suffix, too)."""
    images: dict[Path, Path] = {}
    masks: dict[Path, Path] = {}
    duplicates: list[str] = []
    for path in image_files(root):
        is_mask = path.stem.endswith(mask_suffix) and len(path.stem) > len(mask_suffix)
        found = masks if is_mask else images
        key = path.parent / (path.stem[: -len(mask_suffix)] if is_mask else path.stem)
        if key in found:
            duplicates.append(f"{found[key].relative_to(root)} / {path.relative_to(root)}")
        found[key] = path
    if duplicates:
        raise DataError(
            f"{root}: several files share a name apart from their extension ({format_names(duplicates)}); "
            "keep one file per slice and per mask."
        )
    return images, masks


def _patient_id(folder: str, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return folder
    match = pattern.match(folder)
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group(0)) or None


def find_suffix_slices(root: Path, mask_suffix: str, patient_pattern: str | None) -> list[SlicePair]:
    """Pair every image under ``root`` with its ``mask_suffix`` mask; records sorted by slice id.

    Raises :class:`DataError` naming unpaired images or masks, folders whose name ``patient_pattern``
    does not match, and slices in the root when others are in patient folders.
    """
    images, masks = _slice_files(root, mask_suffix)
    if not images and not masks:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"No images ({suffixes}) found in {root} or its subfolders.")
    problems = []
    if missing := sorted(set(images) - set(masks)):
        names = [str(images[key].relative_to(root)) for key in missing]
        problems.append(f"{len(missing)} image(s) without a {mask_suffix} mask beside them: {format_names(names)}")
    if orphans := sorted(set(masks) - set(images)):
        names = [str(masks[key].relative_to(root)) for key in orphans]
        problems.append(f"{len(orphans)} mask(s) without an image beside them: {format_names(names)}")
    if problems and (root / "images").is_dir() and (root / "masks").is_dir():  # its masks/ files count as images
        raise DataError(f"{root}: its images/ and masks/ folders are the kaggle layout, not the suffix layout (masks "
                        f"named X{mask_suffix}.tif beside their slice X.tif): set data.layout=kaggle (or auto).")
    if problems:
        raise DataError(
            f"{root}: " + "; ".join(problems) + f". Every slice X.tif needs its mask X{mask_suffix}.tif in the same "
            "folder (data.mask_suffix sets the suffix)."
        )
    ids = {key: key.relative_to(root).as_posix() for key in images}
    keys = sorted(images, key=lambda key: id_key(ids[key]))
    in_root = [ids[key] for key in keys if key.parent == root]
    if in_root and len(in_root) < len(keys):
        raise DataError(
            f"{root}: {len(in_root)} slice(s) lie in the root itself ({format_names(in_root)}) while the others are in "
            "patient folders; move them into their patient's folder."
        )
    pattern = re.compile(patient_pattern) if patient_pattern is not None else None
    pids = {key: _patient_id(key.parent.name, pattern) for key in keys if key.parent != root}
    if unmatched := sorted({key.parent.name for key, pid in pids.items() if pid is None}):
        raise DataError(
            f"{root}: data.patient_pattern={patient_pattern!r} finds no patient id in {len(unmatched)} folder "
            f"name(s): {format_names(unmatched)}. Fix the pattern (its first group is the patient id) or the folders."
        )
    return [SlicePair(ids[key], images[key], masks[key], pid=pids.get(key)) for key in keys]
