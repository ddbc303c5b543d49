"""Signed distance maps of tumor masks, the boundary loss's weights (loss=dice_boundary).

One implementation for the loader workers (``data.distance_maps``), the loss
(:class:`~bts_lightning.losses.PrecomputedBoundaryLoss`) and ``benchmarks/loss_cost``; it gives exactly
the maps of MONAI's ``BoundaryLoss.compute_distance_map`` (tests/test_losses.py).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """float32 map of a binary ``mask`` (any shape; tumor where ``mask > 0.5``), in pixels.

    Outside the tumor: the distance to the nearest tumor pixel; inside: ``-(d - 1)`` with ``d`` the
    distance to the nearest background pixel (0 on the tumor's edge pixels, negative deeper in). A mask
    without an edge (empty or all tumor) gives zeros.
    """
    inside = np.asarray(mask) > 0.5
    if not inside.any() or inside.all():
        return np.zeros(inside.shape, np.float32)
    signed = ndimage.distance_transform_edt(~inside).astype(np.float32)
    # Inside distances within the tumor's bounding box grown by one pixel (within the image): that ring is
    # background and holds a pixel at least as near as any background pixel beyond it, so they are exact.
    box = tuple(slice(max(int(axis.min()) - 1, 0), int(axis.max()) + 2) for axis in np.nonzero(inside))
    depth = ndimage.distance_transform_edt(inside[box])
    signed[box] = np.where(inside[box], -(depth.astype(np.float32) - 1), signed[box])
    return signed


def signed_distance_maps(masks: torch.Tensor) -> torch.Tensor:
    """:func:`signed_distance_map` of every (sample, channel) of ``masks`` (N, C, *spatial): float32, same device."""
    source = masks.detach().cpu().numpy()
    maps = np.zeros(source.shape, np.float32)
    for index in np.ndindex(source.shape[:2]):
        maps[index] = signed_distance_map(source[index])
    return torch.from_numpy(maps).to(masks.device)
