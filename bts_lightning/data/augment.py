"""Augmentations that albumentations lacks: a smooth multiplicative bias field (MRI intensity inhomogeneity) and
tumor-free crops (negatives cut from tumor slices)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np


def monomial_count(degree: int) -> int:
    """Number of monomials x^i y^j with 1 <= i + j <= ``degree`` (the constant term is left out)."""
    return (degree + 1) * (degree + 2) // 2 - 1


def bias_field(shape: tuple[int, int], degree: int, coefficients: np.ndarray, peak: float) -> np.ndarray:
    """Gain field exp(P) of ``shape`` (float32), P = sum c_k x^i y^j over 1 <= i + j <= ``degree``.

    ``coefficients``: :func:`monomial_count` entries, ordered by total degree, then by the power of x.
    x and y run over pixel centres in [-1, 1]; P is rescaled so that max |P| = ``peak``, so the gain lies
    in [exp(-peak), exp(peak)] and reaches one of the two. A zero polynomial (or ``peak`` 0) gives gain 1.
    """
    height, width = shape
    y = ((np.arange(height, dtype=np.float32) + 0.5) * (2 / height) - 1)[:, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) * (2 / width) - 1)[None, :]
    if len(coefficients) != monomial_count(degree):
        raise ValueError(
            f"a degree-{degree} field takes {monomial_count(degree)} coefficients, not {len(coefficients)}"
        )
    powers = [(i, total - i) for total in range(1, degree + 1) for i in range(total + 1)]
    log_gain = np.zeros(shape, np.float32)
    for coefficient, (i, j) in zip(coefficients, powers):
        log_gain += np.float32(coefficient) * (x**i) * (y**j)
    largest = float(np.abs(log_gain).max())
    if largest > 0:
        log_gain *= np.float32(peak / largest)
    return np.exp(log_gain)


class RandomBiasField(A.ImageOnlyTransform):
    """Multiply the image by a smooth random gain field (:func:`bias_field`), like an MRI coil's inhomogeneity.

    Per call: coefficients uniform in [-1, 1] for every monomial of degree 1..``degree`` and a peak
    |log gain| uniform in ``strength``; the gain then lies in [exp(-peak), exp(peak)]. A global gain
    (the constant term) is left out: per-image standardization would undo it. The result keeps the
    image's dtype, rounded and clipped to [0, dtype max] for integers ([0, 1] for floats, albumentations'
    convention). Random draws come from the transform's own generators, so ``A.Compose(seed=...)``
    makes them reproducible. The mask is not touched.
    """

    def __init__(self, degree: int = 3, strength: Sequence[float] = (0.2, 0.6), p: float = 0.5) -> None:
        super().__init__(p=p)
        low, high = (float(value) for value in strength)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"RandomBiasField degree={degree!r} must be an integer >= 1")
        if not 0 <= low <= high:
            raise ValueError(f"RandomBiasField strength={tuple(strength)!r} must be (low, high) with 0 <= low <= high")
        self.degree = degree
        self.strength = (low, high)

    def get_params(self) -> dict[str, Any]:
        """``coefficients`` (one per monomial) and ``peak`` (max |log gain|) of this call's field."""
        return {
            "coefficients": self.random_generator.uniform(-1.0, 1.0, monomial_count(self.degree)),
            "peak": self.py_random.uniform(*self.strength),
        }

    def apply(self, img: np.ndarray, coefficients: np.ndarray, peak: float, **params: Any) -> np.ndarray:
        """``img`` (H, W) or (H, W, C) times the gain field, same dtype and shape."""
        gain = bias_field(img.shape[:2], self.degree, coefficients, peak)
        scaled = img.astype(np.float32) * (gain if img.ndim == 2 else gain[..., None])
        if np.issubdtype(img.dtype, np.integer):
            return np.clip(np.rint(scaled), 0, np.iinfo(img.dtype).max).astype(img.dtype)
        return np.clip(scaled, 0, 1).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("degree", "strength")


def tumor_free_corners(tumor: np.ndarray, side: int) -> np.ndarray:
    """(row, column) of every top-left corner whose ``side`` x ``side`` box holds no pixel of ``tumor`` (bool)."""
    height, width = tumor.shape
    if not tumor.any():
        rows, columns = np.mgrid[: height - side + 1, : width - side + 1]
        return np.stack([rows.ravel(), columns.ravel()], axis=1)
    table = cv2.integral(tumor.astype(np.uint8))  # (H+1, W+1) sums of the pixels above and left
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    return np.argwhere(sums == 0)


class TumorFreeCrop(A.DualTransform):
    """Replace the slice by a square crop that holds no tumor, resized back to the full size: a genuine negative.

    The crop's side is ``min_scale``..``max_scale`` of the shorter image side; it keeps ``margin`` pixels away
    from every tumor pixel (mask > 0). Up to ``attempts`` sides are drawn; for each, a corner is drawn among
    all tumor-free positions. When none exists (the tumor is too large) the sample is left unchanged. The
    image is resized linearly, the mask becomes all zeros. An empty mask allows any crop. Works on (H, W) and
    (H, W, C) images and needs the ``mask`` target. Draws come from the transform's own generators, so
    ``A.Compose(seed=...)`` makes them reproducible. Put it first in the list, so the usual augmentations
    also alter the negatives.
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 0.6, margin: int = 4, attempts: int = 5,
                 p: float = 0.5) -> None:
        super().__init__(p=p)
        low, high = float(min_scale), float(max_scale)
        if not 0 < low <= high < 1:
            raise ValueError(f"TumorFreeCrop min_scale={min_scale!r}, max_scale={max_scale!r} must satisfy "
                             "0 < min_scale <= max_scale < 1")
        for name, value, minimum in (("margin", margin, 0), ("attempts", attempts, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TumorFreeCrop {name}={value!r} must be an integer >= {minimum}")
        self.min_scale, self.max_scale = low, high
        self.margin, self.attempts = margin, attempts

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """``crop_coords`` (x_min, y_min, x_max, y_max) of a tumor-free box, or None when none was found."""
        if "mask" not in data:
            raise ValueError("TumorFreeCrop needs the mask target (call it with image= and mask=)")
        tumor = np.asarray(data["mask"]) > 0
        if tumor.ndim == 3:
            tumor = tumor.any(axis=-1)
        if self.margin and tumor.any():
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self.margin + 1,) * 2)
            tumor = cv2.dilate(tumor.astype(np.uint8), disk).astype(bool)
        shorter = min(tumor.shape)
        for _ in range(self.attempts):
            side = max(1, round(self.py_random.uniform(self.min_scale, self.max_scale) * shorter))
            corners = tumor_free_corners(tumor, side)
            if len(corners):
                row, column = (int(value) for value in corners[self.py_random.randrange(len(corners))])
                return {"crop_coords": (column, row, column + side, row + side)}
        return {"crop_coords": None}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int] | None, **params: Any) -> np.ndarray:
        """The crop of ``img`` resized (linearly) to ``img``'s size; ``img`` itself without a crop."""
        if crop_coords is None:
            return img
        x_min, y_min, x_max, y_max = crop_coords
        resized = cv2.resize(img[y_min:y_max, x_min:x_max], img.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        return resized.reshape(img.shape)  # cv2 drops a trailing channel axis of size 1

    def apply_to_mask(self, mask: np.ndarray, crop_coords: tuple[int, int, int, int] | None,
                      **params: Any) -> np.ndarray:
        """All zeros (the crop avoided every tumor pixel); ``mask`` itself without a crop."""
        if crop_coords is None:
            return mask
        x_min, y_min, x_max, y_max = crop_coords
        assert not mask[y_min:y_max, x_min:x_max].any(), "TumorFreeCrop chose a box with tumor in it"
        return np.zeros_like(mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale", "max_scale", "margin", "attempts")
