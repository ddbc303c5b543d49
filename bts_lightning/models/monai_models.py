"""MONAI 2-D networks (Attention U-Net, UNet++, SwinUNETR, SegResNet), randomly initialised.

Each wrapper's ``forward(x)`` returns ``{"out": logits}`` at input resolution; UNet++ with deep
supervision adds ``"aux"`` (a list) in training mode. ``size_multiple`` is what H and W must be
divisible by (see :func:`~bts_lightning.models.registry.check_input_size`); ``dynamic_size = False``
marks a network whose traced graph only runs at the traced size (``bts_lightning.export`` then writes a
fixed-size model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, SegResNet, SwinUNETR
from torch import nn

from bts_lightning.errors import ConfigError
from bts_lightning.models.registry import register_model, reject_weights


class LogitsNet(nn.Module):
    """``{"out": net(x)}`` for a MONAI network returning logits; H and W must be multiples of ``size_multiple``."""

    def __init__(self, net: nn.Module, size_multiple: int, size_rule: str, dynamic_size: bool = True) -> None:
        super().__init__()
        self.net = net
        self.size_multiple = size_multiple
        self.size_rule = size_rule
        self.dynamic_size = dynamic_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


class UNetPlusPlus(nn.Module):
    """MONAI ``BasicUNetPlusPlus``: ``out`` is the deepest head (``x_0_4``); with deep supervision the
    shallower full-resolution heads (``x_0_1`` to ``x_0_3``) are ``aux`` in training mode only."""

    def __init__(self, net: BasicUNetPlusPlus) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        *aux, out = self.net(x)  # MONAI orders the heads shallowest first
        return {"out": out, "aux": aux} if aux and self.training else {"out": out}


@register_model("attention_unet", pretrained=False)
def attention_unet(
    in_channels: int,
    num_classes: int,
    weights: str | None = None,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``AttentionUnet``: U-Net with attention gates on the skips; H, W multiples of the product of strides."""
    reject_weights("attention_unet", weights)
    net = AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                        strides=tuple(strides), dropout=dropout)
    return LogitsNet(net, math.prod(strides), "the product of model.net.strides, which can be changed")


@register_model("unetpp", pretrained=False)
def unetpp(
    in_channels: int,
    num_classes: int,
    weights: str | None = None,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    deep_supervision: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``BasicUNetPlusPlus`` (UNet++), any H and W; ``deep_supervision`` trains the shallower heads too."""
    reject_weights("unetpp", weights)
    net = BasicUNetPlusPlus(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                            features=tuple(features), deep_supervision=deep_supervision, dropout=dropout)
    if not deep_supervision:  # MONAI still runs these heads but drops their logits: keep unused weights out
        for name in ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3"):
            setattr(net, name, nn.Identity())
    return UNetPlusPlus(net)


@register_model("swin_unetr", pretrained=False)
def swin_unetr(
    in_channels: int,
    num_classes: int,
    weights: str | None = None,
    feature_size: int = 24,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    dropout_path_rate: float = 0.0,
    use_v2: bool = False,
) -> nn.Module:
    """MONAI ``SwinUNETR`` (patch size 2, four patch merges): H and W multiples of 2**5 = 32.

    Its shifted-window attention masks are built for the traced size, so exports are fixed-size.
    """
    reject_weights("swin_unetr", weights)
    if feature_size % 12:
        raise ConfigError(f"model.net.feature_size={feature_size} must be a multiple of 12 for SwinUNETR "
                          "(e.g. 12, 24 or 48).")
    net = SwinUNETR(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, feature_size=feature_size,
                    depths=tuple(depths), num_heads=tuple(num_heads), dropout_path_rate=dropout_path_rate,
                    use_v2=use_v2)
    return LogitsNet(net, 2**5, "SwinUNETR: patch size 2, then four 2x patch merges", dynamic_size=False)


@register_model("segresnet", pretrained=False)
def segresnet(
    in_channels: int,
    num_classes: int,
    weights: str | None = None,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``SegResNet``: H and W multiples of 2**(len(blocks_down) - 1) (its stride-2 convolutions)."""
    reject_weights("segresnet", weights)
    if len(blocks_up) != len(blocks_down) - 1:
        raise ConfigError(f"model.net.blocks_up={list(blocks_up)} needs one entry fewer than "
                          f"model.net.blocks_down={list(blocks_down)} (one per upsampling).")
    net = SegResNet(spatial_dims=2, init_filters=init_filters, in_channels=in_channels, out_channels=num_classes,
                    dropout_prob=dropout or None, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up))
    return LogitsNet(net, 2 ** (len(blocks_down) - 1), "2**(len(model.net.blocks_down) - 1), which can be changed")
