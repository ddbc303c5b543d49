"""Per-image overlap metrics for the tumor class (MONAI maths, torchmetrics accumulation)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_iou
from torchmetrics import Metric, MetricCollection

_SCORES = {"dice": compute_dice, "iou": compute_iou}


def per_image_overlap(preds: torch.Tensor, target: torch.Tensor, kind: Literal["dice", "iou"]) -> torch.Tensor:
    """Tumor-class Dice or IoU of each image in a batch of binary (N, H, W) masks.

    An image whose truth and prediction are both empty scores 1; empty truth with a
    non-empty prediction scores 0 (MONAI's ``ignore_empty=False``).
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


def overlap_metrics(prefix: str) -> MetricCollection:
    """``{prefix}dice`` and ``{prefix}iou``, e.g. ``val/dice``.

    ``compute_groups=False``: torchmetrics would otherwise merge the two metrics whenever their
    states agree after the first update (a first batch scoring only 0s and 1s), and report Dice
    as IoU for the rest of the epoch.
    """
    metrics = {"dice": MeanPerImageOverlap("dice"), "iou": MeanPerImageOverlap("iou")}
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
