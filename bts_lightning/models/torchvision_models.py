"""torchvision segmentation models (DeepLabV3, FCN, LR-ASPP) adapted to N-channel input."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models import segmentation as tvseg

from bts_lightning.errors import WeightsUnavailableError
from bts_lightning.models.adapt import adapt_first_conv, replace_out_conv
from bts_lightning.models.registry import register_model
from bts_lightning.models.weights import ensure_cached, resolve_weights


class _AuxInTrainingOnly:
    """Mixin for torchvision's DeepLabV3 and FCN: the auxiliary head runs in training only.

    In eval mode ``forward`` returns ``{"out": logits}`` without computing the auxiliary head, which nothing
    reads outside training (about 5 % of a 256 px forward pass on CPU); in training it is torchvision's.
    """

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            return super().forward(x)
        logits = self.classifier(self.backbone(x)["out"])
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class DeepLabV3(_AuxInTrainingOnly, tvseg.DeepLabV3):
    """torchvision's DeepLabV3, its auxiliary head computed in training only."""


class FCN(_AuxInTrainingOnly, tvseg.FCN):
    """torchvision's FCN, its auxiliary head computed in training only."""


def _build(
    factory: Callable[..., nn.Module],
    weights_enum: type[WeightsEnum],
    head_convs: Sequence[str],
    in_channels: int,
    num_classes: int,
    weights: str | None,
    **factory_kwargs: object,
) -> nn.Module:
    """Build with torchvision, loading ``weights`` from the hub cache, then adapt input and heads."""
    if weights is None:
        model = factory(
            weights=None, weights_backbone=None, num_classes=num_classes, **factory_kwargs
        )
    else:
        resolved = resolve_weights(weights_enum, weights)
        path = ensure_cached(resolved)
        try:
            model = factory(weights=resolved, **factory_kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise WeightsUnavailableError(
                f"Cached weights file {path} for {resolved} could not be loaded "
                f"({type(exc).__name__}: {exc}). Delete it and copy a complete download "
                f"of {resolved.url} there, or use model.net.weights=null."
            ) from None
        for conv_path in head_convs:
            replace_out_conv(model, conv_path, num_classes)
    adapt_first_conv(model, in_channels)
    return model


@register_model("deeplabv3")
def deeplabv3(in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """DeepLabV3 with a dilated ResNet-50 backbone and an auxiliary FCN head."""
    model = _build(tvseg.deeplabv3_resnet50, tvseg.DeepLabV3_ResNet50_Weights, ("classifier.4", "aux_classifier.4"),
                   in_channels, num_classes, weights, aux_loss=True)
    model.__class__ = DeepLabV3  # same modules and state-dict keys; forward skips the auxiliary head in eval
    return model


@register_model("fcn")
def fcn(in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """FCN with a dilated ResNet-50 backbone and an auxiliary head."""
    model = _build(tvseg.fcn_resnet50, tvseg.FCN_ResNet50_Weights, ("classifier.4", "aux_classifier.4"),
                   in_channels, num_classes, weights, aux_loss=True)
    model.__class__ = FCN  # same modules and state-dict keys; forward skips the auxiliary head in eval
    return model


@register_model("lraspp")
def lraspp(in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """Lite R-ASPP with a MobileNetV3-Large backbone (no auxiliary head)."""
    return _build(tvseg.lraspp_mobilenet_v3_large, tvseg.LRASPP_MobileNet_V3_Large_Weights,
                  ("classifier.low_classifier", "classifier.high_classifier"), in_channels, num_classes, weights)
