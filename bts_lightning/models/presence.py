"""A slice-level "tumor present" output for any binary segmentation network (``model.net.presence_gate=true``).

:class:`PresenceGated` splits the question "is this pixel tumor?" in two, answered by one network with one
extra output channel: "does the slice have a tumor?" (a presence map whose largest value is the slice's
logit) and "is the pixel tumor, given that the slice has one?" (the usual two segmentation channels). The
two are learned apart (:class:`~bts_lightning.losses.FactoredLoss`: the segmentation from tumor slices only,
as in training on tumor slices only, and the presence from every slice) and joined into ordinary 2-class logits by
:func:`gate`, so metrics, the slice decision, exports and the demo need no change.
"""

from __future__ import annotations

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
    auxiliary outputs, training only) are for :class:`~bts_lightning.losses.FactoredLoss`. The wrapped network's
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
