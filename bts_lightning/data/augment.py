"""Augmentations that albumentations lacks: a smooth multiplicative bias field (MRI intensity inhomogeneity)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
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
