"""Per-image tumor-class metrics, one definition for training, ``evaluate`` and the benchmark.

Training logs :class:`MeanPerImageOverlap` (``val/dice``, ``test/dice``, ...) and :class:`SliceDetection`
(``val/dice_tumor``, ``val/sensitivity``, ``val/false_alarm_rate``); ``evaluate`` scores each slice with
:func:`image_metrics`. Both take Dice and IoU from :func:`per_image_overlap` (MONAI
maths), so a checkpoint's ``test/dice`` equals the mean Dice ``evaluate`` reports on the same masks.
The per-image rows become summaries here too: :func:`summarize` (every slice), :func:`count_cases`
and :func:`summarize_by_truth` (tumor slices and empty slices apart); on data in one folder per scan,
:func:`empty_slices_by_distance` (false alarms by how far the scan's nearest tumor slice is).

Metrics are per image, for the tumor class, on binary masks; HD95 (MONAI
``compute_hausdorff_distance``, percentile 95, symmetric, between mask edges) and areas are in pixels.

Empty-case policy (no image is ever dropped from a mean; nothing is NaN):

- truth and prediction both empty (correctly tumor-free): Dice = IoU = precision = recall = 1, HD95 = 0;
- truth non-empty, prediction empty (missed tumor): Dice = IoU = precision = recall = 0, HD95 = image diagonal;
- truth empty, prediction non-empty (false alarm): Dice = IoU = precision = recall = 0, HD95 = image diagonal.

So an undefined ratio (0/0) is 1 only on an image that is entirely right and 0 on an image that is
wrong: a missed tumor or a false alarm is never rewarded by the metric that cannot see its error.
The diagonal, ``sqrt(H**2 + W**2)``, is larger than any distance inside the image, so a miss always
scores worse than any detection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from torchmetrics import Metric, MetricCollection

_SCORES = {"dice": compute_dice, "iou": compute_iou}
# Names under which the module logs its validation metrics (``overlap_metrics("val/")``).
VAL_DICE, VAL_IOU = "val/dice", "val/iou"
# Scores of :class:`SliceDetection`, logged as ``val/<name>`` and ``test/<name>`` when measurable.
SLICE_SCORES = ("dice_tumor", "sensitivity", "false_alarm_rate")
# Columns of :func:`image_metrics`: the scores, then the areas (pixels).
METRICS = ("dice", "iou", "precision", "recall", "hd95")
AREAS = ("area_true", "area_pred")

Row = Mapping[str, Any]  # one image's scores: image_metrics() output, possibly with more keys
ScanPosition = tuple[str, int]  # (scan folder, slice number), as bts_lightning.data.neighbours.slice_position gives
# Groups of empty slices by their distance (in slice numbers) to the nearest tumor slice of their scan: (name, lo, hi).
DISTANCE_GROUPS = (("1", 1, 1), ("2", 2, 2), ("3-5", 3, 5), ("6+", 6, math.inf))
NO_TUMOR_IN_SCAN = "no tumor slice in the scan"


def per_image_overlap(preds: torch.Tensor, target: torch.Tensor, kind: Literal["dice", "iou"]) -> torch.Tensor:
    """Tumor-class Dice or IoU of each image in a batch of binary (N, H, W) masks.

    An image whose truth and prediction are both empty scores 1; empty truth with a
    non-empty prediction scores 0 (MONAI's ``ignore_empty=False``), as the module's policy says.
    """
    one_hot = [F.one_hot(mask.long(), 2).permute(0, 3, 1, 2) for mask in (preds, target)]
    return _SCORES[kind](*one_hot, include_background=False, ignore_empty=False)[:, 0]


class MeanPerImageOverlap(Metric):
    """Mean over images of :func:`per_image_overlap`; states live on the device, summed across ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: Literal["dice", "iou"]) -> None:
        super().__init__()
        if kind not in _SCORES:
            raise ValueError(f"kind must be one of {sorted(_SCORES)}, got {kind!r}")
        self.kind = kind
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        scores = per_image_overlap(preds, target, self.kind)
        self.total += scores.sum(dtype=torch.float64)
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class SliceDetection(Metric):
    """Tumor slices and empty slices scored apart, as :func:`summarize_by_truth` scores ``evaluate``'s rows.

    ``update(preds, target)`` takes binary (N, H, W) masks; a slice is a tumor slice when its truth has a
    tumor pixel, detected (or, when empty, a false alarm) when its prediction has one. ``compute()`` returns
    0-d tensors: the counts ``tumor_slices`` and ``empty_slices``; ``dice_tumor`` (mean
    :func:`per_image_overlap` Dice over tumor slices) and ``sensitivity`` (detected / tumor slices) only when
    there is a tumor slice; ``false_alarm_rate`` (false alarms / empty slices) only when there is an empty
    slice. States live on the device, summed across ranks.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("tumor_slices", "detected", "empty_slices", "false_alarms"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("dice_tumor_total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        has_tumor = (target > 0).flatten(1).any(dim=1)
        predicted = (preds > 0).flatten(1).any(dim=1)
        dice = per_image_overlap(preds, target, "dice")
        self.tumor_slices += has_tumor.sum()
        self.detected += (has_tumor & predicted).sum()
        self.dice_tumor_total += dice[has_tumor].sum(dtype=torch.float64)
        self.empty_slices += (~has_tumor).sum()
        self.false_alarms += (~has_tumor & predicted).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        values = {"tumor_slices": self.tumor_slices, "empty_slices": self.empty_slices}
        if self.tumor_slices > 0:
            values["dice_tumor"] = (self.dice_tumor_total / self.tumor_slices).float()
            values["sensitivity"] = self.detected.float() / self.tumor_slices
        if self.empty_slices > 0:
            values["false_alarm_rate"] = self.false_alarms.float() / self.empty_slices
        return values


def overlap_metrics(prefix: str) -> MetricCollection:
    """``{prefix}dice`` and ``{prefix}iou``, e.g. ``val/dice``.

    ``compute_groups=False``: torchmetrics would otherwise merge the two metrics whenever their
    states agree after the first update (a first batch scoring only 0s and 1s), and report Dice
    as IoU for the rest of the epoch.
    """
    metrics = {"dice": MeanPerImageOverlap("dice"), "iou": MeanPerImageOverlap("iou")}
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def hausdorff95(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance (pixels) between two non-empty binary masks."""
    one_hot = [F.one_hot(torch.as_tensor(m.astype(np.int64))[None], 2).permute(0, 3, 1, 2) for m in (prediction, truth)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.5+ deprecation inside its own helper
        distance = compute_hausdorff_distance(*one_hot, include_background=False, percentile=95)
    return float(distance[0, 0])


def image_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Tumor-class Dice, IoU, precision, recall, HD95 and areas of one binary (H, W) prediction.

    Dice and IoU come from :func:`per_image_overlap` (the training metric's function); empty cases
    follow the module's policy: both empty -> ratios 1, HD95 0; exactly one empty -> ratios 0,
    HD95 = image diagonal.
    """
    predicted, true = np.asarray(prediction) > 0, np.asarray(truth) > 0
    if predicted.shape != true.shape or predicted.ndim != 2:
        raise ValueError(f"prediction {predicted.shape} and truth {true.shape} must be the same 2-D shape")
    area_pred, area_true = int(predicted.sum()), int(true.sum())
    preds, target = torch.from_numpy(predicted)[None], torch.from_numpy(true)[None]
    scores: dict[str, float] = {kind: float(per_image_overlap(preds, target, kind)[0]) for kind in _SCORES}
    if area_pred == 0 and area_true == 0:
        scores.update(precision=1.0, recall=1.0, hd95=0.0)
    elif area_pred == 0 or area_true == 0:
        scores.update(precision=0.0, recall=0.0, hd95=math.hypot(*true.shape))
    else:
        overlap = int(np.logical_and(predicted, true).sum())
        scores.update(precision=overlap / area_pred, recall=overlap / area_true, hd95=hausdorff95(predicted, true))
    return {**scores, "area_true": area_true, "area_pred": area_pred}


# ------------------------------------------------------------------------------------ summaries of per-image rows


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean, population standard deviation and median of a non-empty sequence."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "median": float(np.median(array))}


def summarize(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """:func:`describe` of every metric and area column over ``rows`` (every image, empty ones included)."""
    return {column: describe([row[column] for row in rows]) for column in (*METRICS, *AREAS)}


def count_cases(rows: Sequence[Row]) -> dict[str, int]:
    """How many images fall in each case of the empty-case policy (see the module docstring)."""
    present = [row for row in rows if row["area_true"] > 0]
    absent = [row for row in rows if row["area_true"] == 0]
    return {
        "tumor_present": len(present),
        "tumor_absent": len(absent),
        "missed_tumor": sum(row["area_pred"] == 0 for row in present),
        "false_alarm": sum(row["area_pred"] > 0 for row in absent),
        "both_empty": sum(row["area_pred"] == 0 for row in absent),
    }


def summarize_by_truth(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Tumor slices and empty slices scored apart, beside the all-slice means of :func:`summarize`.

    On data where most slices have no tumor (LGG: about two thirds), the all-slice mean Dice is mostly
    the share of empty slices left empty; these say how tumors are outlined and how often empty slices
    get a false alarm:

    - ``tumor_slices`` (truth has a tumor pixel): ``n``; ``dice`` and ``iou`` (:func:`describe`);
      ``detected``, those with any predicted tumor pixel, and ``sensitivity`` = detected / n (slice level);
    - ``empty_slices`` (empty truth): ``n``; ``false_alarms``, those with any predicted tumor pixel
      (after threshold and post-processing: the masks scored), and ``false_alarm_rate`` = false_alarms / n.

    A group without slices has ``None`` for its scores and rates, and a ``note`` saying so (else ``None``).
    """
    cases = count_cases(rows)
    tumor = [row for row in rows if row["area_true"] > 0]
    n_tumor, n_empty = cases["tumor_present"], cases["tumor_absent"]
    detected = n_tumor - cases["missed_tumor"]
    tumor_slices: dict[str, Any] = {
        "n": n_tumor,
        "dice": describe([row["dice"] for row in tumor]) if tumor else None,
        "iou": describe([row["iou"] for row in tumor]) if tumor else None,
        "detected": detected,
        "sensitivity": detected / n_tumor if n_tumor else None,
        "note": None if n_tumor else "no slice has a tumor: no tumor-slice Dice or sensitivity",
    }
    empty_slices: dict[str, Any] = {
        "n": n_empty,
        "false_alarms": cases["false_alarm"],
        "false_alarm_rate": cases["false_alarm"] / n_empty if n_empty else None,
        "note": None if n_empty else "no slice has an empty mask (every slice shows a tumor): no false-alarm rate",
    }
    return {"tumor_slices": tumor_slices, "empty_slices": empty_slices}


def empty_slices_by_distance(rows: Sequence[Row], positions: Sequence[ScanPosition | None]) -> dict[str, Any] | None:
    """False alarms on the empty slices of ``rows``, grouped by how far their scan's nearest tumor slice is.

    ``positions[i]`` is row ``i``'s (scan, slice number); only the slices in ``rows`` count, so a scan's tumor slices
    must be among them (a patient-wise split has whole scans). Returns ``None`` when some position is unknown or
    occurs twice (the folders are not one scan each), or no slice is empty; else one entry per group of
    :data:`DISTANCE_GROUPS` (``"1"``: the slice next to a tumor slice, ..., ``"6+"``) and :data:`NO_TUMOR_IN_SCAN`,
    each ``{"n", "false_alarms", "false_alarm_rate"}`` (rate ``None`` for an empty group). Tumor edges are where the masks are least certain (a tumor thins out over a few slices);
    this says whether false alarms sit there or away from any tumor.
    """
    if len(rows) != len(positions):
        raise ValueError(f"{len(rows)} rows but {len(positions)} positions")
    if (any(position is None for position in positions) or len(set(positions)) < len(positions)
            or all(row["area_true"] > 0 for row in rows)):
        return None
    tumor_numbers: dict[str, list[int]] = {}
    for row, (scan, number) in zip(rows, positions):
        tumor_numbers.setdefault(scan, [])
        if row["area_true"] > 0:
            tumor_numbers[scan].append(number)
    names = [name for name, _, _ in DISTANCE_GROUPS] + [NO_TUMOR_IN_SCAN]
    counts = {name: [0, 0] for name in names}  # [empty slices, false alarms]
    for row, (scan, number) in zip(rows, positions):
        if row["area_true"] > 0:
            continue
        distance = min((abs(number - tumor) for tumor in tumor_numbers[scan]), default=None)
        name = NO_TUMOR_IN_SCAN if distance is None else next(
            name for name, lo, hi in DISTANCE_GROUPS if lo <= distance <= hi)
        counts[name][0] += 1
        counts[name][1] += int(row["area_pred"] > 0)
    return {name: {"n": n, "false_alarms": alarms, "false_alarm_rate": alarms / n if n else None}
            for name, (n, alarms) in counts.items()}
