"""The ``figshare_mat`` layout: the original Figshare release read as it is, no conversion.

Jun Cheng's "brain tumor dataset" (figshare 1512427, CC BY 4.0) has one MATLAB file per slice,
``1.mat ... 3064.mat`` (in the root or its direct subfolders, as the four zips unpack), each a struct
``cjdata`` with ``image`` (int16), ``tumorMask`` (0/1), ``label`` (1 meningioma, 2 glioma,
3 pituitary) and ``PID``; ``cvind.mat`` in the root, when present, gives the author's patient-wise
folds. Files are MATLAB v7.3 (HDF5, arrays stored transposed) or v5; the reading code is
:mod:`bts_lightning.data.figshare_metadata`'s. Slice ids are the slice numbers, as in the Kaggle copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bts_lightning.data.discovery import SlicePair
from bts_lightning.data.figshare_metadata import (
    CVIND_FILE,
    find_slice_files,
    folds_from_cvind,
    is_hdf5,
    load_v5,
    open_hdf5,
    read_slice,
)
from bts_lightning.data.io import UnreadableImageError, check_finite
from bts_lightning.errors import DataError, format_names

MAT_SUFFIX = ".mat"
ARRAYS = ("image", "tumorMask")


def find_mat_slices(root: Path) -> list[SlicePair]:
    """One record per ``<index>.mat`` under ``root``, sorted by index, with label, patient id and (cvind) fold.

    Raises :class:`DataError` naming every slice file whose label or patient id cannot be read.
    """
    files = find_slice_files(root)
    slices: dict[int, tuple[int, str]] = {}
    problems: list[str] = []
    for index, path in files.items():
        try:
            slices[index] = read_slice(path)
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError(
            f"{len(problems)} unreadable Figshare slice file(s): {format_names(problems, limit=5)}. "
            "Replace them with the release's files or remove them."
        )
    cvind = root / CVIND_FILE
    folds = folds_from_cvind(cvind, slices) if cvind.is_file() else {}
    return [
        SlicePair(str(index), path, path, pid=slices[index][1], label=str(slices[index][0]),
                  fold=str(folds[index]) if folds else None)
        for index, path in files.items()
    ]


def _hdf5_arrays(path: Path) -> list[np.ndarray]:
    with open_hdf5(path) as (h5py, handle):
        group = handle.get("cjdata")
        datasets = [group.get(key) if isinstance(group, h5py.Group) else None for key in ARRAYS]
        missing = [key for key, dataset in zip(ARRAYS, datasets) if not isinstance(dataset, h5py.Dataset)]
        if missing:
            raise UnreadableImageError(f"{path}: no {', '.join(f'cjdata/{key}' for key in missing)}")
        return [np.asarray(dataset[()]).T for dataset in datasets]  # MATLAB is column-major: HDF5 holds the transpose


def _v5_arrays(path: Path) -> list[np.ndarray]:
    cjdata = load_v5(path, "cjdata")
    missing = [key for key in ARRAYS if not hasattr(cjdata, key)]
    if missing:
        raise UnreadableImageError(f"{path}: no {', '.join(f'cjdata.{key}' for key in missing)}")
    return [np.asarray(getattr(cjdata, key)) for key in ARRAYS]


def read_mat_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(cjdata.image, cjdata.tumorMask)`` of one slice file as stored (2-D, row-major, original dtypes).

    Raises :class:`UnreadableImageError` (naming ``path``) when the file or either array cannot be read.
    """
    path = Path(path)
    try:
        image, mask = _hdf5_arrays(path) if is_hdf5(path) else _v5_arrays(path)
    except (DataError, OSError) as error:
        raise UnreadableImageError(f"{path}: {str(error).removeprefix(f'{path}: ')}") from error
    for key, array in zip(ARRAYS, (image, mask)):
        if array.ndim != 2 or array.dtype.kind not in "biuf":
            raise UnreadableImageError(f"{path}: cjdata.{key} is {array.dtype} of shape {array.shape}, not a 2-D image")
        check_finite(array, path)
    return image, mask
