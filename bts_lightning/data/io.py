"""Read slices and masks from disk as 8-bit grayscale arrays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class UnreadableImageError(ValueError):
    """A file could not be decoded as an image."""


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode any common format (8/16-bit, float, gray/RGB/RGBA) into a 2-D uint8 array.

    Non-8-bit images are min-max scaled to 0-255.
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
        low, high = float(image.min()), float(image.max())
        image = ((image - low) * (255.0 / (high - low)) if high > low else image * 0).astype(np.uint8)
    return image


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Tumor = above half the mask's maximum; returns uint8 {0, 1}."""
    peak = int(mask.max())
    return (mask > peak / 2).astype(np.uint8) if peak > 0 else np.zeros_like(mask, dtype=np.uint8)


def resize(image: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """Resize to ``size`` x ``size``: area/linear for images, nearest for masks."""
    if image.shape == (size, size):
        return image
    if is_mask:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)
