"""Scan context: a cascade's "tumor present" judged with the neighbouring slices of the same scan.

A cascade (:mod:`bts_lightning.models.cascade`) decides from each slice alone whether it has a tumor, and
misses tumor slices between two slices where it finds one (``benchmarks/false_alarms.md``). Built with
``context=K`` (``python -m bts_lightning.cascade ... context=1``), it also holds ``context_threshold``: ``evaluate``
and ``predict`` average each slice's presence probability over the slice and the slices up to ``K`` before and
after it in the same scan, and keep the segmentation's mask where that mean is above ``context_threshold``,
both calibrated on the validation split. A scan is a folder; a slice's number is the number its file name ends
with (``TCGA_CS_4941_19960909_12.tif`` is slice 12). A slice without a neighbour among the slices scored (a single
file, the demo, the Space, an exported model) is judged alone, against the slice-alone threshold
(``presence_threshold``) that the network applies itself.

Evaluation refuses scan context on a flat layout (every slice in one ``images/`` folder, numbered across
patients); ``predict`` treats its input folder as one scan. ``scan_context=off`` judges every slice alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bts_lightning.data.neighbours import SCAN_LAYOUTS, Position, position_index
from bts_lightning.errors import ConfigError
from bts_lightning.inference import (
    InferenceOptions,
    ModulePredictor,
    Predictor,
    auto_or_off,
    check_batch,
    contract_of,
    decision_setting,
    with_model_decision,
)
from bts_lightning.models.cascade import Cascade, cascade_of
from bts_lightning.preprocessing import blank, standardize

log = logging.getLogger(__name__)

def context_means(values: Sequence[float], positions: Sequence[Position], context: int,
                  fix: str = "pass scan_context=off (each slice judged alone)") -> list[float | None]:
    """Each value averaged with those of the slices numbered up to ``context`` below and above it in the same scan
    (the ones among ``positions``); ``None`` for a slice with none of them (judged alone). Raises
    :class:`~bts_lightning.errors.DataError` ending with ``fix`` when two slices claim one position (two scans in one
    folder, whose slices would be averaged together)."""
    at = {position: float(values[index])
          for position, index in position_index(positions, "a cascade's scan context", fix).items()}
    means: list[float | None] = []
    for position, value in zip(positions, values):
        if position is None:
            means.append(None)
            continue
        scan, number = position
        window = [at[(scan, number + step)] for step in range(-context, context + 1)
                  if step and (scan, number + step) in at]
        means.append(float(np.mean([float(value), *window])) if window else None)
    return means


def check_context(context: Any, key: str = "context") -> int:
    """``context`` as a whole number >= 0; ``ConfigError`` naming ``key`` otherwise."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ConfigError(f"{key}={context!r} must be a whole number >= 0 (how many slices before and after each "
                          "slice its presence is averaged with; 0 = each slice alone).")
    return context


@dataclass(frozen=True)
class ScanContext:
    """Tumor present on a slice iff the mean presence probability of its window (:func:`context_means`) is above
    ``threshold``; on a slice without neighbours, iff its own is above ``slice_threshold``."""

    context: int
    threshold: float
    slice_threshold: float

    def decide(self, probabilities: Sequence[float], positions: Sequence[Position]) -> list[tuple[float, bool]]:
        """(score, tumor present) of every slice, from the presence probabilities of all the slices scored
        together: the score is its window's mean, or its own probability when it has no neighbour."""
        means = context_means(probabilities, positions, self.context)
        return [(float(own), float(own) > self.slice_threshold) if mean is None else (mean, mean > self.threshold)
                for own, mean in zip(probabilities, means)]

    def present(self, probabilities: Sequence[float], positions: Sequence[Position]) -> list[bool]:
        """Whether each slice has a tumor (:meth:`decide`)."""
        return [present for _, present in self.decide(probabilities, positions)]

    def describe(self) -> str:
        return (f"presence averaged over each slice and {self.context} slice(s) either side in its scan "
                f"> {self.threshold:.6g} (alone, without neighbours: > {self.slice_threshold:.6g})")

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "threshold": self.threshold, "slice_threshold": self.slice_threshold}


def setting(cfg: Mapping[str, Any]) -> str:
    """The app's ``scan_context`` setting (:func:`~bts_lightning.inference.auto_or_off`)."""
    return auto_or_off(cfg, "scan_context", "a cascade built with context judges each slice with its neighbours "
                                            "in the scan; off: every slice alone")


def model_context(cfg: Mapping[str, Any], predictor: Predictor) -> ScanContext | None:
    """The scan context to apply: the cascade's, when it has one and ``cfg.scan_context`` is ``auto``."""
    chosen = setting(cfg)  # checked for every model
    cascade = cascade_of(predictor)
    if cascade is None or not cascade.context:
        return None
    if chosen == "off":
        log.info("Scan context off (scan_context=off): every slice is judged alone.")
        return None
    return ScanContext(cascade.context, float(cascade.context_threshold), cascade.presence_threshold)


def decision_or_context(options: InferenceOptions, cfg: Mapping[str, Any],
                        predictor: Predictor) -> tuple[InferenceOptions, ScanContext | None]:
    """What decides which slices keep their mask: a cascade's scan context (:func:`model_context`), in place of the
    model's slice decision, or else the slice decision (:func:`~bts_lightning.inference.with_model_decision`);
    returns the options (with the decision, or none) and the context (or ``None``)."""
    context = model_context(cfg, predictor)
    if context is None:
        return with_model_decision(options, cfg, contract_of(predictor)), None
    if decision_setting(cfg) == "auto" and contract_of(predictor).slice_decision is not None:
        log.info("The scan context decides which slices keep their mask, in place of the model's slice decision "
                 "(which applies where slices are judged alone: scan_context=off, exported files, the demo).")
    return options, context


def check_scan_layout(layout: str | None, root: Path | str, key: str = "scan_context=off") -> None:
    """``ConfigError`` unless slices of ``layout`` sit in one folder per scan (their neighbours are known)."""
    if layout not in SCAN_LAYOUTS:
        raise ConfigError(f"{root} is in the {layout} layout, whose slices are not in one folder per scan, so which "
                          "slices are neighbours is unknown; scan context needs one folder per scan (the suffix "
                          f"layout, e.g. the LGG set). Pass {key} to judge every slice alone.")


class SegmentationPredictor:
    """Predictor of a cascade's segmentation alone: tumor probabilities (N, H, W), not emptied by its presence."""

    def __init__(self, predictor: ModulePredictor) -> None:
        cascade = cascade_of(predictor)
        if cascade is None:
            raise TypeError(f"{predictor!r} does not run a cascade")
        self.cascade, self.device = cascade, predictor.device
        self.contract = replace(predictor.contract, decision=None)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        check_batch(images, self.contract)
        return self.cascade.segmentation_probability(standardize(images.to(self.device)))


@torch.no_grad()
def presence_probabilities(cascade: Cascade, images: np.ndarray | torch.Tensor) -> list[float]:
    """:meth:`Cascade.presence_probability` of every image of a (N, C, H, W) (or (N, H, W)) batch, on the
    cascade's device; 0 for a blank slice (:func:`~bts_lightning.preprocessing.blank`)."""
    batch = torch.as_tensor(images).float()
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch
    device = next(cascade.parameters()).device
    probability = cascade.presence_probability(standardize(batch.to(device))).cpu()
    return torch.where(blank(batch), 0.0, probability).tolist()
