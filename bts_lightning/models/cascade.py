"""Two trained networks as one model: one segments, the other says whether the slice has a tumor.

A network trained on tumor slices only segments best but marks a tumor on nearly every empty slice; one
trained with empty slices learns to leave them empty but segments less well (README "Empty slices").
:class:`Cascade` keeps the first network's segmentation and takes the slice-level answer from the second:
its presence probability is the largest value of the second network's tumor probability map of the slice
(with ``flips``, of the mean of the maps of the slice and of its horizontal and vertical flips; with several presence
networks, an ensemble, of the mean of their maps), and the slice counts as
having a tumor when that probability is above ``presence_threshold`` (``python -m bts_lightning.cascade``
calibrates it on the validation split). With ``context`` > 0 it also holds ``context_threshold``, for the
presence probability averaged over neighbouring slices of a scan, which ``evaluate`` and ``predict`` apply
(:mod:`bts_lightning.scan_context`); the network itself judges each slice alone. :func:`build_cascade` wraps it in
:class:`~bts_lightning.models.presence.PresenceGated`, so the output is ordinary 2-class logits: the
segmentation's own mask on slices with a tumor, an empty one elsewhere; metrics, the slice decision,
exports and the demo need no change (flip TTA alone needs the parts apart: :func:`flip_averaged_probability`, and
exported files' ``cascade_parts``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bts_lightning.errors import ConfigError
from bts_lightning.models.presence import PresenceGated
from bts_lightning.preprocessing import flip_mean

# The gate's logit: sigmoid(+GATE_LOGIT) is 1 and exp(-GATE_LOGIT) 0 in float32, so a slice's gate is open or shut.
# (A gate sigmoid(logit P - logit threshold) near 0.5 capped the probabilities of a slice that just passed: its mask
# shrank under bilinear resizing and vanished at a pixel threshold above 0.5.)
GATE_LOGIT = 1e4


class Cascade(nn.Module):
    """``segmentation``'s 2-class logits and a presence map from ``presence``, as :func:`~bts_lightning.models.presence.gate` reads them.

    ``forward(x)`` returns ``{"out": (N, 3, H, W)}``: channels 0-1 are ``segmentation``'s logits; channel 2
    is constant over the slice, :meth:`gate_logit`: ``+GATE_LOGIT`` exactly when ``P > presence_threshold`` (``P``
    from :meth:`presence_probability`), else ``-GATE_LOGIT``. Both networks
    take the same input and return ``{"out": 2-class logits, ...}``. ``presence`` is one network or a sequence of
    them (an ensemble: their tumor probability maps are averaged; one network's weights keep the names of a single one).
    """

    def __init__(self, segmentation: nn.Module, presence: nn.Module | Sequence[nn.Module],
                 presence_threshold: float = 0.5, flips: bool = True, context: int = 0,
                 context_threshold: float | None = None) -> None:
        super().__init__()
        members = [presence] if isinstance(presence, nn.Module) else list(presence)
        if not members:
            raise ConfigError("A cascade needs at least one presence network.")
        self.segmentation = segmentation
        self.presence = members[0] if len(members) == 1 else nn.ModuleList(members)
        self.presence_threshold = float(presence_threshold)
        self.flips = bool(flips)
        self.context = int(context)
        self.context_threshold = None if context_threshold is None else float(context_threshold)

    @property
    def presence_networks(self) -> list[nn.Module]:
        """The presence network(s): one, or the members of an ensemble."""
        return list(self.presence) if isinstance(self.presence, nn.ModuleList) else [self.presence]

    def _probability_map(self, x: torch.Tensor) -> torch.Tensor:
        maps = [net(x)["out"].float().softmax(dim=1)[:, 1] for net in self.presence_networks]
        return maps[0] if len(maps) == 1 else torch.stack(maps).mean(dim=0)

    def presence_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the largest value of ``presence``'s tumor probability map of each slice (an ensemble's mean map); with
        ``flips``, of the mean of the maps of the slice and of its horizontal and vertical flips (each flipped back)."""
        probability = flip_mean(self._probability_map, x) if self.flips else self._probability_map(x)
        return probability.flatten(1).amax(dim=1)

    def gate_logit(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) ``+GATE_LOGIT`` where the slice passes the threshold (``P`` from :meth:`presence_probability` above
        ``presence_threshold``), else ``-GATE_LOGIT``: a step, so the gated probability is the segmentation's own on a
        slice that passes and 0 elsewhere, whatever the pixel threshold, resizing or flip averaging applied to it."""
        # The probability itself against the threshold, as calibration compares them: the threshold is one of the
        # calibration slices' float32 probabilities, which a logit in float32 against one in float64 let through.
        return torch.where(self.presence_probability(x) > self.presence_threshold, GATE_LOGIT, -GATE_LOGIT)

    def segmentation_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) ``segmentation``'s tumor probability, not gated."""
        return self.segmentation(x)["out"].float().softmax(dim=1)[:, 1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        segmentation = self.segmentation(x)["out"].float()
        presence_map = self.gate_logit(x)[:, None, None, None].expand(-1, 1, *segmentation.shape[-2:])
        return {"out": torch.cat([segmentation, presence_map], dim=1)}

    def record(self) -> dict[str, object]:
        """What decides presence, for run records (``metrics.json``): thresholds, scan context, ensemble size, flips."""
        return {"presence_threshold": self.presence_threshold, "presence_networks": len(self.presence_networks),
                "flips": self.flips, "context": self.context, "context_threshold": self.context_threshold}

    @property
    def networks(self) -> list[nn.Module]:
        """The segmentation network, then the presence network(s)."""
        return [self.segmentation, *self.presence_networks]

    @property
    def size_multiple(self) -> int:
        return math.lcm(*(int(getattr(net, "size_multiple", 1)) for net in self.networks))

    @property
    def size_rule(self) -> str:
        rules = [getattr(net, "size_rule", None) for net in self.networks]
        return "; ".join(dict.fromkeys(rule for rule in rules if rule)) or f"H and W divisible by {self.size_multiple}"

    @property
    def dynamic_size(self) -> bool:
        return all(bool(getattr(net, "dynamic_size", True)) for net in self.networks)


def cascade_of(model: object) -> Cascade | None:
    """The :class:`Cascade` a checkpoint's predictor or its module runs, or ``None`` (another model, an exported
    file)."""
    net = getattr(getattr(model, "module", model), "net", None)
    return net.net if isinstance(net, PresenceGated) and isinstance(net.net, Cascade) else None


def flip_averaged_probability(cascade: Cascade, x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) tumor probabilities of the gated cascade under flip test-time augmentation: its segmentation
    averaged over ``x`` and its horizontal and vertical flips, gated by the presence of ``x`` as given, scored once
    (the calibrated decision; re-scoring it on each flipped view would change which slices pass).
    ``min(mean p, g)``, as :func:`~bts_lightning.models.presence.gate` joins them without flips."""
    segmentation = flip_mean(cascade.segmentation_probability, x)
    return torch.minimum(segmentation, torch.sigmoid(cascade.gate_logit(x))[:, None, None])


def _is_fraction(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def build_cascade(segmentation: nn.Module, presence: nn.Module | Sequence[nn.Module], presence_threshold: float = 0.5,
                  flips: bool = True, in_channels: int = 1, num_classes: int = 2, weights: str | None = None,
                  name: str = "cascade", context: int = 0, context_threshold: float | None = None) -> PresenceGated:
    """:class:`Cascade` of built networks (``presence``: one, or a list for an ensemble), gated (``out``: 2-class
    logits; see the module doc).

    ``in_channels`` / ``num_classes`` / ``weights`` / ``name`` are the keys every network config has (the model
    contract and model card read them); a cascade is built from trained networks, so ``weights`` must be None.
    ``context`` / ``context_threshold``: the scan context (:mod:`bts_lightning.scan_context`; 0 / None: none).
    Raises ``ConfigError`` for a threshold outside [0, 1], a context without its threshold, a non-binary cascade,
    or pretrained ``weights``.
    """
    if not _is_fraction(presence_threshold):
        raise ConfigError(f"model.net.presence_threshold={presence_threshold!r} must be a number in [0, 1].")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ConfigError(f"model.net.context={context!r} must be a whole number >= 0.")
    if context and not _is_fraction(context_threshold):
        raise ConfigError(f"model.net.context_threshold={context_threshold!r} must be a number in [0, 1] with "
                          f"model.net.context={context}.")
    if num_classes != 2:
        raise ConfigError(f"A cascade is a binary model (num_classes=2), got num_classes={num_classes}.")
    if weights is not None:
        raise ConfigError(f"A cascade is built from trained networks; model.net.weights={weights!r} must be null.")
    del in_channels, name  # recorded in the config for the model contract; the networks hold their own
    return PresenceGated(Cascade(segmentation, presence, presence_threshold, flips, context,
                                 context_threshold if context else None))
