"""A slice-level "tumor present" output for any binary segmentation network (``model.net.presence_gate=true``).

:class:`PresenceGated` splits the question "is this pixel tumor?" in two, answered by one network with one
extra output channel: "does the slice have a tumor?" (a presence map whose largest value is the slice's
logit) and "is the pixel tumor, given that the slice has one?" (the usual two segmentation channels). The
two are learned apart (:class:`FactoredLoss`: the segmentation from tumor slices only, as in training on
tumor slices only, and the presence from every slice) and joined into ordinary 2-class logits by
:func:`gate`, so metrics, the slice decision, exports and the demo need no change.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

# Tumor probabilities are kept below 1 - 1e-4 so that log(1 - q) stays finite in float32.
_LOG_Q_MAX = -1e-4


def _check_factors(logits: torch.Tensor) -> None:
    if logits.ndim != 4 or logits.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) logits (2 segmentation channels and a presence map), "
                         f"got shape {tuple(logits.shape)}")


def presence_logits(logits: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) logits -> (N,) slice presence logits: the largest value of each presence map (channel 2)."""
    _check_factors(logits)
    return logits[:, 2].flatten(1).amax(dim=1)


def gate(logits: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) logits -> (N, 2, H, W) log-probabilities ``(log(1 - q), log q)``, in float32.

    Channels 0-1 are the segmentation given that the slice has a tumor (softmax logits, background first),
    giving ``p``; channel 2 is the presence map, giving the slice's presence probability ``g``
    (:func:`presence_logits`). ``q = min(p, g)``: on a slice with ``g > 0.5`` the mask ``q > 0.5`` is the
    segmentation's own, on one with ``g <= 0.5`` it is empty, and the slice's largest ``q`` (the
    ``max_probability`` decision) is at most ``g``. A softmax of the result gives back ``(1 - q, q)``.
    """
    logits = logits.float()
    log_g = F.logsigmoid(presence_logits(logits))[:, None, None]
    log_q = torch.minimum(F.logsigmoid(logits[:, 1] - logits[:, 0]), log_g).clamp(max=_LOG_Q_MAX)
    return torch.stack([torch.log1p(-torch.exp(log_q)), log_q], dim=1)


class PresenceGated(nn.Module):
    """``net`` (binary segmentation with one extra output channel, see :func:`gate`) with gated outputs.

    ``forward(x)`` returns ``{"out": gate(logits), "factors": logits[, "aux": ...]}``: ``out`` is what every
    consumer reads; ``factors`` (the wrapped network's raw 3-channel ``out``) and ``aux`` (its raw
    auxiliary outputs, training only) are for :class:`FactoredLoss`. The wrapped network's
    ``size_multiple``, ``size_rule``, ``dynamic_size``, ``backbone`` and ``aux_classifier`` are this module's.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        outputs = dict(self.net(x))
        outputs["factors"] = outputs["out"]
        outputs["out"] = gate(outputs["out"])
        return outputs

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.net, "size_multiple", 1))

    @property
    def size_rule(self) -> str:
        return getattr(self.net, "size_rule", f"H and W divisible by {self.size_multiple}")

    @property
    def dynamic_size(self) -> bool:
        return bool(getattr(self.net, "dynamic_size", True))

    @property
    def backbone(self) -> nn.Module | None:
        return getattr(self.net, "backbone", None)

    @property
    def aux_classifier(self) -> nn.Module | None:
        return getattr(self.net, "aux_classifier", None)

    @aux_classifier.setter
    def aux_classifier(self, head: nn.Module | None) -> None:
        """Export drops torchvision's auxiliary head (training only) through this."""
        if hasattr(self.net, "aux_classifier"):
            self.net.aux_classifier = head


class FactoredLoss(nn.Module):
    """The training loss of a :class:`PresenceGated` network, on its raw (N, 3, H, W) logits.

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
        self.segmentation = segmentation
        self.presence_weight = float(presence_weight)
        self._takes_distance = "distance" in inspect.signature(segmentation.forward).parameters

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """The segmentation loss's epoch-scheduled weights (``WeightedLossSum.set_epoch``), if it has any."""
        set_epoch = getattr(self.segmentation, "set_epoch", None)
        return set_epoch(epoch) if callable(set_epoch) else {}

    def forward(self, input: torch.Tensor, target: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        slice_logits = presence_logits(input)
        present = (target.flatten(1) > 0).any(dim=1)
        if present.any():
            extras = {"distance": distance[present]} if distance is not None and self._takes_distance else {}
            segmentation = self.segmentation(input[present, :2], target[present], **extras)
        else:
            segmentation = input[:, :2].sum() * 0.0
        presence = F.binary_cross_entropy_with_logits(slice_logits, present.to(slice_logits.dtype))
        return segmentation + self.presence_weight * presence
