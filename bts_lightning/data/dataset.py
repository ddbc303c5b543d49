"""Slice dataset with an optional in-memory cache of decoded, resized slices."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from bts_lightning.data.discovery import SlicePair
from bts_lightning.data.io import UnreadableImageError, binarize_mask, read_grayscale, resize
from bts_lightning.errors import DataError, format_names


def load_pair(pair: SlicePair, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one slice and its mask, check they match, and resize both to ``size``."""
    image, mask = read_grayscale(pair.image), read_grayscale(pair.mask)
    if image.shape != mask.shape:
        raise ValueError(
            f"{pair.image.name} is {image.shape[1]}x{image.shape[0]} but its mask "
            f"{pair.mask.name} is {mask.shape[1]}x{mask.shape[0]}"
        )
    return resize(image, size, is_mask=False), resize(binarize_mask(mask), size, is_mask=True)


def scan_pairs(pairs: Sequence[SlicePair], size: int, keep: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Decode every pair once (threads), raising one :class:`DataError` listing all bad files.

    Returns stacked ``(images, masks)`` uint8 arrays of shape (N, size, size) when ``keep``.
    """
    images = np.empty((len(pairs), size, size), np.uint8) if keep else None
    masks = np.empty((len(pairs), size, size), np.uint8) if keep else None
    unreadable: list[str] = []
    mismatched: list[str] = []

    def scan(index: int) -> None:
        try:
            image, mask = load_pair(pairs[index], size)
        except UnreadableImageError as error:
            unreadable.append(str(error).split(":")[0])
            return
        except ValueError as error:
            mismatched.append(str(error))
            return
        if keep:
            images[index], masks[index] = image, mask

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(scan, range(len(pairs))))
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable or corrupt file(s): {format_names(sorted(unreadable))}")
    if mismatched:
        problems.append(f"{len(mismatched)} image/mask size mismatch(es): {format_names(sorted(mismatched))}")
    if problems:
        raise DataError("; ".join(problems) + ". Replace or remove these slices (image and mask together).")
    return (images, masks) if keep else None


class SliceDataset(Dataset):
    """Slices ``indices`` of ``pairs`` as ``{"image": uint8 (1,H,W), "mask": uint8 (H,W), "index": int}``.

    Images stay uint8 until they reach the model's device, where they are normalised.
    """

    def __init__(
        self,
        pairs: Sequence[SlicePair],
        indices: Sequence[int],
        image_size: int,
        transform: Callable[..., dict] | None = None,
        cache: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.pairs = pairs
        self.indices = list(indices)
        self.image_size = image_size
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, resized (image, mask) of the ``position``-th slice, before augmentation."""
        index = self.indices[position]
        if self.cache is not None:
            return self.cache[0][index], self.cache[1][index]
        return load_pair(self.pairs[index], self.image_size)

    def stem(self, position: int) -> str:
        """File stem of the ``position``-th slice."""
        return self.pairs[self.indices[position]].stem

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        image, mask = self.load(position)
        if self.transform is not None:
            augmented = self.transform(image=image, mask=mask)
            image, mask = augmented["image"], augmented["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "index": self.indices[position],
        }
