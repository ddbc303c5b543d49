"""All drawing: 8-bit scaling and PNG files (data, predict), image | truth | prediction | overlay panels
(TensorBoard, evaluate, predict) and score bar charts (report)."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bts_lightning.runtime import write_bytes_atomic

TRUTH_COLOR = (0, 255, 0)  # RGB green
PREDICTION_COLOR = (255, 0, 0)  # RGB red
LABEL_WIDTH = 40  # characters per line of a bar chart's row label


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale any array to uint8, rounding to the nearest level (a constant array becomes 0)."""
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


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
    """One RGB row: image | truth | prediction | overlay (truth green, prediction red).

    ``image`` is a 2-D slice or a (C, H, W) stack of channels, of which the first is drawn.
    """
    gray = to_uint8(image if image.ndim == 2 else image[0])
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


_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Smallest font scale a caption shrinks to (about 7 px capitals); past it a line loses its start instead.
MIN_CAPTION_SCALE = 0.3


def fitted_caption(text: str, width: int, scale: float) -> tuple[str, float]:
    """``(text, scale)`` that fit ``width`` pixels: the scale shrunk (down to :data:`MIN_CAPTION_SCALE`), then the
    start of the text replaced by ``...``, keeping its end (a slice id ends with the slice's number)."""
    wide = cv2.getTextSize(text, _FONT, scale, 1)[0][0]
    if wide > width:
        scale = max(MIN_CAPTION_SCALE, scale * width / wide)
    while len(text) > 4 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = "..." + text[4:]
    return text, scale


def captioned(row: np.ndarray, *lines: str) -> np.ndarray:
    """A panel row with a dark caption band above it, one line of text each, fitted to the row's width
    (:func:`fitted_caption`)."""
    height = max(14, row.shape[0] // 12)
    bands = []
    for line in lines:
        band = np.full((height, row.shape[1], 3), 32, np.uint8)
        text, scale = fitted_caption(line, row.shape[1] - 6, height / 32)
        cv2.putText(band, text, (3, height - max(3, height // 5)), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
        bands.append(band)
    return np.concatenate([*bands, row], axis=0)


def panel_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stack panels vertically with a thin separator."""
    separator = np.full((2, rows[0].shape[1], 3), 128, np.uint8)
    stacked = [rows[0]]
    for row in rows[1:]:
        stacked += [separator, row]
    return np.concatenate(stacked, axis=0)


def encode_png(image: np.ndarray) -> bytes:
    """An OpenCV image (gray or BGR, 8 or 16 bit) as PNG bytes; ValueError when OpenCV cannot encode it."""
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise ValueError(f"OpenCV could not encode a {image.dtype} array of shape {image.shape} as PNG")
    return data.tobytes()


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an OpenCV image (gray or BGR, 8 or 16 bit) as PNG ``path``, all or nothing.

    Encoded in memory (:func:`encode_png`), then written with :func:`~bts_lightning.runtime.write_bytes_atomic`:
    a crash or a full disk never leaves a partial PNG; OS errors raise :class:`~bts_lightning.errors.OutputError`.
    """
    try:
        data = encode_png(image)
    except ValueError as error:
        raise ValueError(f"{error} for {path}") from None
    write_bytes_atomic(path, data)


# ------------------------------------------------------------------------------------- charts


@dataclass(frozen=True)
class BarSeries:
    """One series of a :func:`score_bar_chart`: a value per row (NaN: no bar) and its spread (0: no error bar)."""

    name: str  # legend entry
    means: Sequence[float]
    stds: Sequence[float]
    color: str


def score_bar_chart(labels: Sequence[str], series: Sequence[BarSeries], title: str, xlabel: str) -> bytes:
    """PNG bytes of horizontal bars of scores in [0, 1]: one group per label (first on top), one bar per series.

    Each bar is annotated with its value (± its std); error bars are drawn where the std is non-zero.
    A legend names the series when there is more than one. Needs matplotlib (ImportError otherwise);
    drawn without pyplot, so the caller's matplotlib backend is left alone.
    """
    from matplotlib.figure import Figure

    count, groups = len(labels), len(series)
    height = 0.76 / groups if groups > 1 else 0.6
    # Long labels (a run's overrides) wrap at spaces; the constrained layout makes room for them and the legend.
    labels = [textwrap.fill(label, LABEL_WIDTH, break_long_words=False, break_on_hyphens=False) for label in labels]
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    row_inches = max(0.5 * (1 + 0.5 * (groups - 1)), 0.2 * lines)
    figure = Figure(figsize=(9, 1.5 + row_inches * count + (0.3 if groups > 1 else 0.0)), dpi=120,
                    layout="constrained")
    axes = figure.subplots()
    positions = list(range(count))
    drawn = []
    for number, one in enumerate(series):
        offset = (number - (groups - 1) / 2) * height
        bars = axes.barh([p + offset for p in positions], [0 if math.isnan(v) else v for v in one.means], height,
                         color=one.color, label=one.name)
        drawn.append((bars, one))
    for bars, one in drawn:  # error bars only where a row has a spread
        spread = [(bar, mean, std) for bar, mean, std in zip(bars, one.means, one.stds) if std and not math.isnan(mean)]
        if spread:
            axes.errorbar([mean for _, mean, _ in spread], [bar.get_y() + bar.get_height() / 2 for bar, _, _ in spread],
                          xerr=[std for _, _, std in spread], fmt="none", ecolor="#222222", capsize=3, elinewidth=1)
    for bars, one in drawn:
        for bar, mean, std in zip(bars, one.means, one.stds):
            if math.isnan(mean):
                continue
            text = f"{mean:.3f}" + (f" ± {std:.3f}" if std else "")
            axes.text(min(mean + std, 1.0) + 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.12)
    axes.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)
    axes.set_title(title)
    if groups > 1:
        figure.legend(loc="outside lower center", ncol=groups, fontsize=8, frameon=False)
    image = io.BytesIO()
    figure.savefig(image, format="png")
    return image.getvalue()
