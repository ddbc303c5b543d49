"""Slice dataset with an optional in-memory cache of decoded, resized slices."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from bts_lightning.data.discovery import SlicePair
from bts_lightning.data.io import (
    BYTE_THRESHOLD,
    GREY_LEVELS,
    GREY_LIMIT,
    UnreadableImageError,
    binarize_mask,
    mask_problem,
    read_grayscale,
    resize,
)
from bts_lightning.distance_maps import signed_distance_map
from bts_lightning.errors import DataError, format_names


def read_pair(pair: SlicePair) -> tuple[np.ndarray, np.ndarray]:
    """Decode one slice and its mask at full size, raising ValueError when their sizes differ."""
    image, mask = read_grayscale(pair.image), read_grayscale(pair.mask)
    if image.shape != mask.shape:
        raise ValueError(
            f"{pair.image.name} is {image.shape[1]}x{image.shape[0]} but its mask "
            f"{pair.mask.name} is {mask.shape[1]}x{mask.shape[0]}"
        )
    return image, mask


def load_pair(pair: SlicePair, size: int, threshold: int = BYTE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Read one slice and its mask, resize both to ``size`` and binarize the mask at ``threshold``."""
    image, mask = read_pair(pair)
    return resize(image, size, is_mask=False), binarize_mask(resize(mask, size, is_mask=True), threshold)


@dataclass
class Scan:
    """What :func:`scan_pairs` decoded: the largest raw value of every mask and, if kept, the resized slices.

    ``masks`` hold raw values (nearest-neighbour resizing commutes with thresholding), so they can be
    binarized once the dataset-wide rule is known.
    """

    mask_max: np.ndarray  # (N,) uint8
    images: np.ndarray | None  # (N, size, size) uint8
    masks: np.ndarray | None  # (N, size, size) uint8, not yet binarized


MASK_PROBLEMS = {
    "copy": "mask(s) identical to their image (images copied into masks/?)",
    "grey": (
        f"mask(s) with many grey levels, not binary tumor masks (over {GREY_LIMIT:.0%} of pixels strictly "
        f"between {GREY_LEVELS[0]} and {GREY_LEVELS[1]}; expected 0/255 or 0/1)"
    ),
}


def scan_pairs(pairs: Sequence[SlicePair], size: int, keep: bool) -> Scan:
    """Decode every pair once (threads), raising one :class:`DataError` listing all bad files.

    Bad files: unreadable, image/mask size mismatch, or a mask that is no tumor mask (:func:`mask_problem`).
    With ``keep`` the returned scan holds the resized slices for the in-memory cache.
    """
    mask_max = np.zeros(len(pairs), np.uint8)
    images = np.empty((len(pairs), size, size), np.uint8) if keep else None
    masks = np.empty((len(pairs), size, size), np.uint8) if keep else None
    unreadable: list[str] = []
    mismatched: list[str] = []
    bad_masks: dict[str, list[str]] = {problem: [] for problem in MASK_PROBLEMS}

    def scan(index: int) -> None:
        try:
            image, mask = read_pair(pairs[index])
        except UnreadableImageError as error:
            unreadable.append(str(error).split(":")[0])
            return
        except ValueError as error:
            mismatched.append(str(error))
            return
        if problem := mask_problem(mask, image):
            bad_masks[problem].append(str(pairs[index].mask))
        mask_max[index] = mask.max()
        if keep:
            images[index], masks[index] = resize(image, size, is_mask=False), resize(mask, size, is_mask=True)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(scan, range(len(pairs))))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable or corrupt file(s): {format_names(sorted(unreadable))}")
    if mismatched:
        problems.append(f"{len(mismatched)} image/mask size mismatch(es): {format_names(sorted(mismatched))}")
    for problem, names in bad_masks.items():
        if names:
            problems.append(f"{len(names)} {MASK_PROBLEMS[problem]}: {format_names(sorted(names))}")
    if problems:
        raise DataError("; ".join(problems) + ". Replace or remove these slices (image and mask together).")
    return Scan(mask_max, images, masks)


class SliceDataset(Dataset):
    """Slices ``indices`` of ``pairs`` as ``{"image": uint8 (1,H,W), "mask": uint8 (H,W), "index": int}``.

    Images stay uint8 until they reach the model's device, where they are normalised. ``cache`` holds
    binarized masks; without it masks are read from disk and binarized at ``threshold``
    (the dataset's :func:`~bts_lightning.data.io.mask_threshold`). With ``distance_maps`` samples also hold
    ``"distance"``: float32 (1,H,W), the :func:`~bts_lightning.distance_maps.signed_distance_map` of the
    (augmented) mask, for the boundary loss (computed here, in the loader workers).
    """

    def __init__(
        self,
        pairs: Sequence[SlicePair],
        indices: Sequence[int],
        image_size: int,
        transform: Callable[..., dict] | None = None,
        cache: tuple[np.ndarray, np.ndarray] | None = None,
        threshold: int = BYTE_THRESHOLD,
        distance_maps: bool = False,
    ) -> None:
        self.pairs = pairs
        self.indices = list(indices)
        self.image_size = image_size
        self.transform = transform
        self.cache = cache
        self.threshold = threshold
        self.distance_maps = distance_maps

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, resized (image, mask) of the ``position``-th slice, before augmentation."""
        index = self.indices[position]
        if self.cache is not None:
            return self.cache[0][index], self.cache[1][index]
        return load_pair(self.pairs[index], self.image_size, self.threshold)

    def stem(self, position: int) -> str:
        """File stem of the ``position``-th slice."""
        return self.pairs[self.indices[position]].stem

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        image, mask = self.load(position)
        if self.transform is not None:
            augmented = self.transform(image=image, mask=mask)
            image, mask = augmented["image"], augmented["mask"]
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "index": self.indices[position],
        }
        if self.distance_maps:
            sample["distance"] = torch.from_numpy(signed_distance_map(mask)).unsqueeze(0)
        return sample
