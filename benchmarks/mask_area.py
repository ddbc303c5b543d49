"""Tumor pixels of a Kaggle-layout dataset's masks resized as training resizes them, against their exact area.

    python -m benchmarks.mask_area ../shared/data/brain-tumor 128

A mask is shrunk by area interpolation and thresholded (``bts_lightning.data.io.resize``): a pixel is tumor when at
least half of its area is. This counts those pixels, the pixels more than half tumor, and the exact tumor area (the
sum of each pixel's tumor fraction), over every mask in ``ROOT/masks``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from bts_lightning.data.io import binarize_mask, mask_threshold, read_mask, resize


def mask_areas(root: Path, size: int) -> dict[str, float]:
    """``{"project": px, "more_than_half": px, "exact": px}`` summed over the masks of ``root/masks`` at ``size``."""
    masks = [read_mask(path) for path in sorted((root / "masks").iterdir()) if path.is_file()]
    threshold = mask_threshold(max(int(mask.max()) for mask in masks))
    totals = {"project": 0.0, "more_than_half": 0.0, "exact": 0.0}
    for mask in masks:
        fraction = cv2.resize((mask > threshold).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        totals["project"] += int(binarize_mask(resize(mask, size, is_mask=True), threshold).sum())
        totals["more_than_half"] += int((fraction > 0.5).sum())
        totals["exact"] += float(fraction.sum())
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="dataset folder with masks/")
    parser.add_argument("size", type=int, help="training image size (data.image_size)")
    args = parser.parse_args()
    totals = mask_areas(args.root, args.size)
    exact = totals["exact"]
    print(f"size {args.size}: project {totals['project']:.0f} px ({100 * (totals['project'] / exact - 1):+.1f} %), "
          f"more than half {totals['more_than_half']:.0f} px ({100 * (totals['more_than_half'] / exact - 1):+.1f} %), "
          f"exact area {exact:.0f} px")


if __name__ == "__main__":
    main()
