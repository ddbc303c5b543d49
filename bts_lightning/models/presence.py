"""A slice-level "tumor present" output for any binary segmentation network (``model.net.presence_gate=true``).

:class:`PresenceGated` factors the tumor probability of each pixel as P(the slice has a tumor) x P(the pixel
is tumor | the slice has one), from one extra output channel of the wrapped network, and returns it as
ordinary 2-class logits: losses, metrics, the slice decision, exports and the demo need no change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Tumor probabilities are kept below 1 - 1e-4 so that log(1 - q) stays finite in float32.
_LOG_Q_MAX = -1e-4


def gate(logits: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) logits -> (N, 2, H, W) log-probabilities ``(log(1 - q), log q)``, in float32.

    Channels 0-1 are the segmentation given that the slice has a tumor (softmax logits, background first);
    channel 2 is a presence map whose largest value over the slice is the slice's presence logit ``s``.
    ``q = sigmoid(s) * softmax(logits[:, :2])[:, 1]``: a softmax of the result gives back ``(1 - q, q)``.
    """
    if logits.ndim != 4 or logits.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) logits (2 segmentation channels and a presence map), "
                         f"got shape {tuple(logits.shape)}")
    logits = logits.float()
    presence = logits[:, 2].flatten(1).amax(dim=1)[:, None, None]
    log_q = F.logsigmoid(presence) + F.logsigmoid(logits[:, 1] - logits[:, 0])
    log_q = log_q.clamp(max=_LOG_Q_MAX)
    return torch.stack([torch.log1p(-torch.exp(log_q)), log_q], dim=1)


class PresenceGated(nn.Module):
    """``net`` (binary segmentation with one extra output channel, see :func:`gate`) with gated outputs.

    ``forward(x)`` returns ``net``'s dict with ``out`` (and every ``aux`` tensor) gated to 2-class logits.
    Trained with the segmentation terms on tumor slices only and a slice-level term on every slice
    (``loss=dice_ce_slice_tumor``), the segmentation channels never learn from empty slices, as in training
    on tumor slices only, and the presence map alone learns to leave an empty slice empty. The wrapped
    network's ``size_multiple``, ``size_rule``, ``dynamic_size``, ``backbone`` and ``aux_classifier``
    are this module's.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        outputs = self.net(x)
        gated: dict[str, torch.Tensor | list[torch.Tensor]] = {"out": gate(outputs["out"])}
        if (aux := outputs.get("aux")) is not None:
            gated["aux"] = [gate(a) for a in aux] if isinstance(aux, (list, tuple)) else gate(aux)
        return gated

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
