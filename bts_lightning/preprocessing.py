"""Input normalisation and flip test-time augmentation, shared by training, inference and export."""

from __future__ import annotations

from collections.abc import Callable

import torch


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Z-score of each channel of each image of an (N, C, H, W) batch of any dtype or scale, as float32.

    Scale-invariant per channel, so 8-bit, 16-bit and [0, 1] inputs give the same network input, and
    MRI sequences of different brightness (e.g. FLAIR and T1) each get zero mean and unit variance.
    """
    x = images.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def blank(images: torch.Tensor) -> torch.Tensor:
    """(N,) whether each slice of an (N, C, H, W) batch is blank: every channel one value (e.g. the black slices at
    the ends of a scan). Such a slice shows nothing to segment, and :func:`standardize` makes it all zeros, on which
    a network's output depends on rounding (checkpoint and ONNX runtime disagree): inference gives it an empty mask."""
    flat = images.flatten(2)
    return (flat.amax(dim=2) == flat.amin(dim=2)).all(dim=1)


def flip_mean(probability: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mean of ``probability`` (an (N, ..., H, W) map of a batch) over ``images`` and their horizontal and
    vertical flips, each map flipped back: flip test-time augmentation."""
    total = probability(images) + probability(images.flip(-1)).flip(-1) + probability(images.flip(-2)).flip(-2)
    return total / 3
