"""Build ``metadata.csv`` (``index,label,fold,pid``) from the original Figshare brain tumor release.

The release (Jun Cheng, "brain tumor dataset", figshare 1512427) has one MATLAB file per slice,
``<index>.mat`` (1.mat ... 3064.mat), each holding a struct ``cjdata`` with ``label`` (1 meningioma,
2 glioma, 3 pituitary), ``PID`` (patient id, a char array), ``image``, ``tumorBorder`` and
``tumorMask``, plus ``cvind.mat`` with the author's patient-wise 5-fold assignment (``cvind``, one
fold per slice in index order). Only ``cjdata/label`` and ``cjdata/PID`` are read for MATLAB v7.3
(HDF5) files, so no image is loaded; older v5 files are read with ``scipy.io.loadmat`` when SciPy is
installed. Slice files are looked for in ``mat_dir`` and in its direct subfolders (the release's
four zips unpack to ``brainTumorDataPublic_1-766/`` etc.).

Without ``cvind.mat`` folds are assigned per patient, round-robin over the sorted patient ids.
The result is checked against the published release (3064 slices, 233 patients, 708/1426/930
slices per label, 570/655/562/613/664 slices per fold) when all 3064 slices are present, and
against another metadata file (for example the Kaggle copy's) with ``check=CSV_OR_DIR``.

CLI (a Hydra app, ``conf/figshare_metadata.yaml``): ``python -m bts_lightning.data.figshare_metadata
mat_dir=DIR [out=metadata.csv] [cvind=PATH] [check=CSV_OR_DIR]`` (or ``bts-figshare-metadata ...``)
prints the file written.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from bts_lightning.data.discovery import read_csv_rows
from bts_lightning.errors import DataError, format_names
from bts_lightning.runtime import atomic_path, hydra_app, path_setting

logger = logging.getLogger(__name__)

USAGE = "python -m bts_lightning.data.figshare_metadata mat_dir=DIR [out=metadata.csv] [cvind=PATH] [check=CSV_OR_DIR]"
CVIND_FILE = "cvind.mat"
NUM_FOLDS = 5
LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}
HEADER = ("index", "label", "fold", "pid")

# The published release, for the consistency check when every slice is present.
RELEASE_SLICES = 3064
RELEASE_PATIENTS = 233
RELEASE_LABEL_COUNTS = {1: 708, 2: 1426, 3: 930}
RELEASE_FOLD_COUNTS = {1: 570, 2: 655, 3: 562, 4: 613, 5: 664}

SLICE_NAME = re.compile(r"^(\d+)\.mat$", re.IGNORECASE)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HDF5_OFFSETS = (0, 512, 1024, 2048)  # MATLAB v7.3 files put a 512-byte header (user block) first


@dataclass(frozen=True)
class SliceRecord:
    """One slice of the release: its number, tumor label, patient id and fold."""

    index: int
    label: int
    pid: str
    fold: int


def is_hdf5(path: Path) -> bool:
    """True if ``path`` carries the HDF5 signature where HDF5 allows it (offset 0 or a user block)."""
    with path.open("rb") as handle:
        for offset in _HDF5_OFFSETS:
            handle.seek(offset)
            if handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
    return False


@contextmanager
def open_hdf5(path: Path) -> Iterator[tuple[Any, Any]]:
    """``(h5py, open file)`` of a MATLAB v7.3 file; an OSError while reading it becomes a DataError naming it."""
    try:
        import h5py
    except ImportError as exc:
        raise DataError(f"{path}: reading MATLAB v7.3 (HDF5) files needs h5py: "
                        "pip install 'bts_lightning[figshare]'") from exc
    try:
        with h5py.File(path, "r") as handle:
            yield h5py, handle
    except OSError as exc:
        raise DataError(f"{path}: unreadable HDF5 (MATLAB v7.3) file: {exc}") from exc


def load_v5(path: Path, variable: str) -> object:
    """Variable ``variable`` of a MATLAB v4/v5/v7 file via SciPy (structs as attribute objects)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise DataError(
            f"{path}: not MATLAB v7.3 (HDF5); older .mat files need scipy.io.loadmat: pip install scipy"
        ) from exc
    try:
        data = loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=[variable])
    except Exception as exc:  # SciPy raises ValueError, TypeError, OSError ... for non-MAT input
        raise DataError(
            f"{path}: not a readable MATLAB .mat file (MATLAB v7.3/HDF5 or v5 expected): {exc}"
        ) from exc
    if variable not in data:
        raise DataError(f"{path}: no variable '{variable}' in this MATLAB file.")
    return data[variable]


def _label_value(path: Path, key: str, value: object) -> int:
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1 or flat.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key} must be one number (1, 2 or 3), got {flat.dtype} of shape {flat.shape}.")
    number = float(flat[0])
    if number not in LABELS:
        raise DataError(f"{path}: {key} is {number:g}; expected 1 (meningioma), 2 (glioma) or 3 (pituitary).")
    return int(number)


def _pid_text(path: Path, key: str, value: object, is_char: bool) -> str:
    """Decode a MATLAB patient id: char codes (uint16 in v7.3), a string, or a number."""
    if isinstance(value, str):
        text = value
    else:
        flat = np.asarray(value).reshape(-1)
        if flat.dtype.kind == "U":
            text = "".join(flat.tolist())
        elif flat.dtype.kind in "ui" and is_char:
            text = "".join(map(chr, flat.tolist()))
        elif flat.dtype.kind in "biuf" and flat.size == 1 and float(flat[0]).is_integer():
            text = str(int(flat[0]))  # a numeric id, stored as a number
        else:
            raise DataError(f"{path}: {key} is not a patient id string ({flat.dtype} of shape {flat.shape}).")
    text = text.replace("\x00", "").strip()
    if not text:
        raise DataError(f"{path}: {key} is empty; every slice needs a patient id.")
    return text


def _read_hdf5_slice(path: Path) -> tuple[int, str]:
    with open_hdf5(path) as (h5py, handle):
        group = handle.get("cjdata")
        if not isinstance(group, h5py.Group):
            raise DataError(f"{path}: no 'cjdata' struct (expected cjdata/label and cjdata/PID).")
        values = {}
        for key in ("label", "PID"):
            dataset = group.get(key)
            if not isinstance(dataset, h5py.Dataset):
                raise DataError(f"{path}: missing key cjdata/{key}.")
            attrs = dataset.attrs
            if attrs.get("MATLAB_empty"):
                values[key] = (np.zeros(0, dtype=np.uint16), True)
            else:
                matlab_class = attrs.get("MATLAB_class", b"")
                if isinstance(matlab_class, bytes):
                    matlab_class = matlab_class.decode("ascii", "replace")
                is_char = matlab_class == "char" or dataset.dtype == np.uint16
                values[key] = (dataset[()], is_char)
    label = _label_value(path, "cjdata/label", values["label"][0])
    pid = _pid_text(path, "cjdata/PID", *values["PID"])
    return label, pid


def _read_v5_slice(path: Path) -> tuple[int, str]:
    cjdata = load_v5(path, "cjdata")
    values = {}
    for key in ("label", "PID"):
        if not hasattr(cjdata, key):
            kind = "struct" if hasattr(cjdata, "_fieldnames") else type(cjdata).__name__
            raise DataError(f"{path}: missing key cjdata.{key} (cjdata is a {kind}).")
        values[key] = getattr(cjdata, key)
    label = _label_value(path, "cjdata.label", values["label"])
    pid = _pid_text(path, "cjdata.PID", values["PID"], is_char=True)
    return label, pid


def read_slice(path: str | Path) -> tuple[int, str]:
    """``(label, patient id)`` of one slice file; reads only ``cjdata.label`` and ``cjdata.PID`` of v7.3 files."""
    path = Path(path)
    if is_hdf5(path):
        return _read_hdf5_slice(path)
    return _read_v5_slice(path)


def read_cvind(path: str | Path) -> list[int]:
    """The fold (1-based) of every slice, in index order, from ``cvind.mat`` (v7.3 or v5)."""
    path = Path(path)
    if is_hdf5(path):
        with open_hdf5(path) as (h5py, handle):
            dataset = handle.get("cvind")
            if not isinstance(dataset, h5py.Dataset):
                raise DataError(f"{path}: missing key 'cvind' (expected a 1 x N array of fold numbers).")
            values = np.asarray(dataset[()])
    else:
        values = np.asarray(load_v5(path, "cvind"))
    if values.ndim > 2 or (values.ndim == 2 and min(values.shape) != 1) or values.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'cvind' must be a 1 x N vector of fold numbers, got {values.dtype} {values.shape}.")
    folds = values.reshape(-1).astype(float)
    bad = ~np.isfinite(folds) | (folds < 1) | (folds != np.round(folds))
    if folds.size == 0 or bad.any():
        where = ", ".join(f"slice {i + 1}: {folds[i]:g}" for i in np.flatnonzero(bad)[:5])
        raise DataError(f"{path}: 'cvind' must hold positive whole fold numbers ({where or 'it is empty'}).")
    return [int(f) for f in folds]


def find_slice_files(mat_dir: str | Path) -> dict[int, Path]:
    """``<index>.mat`` files in ``mat_dir`` and its direct subfolders, keyed by index."""
    mat_dir = Path(mat_dir)
    if not mat_dir.is_dir():
        raise DataError(
            f"mat_dir={mat_dir} does not exist or is not a folder; point it at the unpacked Figshare release "
            "(1.mat ... 3064.mat)."
        )
    found: dict[int, list[Path]] = defaultdict(list)
    for path in sorted(mat_dir.glob("*")) + sorted(mat_dir.glob("*/*")):
        match = SLICE_NAME.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))].append(path)
    if not found:
        raise DataError(f"{mat_dir}: no <index>.mat slice files (1.mat, 2.mat, ...) here or in its subfolders.")
    if 0 in found:  # cvind.mat's entry i is slice i.mat's fold, from 1
        raise DataError(f"{found[0][0]}: the release numbers its slices from 1 (1.mat ... 3064.mat); rename or remove "
                        "this file.")
    duplicates = [" / ".join(str(p.relative_to(mat_dir)) for p in paths) for paths in found.values() if len(paths) > 1]
    if duplicates:
        raise DataError(f"{mat_dir}: several files have the same slice number: {format_names(duplicates)}.")
    return {index: paths[0] for index, paths in sorted(found.items())}


def folds_from_cvind(cvind_path: Path, slices: dict[int, tuple[int, str]]) -> dict[int, int]:
    """The author's fold of every slice (``{index: (label, pid)}``) from ``cvind_path``.

    Raises :class:`DataError` when it has fewer entries than the slices need, or splits a patient over folds; warns
    when it lists more slices than are present.
    """
    cvind = read_cvind(cvind_path)
    beyond = [index for index in slices if index > len(cvind)]
    if beyond:
        raise DataError(
            f"{cvind_path}: 'cvind' has {len(cvind)} entries but there are {len(slices)} slices, numbered up to "
            f"{max(slices)}; {len(beyond)} slice(s) have no fold ({format_names([f'{i}.mat' for i in beyond])}). "
            "Is this the cvind.mat of this release?"
        )
    if len(cvind) != len(slices):
        missing = [f"{i}.mat" for i in range(1, len(cvind) + 1) if i not in slices]
        logger.warning(
            "%s lists %d slices but only %d slice files were found; missing %s. Writing rows for the files present.",
            cvind_path,
            len(cvind),
            len(slices),
            format_names(missing),
        )
    folds = {index: cvind[index - 1] for index in slices}
    by_patient: dict[str, set[int]] = defaultdict(set)
    for index, (_, pid) in slices.items():
        by_patient[pid].add(folds[index])
    split = sorted(pid for pid, patient_folds in by_patient.items() if len(patient_folds) > 1)
    if split:
        examples = [f"{pid} (folds {', '.join(map(str, sorted(by_patient[pid])))})" for pid in split]
        raise DataError(
            f"{cvind_path} puts {len(split)} patient(s) in more than one fold ({format_names(examples, limit=5)}), so "
            "a fold split would score slices of patients it trained on. Move it away: folds are then made per "
            "patient from cjdata.PID (data.num_folds in training; round-robin in bts-figshare-metadata)."
        )
    return folds


def _folds_by_patient(slices: dict[int, tuple[int, str]], num_folds: int = NUM_FOLDS) -> dict[int, int]:
    """Folds 1..num_folds per patient, round-robin over the sorted patient ids."""
    patients = sorted({pid for _, pid in slices.values()})
    fold_of = {pid: rank % num_folds + 1 for rank, pid in enumerate(patients)}
    return {index: fold_of[pid] for index, (_, pid) in slices.items()}


def _check_records(records: list[SliceRecord], folds_from_cvind: bool) -> None:
    """Warn about departures from the real release: mixed-label patients, counts of the full set."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    for record in records:
        labels_of[record.pid].add(record.label)
    mixed = sorted(pid for pid, labels in labels_of.items() if len(labels) > 1)
    if mixed:
        logger.warning(
            "%d patient(s) have slices with different tumor labels: %s (the release has one tumor type per patient).",
            len(mixed),
            format_names(mixed, limit=5),
        )
    if [r.index for r in records] != list(range(1, RELEASE_SLICES + 1)):
        return
    observed = {
        "patients": (len(labels_of), RELEASE_PATIENTS),
        "slices per label": (dict(sorted(Counter(r.label for r in records).items())), RELEASE_LABEL_COUNTS),
    }
    if folds_from_cvind:
        observed["slices per fold"] = (dict(sorted(Counter(r.fold for r in records).items())), RELEASE_FOLD_COUNTS)
    differences = [f"{name} {got} (published: {want})" for name, (got, want) in observed.items() if got != want]
    if differences:
        logger.warning("These %d slices differ from the published release: %s.", RELEASE_SLICES, "; ".join(differences))
    else:
        logger.info("Counts match the published release (%s).", ", ".join(observed))


def collect_records(mat_dir: str | Path, cvind: str | Path | None = None) -> list[SliceRecord]:
    """Read every slice's label and patient id and attach its fold; sorted by index.

    ``cvind`` defaults to ``mat_dir/cvind.mat``; an explicit path must exist. Without a cvind file
    folds are assigned per patient (round-robin over the sorted patient ids) and a warning is logged.
    """
    mat_dir = Path(mat_dir)
    files = find_slice_files(mat_dir)
    slices = {index: read_slice(path) for index, path in files.items()}
    cvind_path = Path(cvind) if cvind is not None else mat_dir / CVIND_FILE
    if cvind_path.is_file():
        folds = folds_from_cvind(cvind_path, slices)
    elif cvind is not None:
        raise DataError(f"cvind={cvind}: no such file (the release's cvind.mat with the 5-fold assignment).")
    else:
        folds = _folds_by_patient(slices)
        logger.warning(
            "No %s in %s: assigning %d folds per patient (round-robin over the sorted patient ids), not the "
            "author's cross-validation folds. Pass cvind=PATH to use the release's cvind.mat.",
            CVIND_FILE,
            mat_dir,
            NUM_FOLDS,
        )
    records = [SliceRecord(index, label, pid, folds[index]) for index, (label, pid) in slices.items()]
    _check_records(records, folds_from_cvind=cvind_path.is_file())
    return records


def compare_with(records: list[SliceRecord], other: str | Path) -> int:
    """Check ``records`` against another metadata file (or ``DIR/metadata.csv``); return the slices compared.

    Label, and fold and pid where both have them, must agree for every index the two share.
    """
    path = Path(other)
    if path.is_dir():
        path = path / "metadata.csv"
    if not path.is_file():
        raise DataError(f"check={other}: there is no metadata file {path}.")
    rows = list(read_csv_rows(path).values())  # as training reads metadata.csv: a BOM is fine, binary files named
    theirs = {row["index"]: row for row in rows}
    columns = [c for c in ("label", "fold", "pid") if rows and c in rows[0]]
    shared = [r for r in records if str(r.index) in theirs]
    if not shared:
        raise DataError(f"{path}: no index in common with the .mat files; nothing to compare.")
    mismatches = []
    for record in shared:
        row = theirs[str(record.index)]
        for column in columns:
            mine = str(getattr(record, column))
            if row[column] != mine:
                mismatches.append(f"index {record.index}: {column} {mine} here, {row[column]!r} there")
    if mismatches:
        shown = "; ".join(mismatches[:5]) + (f"; ... ({len(mismatches) - 5} more)" if len(mismatches) > 5 else "")
        raise DataError(f"{path} disagrees with the .mat files on {len(mismatches)} value(s): {shown}.")
    logger.info("%d slice(s) agree with %s (%s).", len(shared), path, ", ".join(columns) or "index only")
    return len(shared)


def write_metadata(records: list[SliceRecord], out: str | Path) -> Path:
    """Write ``index,label,fold,pid`` rows to ``out`` all or nothing (:func:`~bts_lightning.runtime.atomic_path`)."""
    out = Path(out)
    with atomic_path(out) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows((r.index, r.label, r.fold, r.pid) for r in records)
    return out


def build_metadata(
    mat_dir: str | Path,
    out: str | Path = "metadata.csv",
    cvind: str | Path | None = None,
    check: str | Path | None = None,
) -> Path:
    """Read the release in ``mat_dir``, optionally check it against ``check``, and write ``out``."""
    records = collect_records(mat_dir, cvind)
    if check is not None:
        compare_with(records, check)
    path = write_metadata(records, out)
    labels = Counter(r.label for r in records)
    logger.info(
        "Wrote %s: %d slices of %d patients; labels %s; folds %s.",
        path,
        len(records),
        len({r.pid for r in records}),
        ", ".join(f"{LABELS[k]} {labels[k]}" for k in sorted(labels)),
        ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r.fold for r in records).items())),
    )
    return path


def figshare_metadata_app(cfg: DictConfig) -> Path:
    """The ``bts-figshare-metadata`` app (``conf/figshare_metadata.yaml``): build ``cfg.out`` from the
    release in ``cfg.mat_dir``, print its path and return it."""
    mat_dir, out = (path_setting(cfg, key, required=USAGE) for key in ("mat_dir", "out"))
    cvind, check = (path_setting(cfg, key) for key in ("cvind", "check"))
    try:
        path = build_metadata(mat_dir, out, cvind, check)
    except OSError as error:  # reading the release (writing goes through atomic_path: OutputError)
        raise DataError(f"Could not read the release in {mat_dir}: {error}") from error
    print(path)
    return path


main = hydra_app("figshare_metadata", figshare_metadata_app)

if __name__ == "__main__":
    main()
