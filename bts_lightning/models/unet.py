"""MONAI 2D UNet baseline, wrapped to return ``{"out": logits}`` like torchvision models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

from bts_lightning.models.registry import register_model, reject_weights


class MonaiUNet(nn.Module):
    """MONAI ``UNet(spatial_dims=2)``; H and W must be divisible by ``size_multiple``, the product of strides."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.size_multiple = math.prod(strides)
        self.size_rule = "the product of model.net.strides, which can be changed"
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


@register_model("unet", pretrained=False)
def unet(
    in_channels: int,
    num_classes: int,
    weights: str | None = None,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """Randomly initialised MONAI UNet (no pretrained weights exist for it)."""
    reject_weights("unet", weights)
    return MonaiUNet(in_channels, num_classes, channels, strides, num_res_units, dropout)
