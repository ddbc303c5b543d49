"""Image | truth | prediction | overlay panels, shared by TensorBoard, evaluate, predict and report."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bts_lightning.runtime import write_bytes_atomic

TRUTH_COLOR = (0, 255, 0)  # RGB green
PREDICTION_COLOR = (255, 0, 0)  # RGB red


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale any 2-D array to uint8."""
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return ((image - low) * (255.0 / (high - low)) if high > low else image * 0).astype(np.uint8)


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """RGB slice with the predicted tumor tinted and outlined in red (truth outlined in green)."""
    rgb = cv2.cvtColor(to_uint8(image), cv2.COLOR_GRAY2RGB)
    predicted = prediction.astype(bool)
    tint = np.array(PREDICTION_COLOR, np.float32)
    rgb[predicted] = (0.65 * rgb[predicted] + 0.35 * tint).astype(np.uint8)
    for mask, color in ((truth, TRUTH_COLOR), (prediction, PREDICTION_COLOR)):
        if mask is not None:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, contours, -1, color, 1)
    return rgb


def panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """One RGB row: image | truth | prediction | overlay (truth green, prediction red)."""
    gray = to_uint8(image)
    tiles = [
        cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB),
        cv2.cvtColor((truth > 0).astype(np.uint8) * 255, cv2.COLOR_GRAY2RGB),
        cv2.cvtColor((prediction > 0).astype(np.uint8) * 255, cv2.COLOR_GRAY2RGB),
        overlay(gray, prediction > 0, truth > 0),
    ]
    separator = np.full((gray.shape[0], 2, 3), 128, np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [separator, tile]
    return np.concatenate(row, axis=1)


def captioned(row: np.ndarray, text: str) -> np.ndarray:
    """A panel row with a dark caption band above it."""
    height = max(14, row.shape[0] // 12)
    band = np.full((height, row.shape[1], 3), 32, np.uint8)
    cv2.putText(band, text, (3, height - max(3, height // 5)), cv2.FONT_HERSHEY_SIMPLEX, height / 32, (255, 255, 255),
                1, cv2.LINE_AA)
    return np.concatenate([band, row], axis=0)


def panel_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stack panels vertically with a thin separator."""
    separator = np.full((2, rows[0].shape[1], 3), 128, np.uint8)
    stacked = [rows[0]]
    for row in rows[1:]:
        stacked += [separator, row]
    return np.concatenate(stacked, axis=0)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an OpenCV image (gray or BGR, 8 or 16 bit) as PNG ``path``, all or nothing.

    Encoded in memory, then written with :func:`~bts_lightning.runtime.write_bytes_atomic`: a crash
    or a full disk never leaves a partial PNG; OS errors raise :class:`~bts_lightning.errors.OutputError`.
    """
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise ValueError(f"OpenCV could not encode a {image.dtype} array of shape {image.shape} as PNG for {path}")
    write_bytes_atomic(path, data.tobytes())
