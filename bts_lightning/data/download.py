"""Locate the dataset root, fetching the Kaggle dataset with kagglehub when it is missing."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from bts_lightning.errors import DataError, first_line

log = logging.getLogger(__name__)

KAGGLE_DATASET = "nikhilroxtomar/brain-tumor-segmentation"


def find_layout(path: Path) -> Path | None:
    """The shallowest folder under ``path`` (itself included) holding ``images/`` and ``masks/``."""
    candidates = [path] + sorted(p.parent for p in path.rglob("images") if p.is_dir())
    for folder in sorted(candidates, key=lambda p: len(p.parts)):
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            return folder
    return None


def resolve_root(root: str | Path, download: bool) -> Path:
    """Return ``root`` if it exists, else a kagglehub copy of the Kaggle dataset, else fail clearly."""
    root = Path(root).expanduser()
    if root.exists():
        return root
    how_to_fix = (
        f"Dataset root {root} does not exist. Download the Kaggle dataset '{KAGGLE_DATASET}' and put its "
        f"images/ and masks/ folders in {root} (or point data.root=DIR / BTS_DATA_ROOT at them), "
        "or run on generated data with data=synthetic."
    )
    if not download or importlib.util.find_spec("kagglehub") is None:
        automatic = " (pip install 'bts_lightning[kaggle]' to download it automatically.)"
        raise DataError(how_to_fix + (automatic if download else ""))
    import kagglehub

    log.info("Dataset root %s is missing; fetching %s with kagglehub", root, KAGGLE_DATASET)
    try:
        downloaded = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:  # kagglehub raises many kinds of network/auth errors
        cause = first_line(error, 160)
        cut = "..." if len(cause) < len(first_line(error, 10**6)) else ""
        raise DataError(f"{how_to_fix} (kagglehub download failed, {type(error).__name__}: {cause}{cut})") from error
    layout = find_layout(downloaded)
    if layout is None:
        raise DataError(f"kagglehub downloaded {downloaded}, but no folder in it holds images/ and masks/. {how_to_fix}")
    return layout
