"""Input normalisation shared by training, inference and export."""

from __future__ import annotations

import torch


def standardize(images: torch.Tensor) -> torch.Tensor:
    """Per-image z-score of an (N, 1, H, W) batch of any dtype or intensity scale, as float32.

    Scale-invariant, so 8-bit, 16-bit and [0, 1] inputs give the same network input.
    """
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std
