"""Surgery on pretrained networks: input channels and output classes."""

from __future__ import annotations

import torch
from torch import nn


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first RGB ``nn.Conv2d`` with one taking ``in_channels`` inputs, in place.

    The RGB filters are summed for one channel; otherwise they are repeated cyclically
    and scaled by ``3 / in_channels`` so activations keep their magnitude. Bias is kept.
    """
    if in_channels == 3:
        return
    name, conv = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
        (None, None),
    )
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d with 3 input channels")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        rgb = conv.weight
        if in_channels == 1:
            new.weight.copy_(rgb.sum(dim=1, keepdim=True))
        else:
            index = torch.arange(in_channels) % 3
            new.weight.copy_(rgb[:, index] * (3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)


def replace_out_conv(model: nn.Module, path: str, num_classes: int) -> None:
    """Swap the classifier conv at ``path`` for a fresh one if its class count differs."""
    conv = model.get_submodule(path)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{path} is a {type(conv).__name__}, expected Conv2d")
    if conv.out_channels == num_classes:
        return
    new = nn.Conv2d(
        conv.in_channels,
        num_classes,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    model.set_submodule(path, new)
