"""Loss combinations built from MONAI losses in YAML (``loss=dice_focal``, ``loss=dice_boundary``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from monai.losses import BoundaryLoss
from torch import nn

from bts_lightning.distance_maps import signed_distance_maps
from bts_lightning.models.presence import presence_logits


class PrecomputedBoundaryLoss(BoundaryLoss):
    """MONAI's ``BoundaryLoss`` that can take the tumor's distance maps from the batch (``data.distance_maps``).

    ``forward(input, target, distance)``: ``distance`` (N, 1, *spatial), the
    :func:`~bts_lightning.distance_maps.signed_distance_map` of each label mask, replaces the map of the
    last (tumor) channel; 1- or 2-channel logits only. Other channels' maps, and all of them without
    ``distance``, are computed here by that same function, so the loss is identical either way.
    """

    _distance: torch.Tensor | None = None  # the forward's ``distance``, for compute_distance_map

    def forward(self, input: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        if distance is not None and input.shape[1] > 2:
            raise ValueError(f"precomputed distance maps are of a binary mask; the logits have {input.shape[1]} channels")
        self._distance = distance
        try:
            return super().forward(input, target)
        finally:
            self._distance = None

    @torch.no_grad()
    def compute_distance_map(self, target: torch.Tensor) -> torch.Tensor:
        """Signed maps of the one-hot ``target`` (N, C, *spatial) as MONAI's, the last channel's from ``distance``."""
        given = self._distance
        if given is None:
            return signed_distance_maps(target)
        if given.shape != target[:, -1:].shape:
            raise ValueError(f"distance maps {tuple(given.shape)} do not match the labels {tuple(target[:, -1:].shape)}")
        return torch.cat([signed_distance_maps(target[:, :-1]), given.to(target.device, torch.float32)], dim=1)


class SlicePresenceLoss(nn.Module):
    """Image-level "tumor present" loss on the segmentation itself: binary cross-entropy of each slice's
    largest tumor log-odds against whether its mask has any tumor pixel.

    ``forward(input, target)``: (N, C, H, W) logits of a softmax segmentation (C >= 2, class 0 background)
    and (N, 1, H, W) labels; the mean over the N slices. A slice's logit is the largest, over its pixels, of
    ``logsumexp(input[1:]) - input[0]`` (the log-odds of "not background" under the softmax), so it is the
    logit of the slice's maximum tumor probability: the ``max_probability`` slice decision. Pixel-mean
    losses barely feel a few stray tumor pixels on an empty slice; this term puts its whole weight on the
    strongest of them, and on tumor slices on the strongest tumor pixel. ``pos_weight`` weighs the tumor
    slices (as in ``BCEWithLogitsLoss``).
    """

    def __init__(self, pos_weight: float = 1.0) -> None:
        super().__init__()
        if not pos_weight > 0:
            raise ValueError(f"pos_weight={pos_weight} must be > 0")
        self.pos_weight = float(pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim < 3 or input.shape[1] < 2:
            raise ValueError(f"expected (N, C >= 2, ...) softmax logits, got shape {tuple(input.shape)}")
        log_odds = torch.logsumexp(input[:, 1:], dim=1) - input[:, 0]
        slice_logits = log_odds.flatten(1).amax(dim=1)
        present = (target.flatten(1) > 0).any(dim=1).to(slice_logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(
            slice_logits, present, pos_weight=slice_logits.new_tensor(self.pos_weight))


class OnTumorSlices(nn.Module):
    """``loss`` over only the slices of the batch whose mask has a tumor pixel.

    ``forward(input, target[, distance])``: (N, C, H, W) logits and (N, 1, H, W) labels; the wrapped loss of
    the tumor slices (and their distance maps, when it takes them), or 0 (still connected to ``input``) when
    the batch has none. For data with empty slices:
    a per-image Dice term scores an empty slice by its predicted tumor area alone, and that pull towards
    predicting nothing makes the model segment less of every tumor; wrapped, the segmentation terms learn
    from the tumor slices only and a slice-level term (:class:`SlicePresenceLoss`) from all of them.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self._takes_distance = uses_distance_maps(loss)

    def forward(self, input: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        present = (target.flatten(1) > 0).any(dim=1)
        if not present.any():
            return input.sum() * 0.0
        extras = {"distance": distance[present]} if distance is not None and self._takes_distance else {}
        return self.loss(input[present], target[present], **extras)


class FactoredLoss(nn.Module):
    """The training loss of a :class:`~bts_lightning.models.presence.PresenceGated` network, on its raw (N, 3, H, W) logits.

    ``forward(input, target[, distance])``: ``segmentation`` (any 2-class loss of the project, e.g. Dice + CE)
    of channels 0-1 over the slices whose (N, 1, H, W) mask has a tumor pixel (0, still connected to
    ``input``, when the batch has none), plus ``presence_weight`` times the binary cross-entropy of each
    slice's presence logit (:func:`presence_logits`) against whether its mask has a tumor, over every slice.
    The segmentation channels thus never learn from an empty slice: P(pixel | slice has a tumor) is
    learned where it is defined, and the empty slices teach the presence map alone. ``distance`` maps (of
    the masks) go to ``segmentation`` for the same slices when it takes them.
    """

    def __init__(self, segmentation: nn.Module, presence_weight: float = 1.0) -> None:
        super().__init__()
        if isinstance(presence_weight, bool) or not isinstance(presence_weight, (int, float)) or presence_weight < 0:
            raise ValueError(f"presence_loss_weight={presence_weight!r} must be a number >= 0")
        self.loss = OnTumorSlices(segmentation)
        self.presence_weight = float(presence_weight)

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """The segmentation loss's epoch-scheduled weights (``WeightedLossSum.set_epoch``), if it has any."""
        set_epoch = getattr(self.loss.loss, "set_epoch", None)
        return set_epoch(epoch) if callable(set_epoch) else {}

    def forward(self, input: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        slice_logits = presence_logits(input)
        present = (target.flatten(1) > 0).any(dim=1).to(slice_logits.dtype)
        presence = nn.functional.binary_cross_entropy_with_logits(slice_logits, present)
        return self.loss(input[:, :2], target, distance) + self.presence_weight * presence


def uses_distance_maps(loss: nn.Module) -> bool:
    """Whether ``loss`` takes precomputed distance maps: its forward has a ``distance`` argument
    (for a :class:`WeightedLossSum`, one of its terms' has; for a wrapper, the loss it wraps has)."""
    if isinstance(loss, WeightedLossSum):
        return any(uses_distance_maps(term) for term in loss.terms.values())
    if isinstance(loss, (OnTumorSlices, FactoredLoss)):
        return uses_distance_maps(loss.loss)
    return "distance" in inspect.signature(loss.forward).parameters


@dataclass(frozen=True)
class LinearRamp:
    """A weight ``start + step * epoch``, clipped to ``[min, max]`` (either bound may be None)."""

    start: float
    step: float
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"schedule min={self.min} is above max={self.max}")

    def __call__(self, epoch: int) -> float:
        weight = self.start + self.step * epoch
        if self.min is not None:
            weight = max(weight, self.min)
        if self.max is not None:
            weight = min(weight, self.max)
        return float(weight)


class WeightedLossSum(nn.Module):
    """``sum(weights[name] * terms[name](input, target))`` over named loss terms.

    Every term receives the same (N, C, H, W) logits and (N, 1, H, W) labels, so each term's own
    activation and background options decide what it sees; ``distance`` maps, when given, go to the
    terms that take them (:func:`uses_distance_maps`). Weights default to 1; terms weighted 0 are not
    computed (a boundary term's distance maps cost CPU time).

    ``schedule`` gives some terms a weight that changes with the training epoch instead:
    ``{name: {start, step, min, max}}`` (a :class:`LinearRamp`). Such terms take their epoch-0
    weight at construction; :meth:`set_epoch` moves them to another epoch (``SegmentationModule``
    calls it at the start of every training epoch, so validation uses the current weights).
    """

    def __init__(
        self,
        terms: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
        schedule: Mapping[str, Mapping[str, float | None]] | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedLossSum needs at least one loss term")
        self.terms = nn.ModuleDict(dict(terms))
        weights = dict(weights or {})
        schedule = dict(schedule or {})
        for option, names in (("weights", weights), ("schedule", schedule)):
            if unknown := sorted(set(names) - set(terms)):
                raise ValueError(f"{option} name unknown loss terms {unknown}; terms are {sorted(terms)}")
        if both := sorted(set(weights) & set(schedule)):
            raise ValueError(f"loss terms {both} have both a fixed weight and a schedule; give one")
        self.schedule = {name: LinearRamp(**spec) for name, spec in schedule.items()}
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}
        for name, weight in self.weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights.{name}={weight:g} must be a number >= 0 (0 leaves the term out)")
        self._distance_terms = {name for name, term in terms.items() if uses_distance_maps(term)}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Set the scheduled weights to those of ``epoch`` (0-based); returns them (empty without a schedule)."""
        scheduled = {name: ramp(epoch) for name, ramp in self.schedule.items()}
        self.weights.update(scheduled)
        return scheduled

    def forward(self, input: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        total = input.new_zeros(())
        for name, term in self.terms.items():
            if self.weights[name]:
                extras = {"distance": distance} if name in self._distance_terms and distance is not None else {}
                total = total + self.weights[name] * term(input, target, **extras)
        return total
