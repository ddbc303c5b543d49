"""Slice dataset with an optional in-memory cache of decoded, resized slices."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from bts_lightning.data.channels import Channels
from bts_lightning.data.discovery import SlicePair
from bts_lightning.data.figshare_layout import MAT_SUFFIX, read_mat_slice
from bts_lightning.data.io import (
    BYTE_THRESHOLD,
    GREY_LEVELS,
    GREY_LIMIT,
    ChannelError,
    NonFiniteImageError,
    UnreadableImageError,
    binarize_mask,
    mask_problem,
    read_channels,
    read_mask,
    resize,
    to_channels,
)
from bts_lightning.data.neighbours import Position, own_channel, slice_position, stack_window
from bts_lightning.data.splits import slice_ids_digest
from bts_lightning.distance_maps import signed_distance_map
from bts_lightning.errors import ConfigError, DataError, format_names


def _named(path: Path) -> str:
    """``path`` by its folder and name (``images/1.png``, ``masks/1.png``), which tells an image from its mask."""
    return f"{path.parent.name}/{path.name}"


def read_pair(pair: SlicePair, channels: Channels = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one slice as (C, H, W) uint8 ``channels`` and its (H, W) uint8 mask, at full size.

    A Figshare ``.mat`` record is read from its file: the int16 image min-max scaled per slice (as any
    non-8-bit image), the mask 0/1 (``cjdata.tumorMask`` nonzero = tumor, whatever its type). Raises :class:`UnreadableImageError`, :class:`ChannelError`, or ValueError when
    the image and mask sizes differ.
    """
    if pair.image.suffix.lower() == MAT_SUFFIX:
        raw, raw_mask = read_mat_slice(pair.image)
        image, mask = to_channels(raw, channels), (raw_mask > 0).astype(np.uint8)
    else:
        image, mask = read_channels(pair.image, channels), read_mask(pair.mask)
    if image.shape[1:] != mask.shape:
        raise ValueError(
            f"{_named(pair.image)} is {image.shape[2]}x{image.shape[1]} but its mask "
            f"{_named(pair.mask)} is {mask.shape[1]}x{mask.shape[0]}"
        )
    return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize each channel of a (C, H, W) image to ``size`` x ``size`` (area/linear interpolation)."""
    return np.stack([resize(channel, size, is_mask=False) for channel in image])


def load_pair(
    pair: SlicePair, size: int, threshold: int = BYTE_THRESHOLD, channels: Channels = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one slice (C, size, size) and its mask (size, size), binarized at ``threshold``."""
    image, mask = read_pair(pair, channels)
    return resize_image(image, size), binarize_mask(resize(mask, size, is_mask=True), threshold)


@dataclass
class Scan:
    """What :func:`scan_pairs` decoded: the largest raw value of every mask, as read and as resized, and, if kept, the
    resized slices.

    ``masks`` hold raw values resized (:func:`~bts_lightning.data.io.resize`), so they can be binarized once the
    dataset-wide rule is known; ``sized_max`` says which are empty then (a tumor under half a pixel at the training
    size is gone), ``mask_max`` which rule the files follow.
    """

    mask_max: np.ndarray  # (N,) uint8, of the masks as read
    sized_max: np.ndarray  # (N,) uint8, of the masks resized to the training size
    images: np.ndarray | None  # (N, C, size, size) uint8
    masks: np.ndarray | None  # (N, size, size) uint8, not yet binarized


MASK_PROBLEMS = {
    "copy": "mask(s) identical to their image (images copied into masks/?)",
    "grey": (
        f"mask(s) with many grey levels, not binary tumor masks (over {GREY_LIMIT:.0%} of pixels strictly "
        f"between {GREY_LEVELS[0]} and {GREY_LEVELS[1]}; expected 0/255 or 0/1)"
    ),
}

# Distinct reasons an error lists file by file; beyond it (e.g. truncated files, each with its own byte counts) the
# files are listed together with one example reason.
MAX_REASONS = 3


def scan_pairs(pairs: Sequence[SlicePair], size: int, keep: bool, channels: Channels = None,
               key: str = "data.channels") -> Scan:
    """Decode every pair once (threads), raising one :class:`DataError` listing all bad files (``key``: the setting
    ``channels`` came from, named when an image lacks one).

    Bad files: unreadable, lacking a channel of ``channels``, image/mask size mismatch, or a mask that
    is no tumor mask (:func:`mask_problem`). With ``keep`` the returned scan holds the resized slices
    for the in-memory cache.
    """
    count = 1 if channels is None else len(channels)
    mask_max, sized_max = np.zeros(len(pairs), np.uint8), np.zeros(len(pairs), np.uint8)
    images = np.empty((len(pairs), count, size, size), np.uint8) if keep else None
    masks = np.empty((len(pairs), size, size), np.uint8) if keep else None
    unreadable: list[tuple[str, str]] = []  # (path, why)
    non_finite: list[str] = []
    lacking: dict[int, list[str]] = defaultdict(list)  # channel count -> image names
    mismatched: list[str] = []
    bad_masks: dict[str, list[str]] = {problem: [] for problem in MASK_PROBLEMS}

    def scan(index: int) -> None:
        try:
            image, mask = read_pair(pairs[index], channels)
        except NonFiniteImageError as error:
            non_finite.append(str(error).split(": ")[0])
            return
        except UnreadableImageError as error:
            message = str(error)
            path = next((str(f) for f in (pairs[index].image, pairs[index].mask) if message.startswith(f"{f}: ")),
                        str(pairs[index].image))
            unreadable.append((path, message.removeprefix(f"{path}: ")))
            return
        except ChannelError as error:
            lacking[error.count].append(pairs[index].image.name)
            return
        except ValueError as error:
            mismatched.append(str(error))
            return
        if problem := mask_problem(mask, image):
            bad_masks[problem].append(str(pairs[index].mask))
        resized = resize(mask, size, is_mask=True)
        mask_max[index], sized_max[index] = mask.max(), resized.max()
        if keep:
            images[index], masks[index] = resize_image(image, size), resized

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(scan, range(len(pairs))))
    problems = []
    reasons: dict[str, list[str]] = defaultdict(list)
    for path, why in unreadable:
        reasons[why].append(path)
    if len(reasons) > MAX_REASONS:  # e.g. truncated files, each with its own byte counts
        paths = sorted(path for path, _ in unreadable)
        problems.append(f"{len(paths)} unreadable file(s) ({format_names(paths)}), e.g. {min(unreadable)[1]}")
    else:
        for why, paths in sorted(reasons.items()):
            problems.append(f"{len(paths)} unreadable file(s) ({format_names(sorted(paths))}): {why}")
    if non_finite:
        problems.append(f"{len(non_finite)} float file(s) with NaN or infinite pixel values, whose scaling to 0-255 "
                        f"cannot be told: {format_names(sorted(non_finite))}")
    if lacking:
        names = sorted(name for group in lacking.values() for name in group)
        counts = " or ".join(map(str, sorted(lacking)))
        if len(names) == len(pairs):  # the setting, not the slices, is what to change
            raise ConfigError(f"{key}={list(channels or ())}: every image ({len(names)}) has {counts} channel(s); "
                              f"choose indices below {min(lacking)}, or gray.")
        problems.append(
            f"{len(names)} image(s) with {counts} channel(s), fewer than {key}={list(channels or ())} needs "
            f"(choose indices below {min(lacking)}, or gray): {format_names(names)}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} image/mask size mismatch(es): {format_names(sorted(mismatched))}")
    for problem, names in bad_masks.items():
        if names:
            problems.append(f"{len(names)} {MASK_PROBLEMS[problem]}: {format_names(sorted(names))}")
    if problems:
        raise DataError("; ".join(problems) + ". Replace or remove these slices (image and mask together).")
    return Scan(mask_max, sized_max, images, masks)


def _to_albumentations(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> what albumentations takes: (H, W) for one channel, else (H, W, C)."""
    return image[0] if len(image) == 1 else np.moveaxis(image, 0, -1)


def _from_albumentations(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)


class SliceDataset(Dataset):
    """Slices ``indices`` of ``pairs`` as ``{"image": uint8 (C,H,W), "mask": uint8 (H,W), "index": int}``.

    ``C`` is 1 for grayscale ``channels`` (``None``), else ``len(channels)``; with ``windows`` (one tuple of
    indices into ``pairs`` per pair, :func:`~bts_lightning.data.neighbours.neighbour_windows`) the image stacks
    the channels of its window's slices, ``C`` times the window's length, and the mask is the slice's own.
    Images stay uint8 until they reach the model's device, where they are normalised. ``cache`` holds (N, C, H, W) images and
    binarized masks; without it slices are read from disk and masks binarized at ``threshold`` (the
    dataset's :func:`~bts_lightning.data.io.mask_threshold`). With ``distance_maps`` samples also hold
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
        channels: Channels = None,
        distance_maps: bool = False,
        windows: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        self.pairs = pairs
        self.windows = windows
        self.indices = list(indices)
        self.image_size = image_size
        self.transform = transform
        self.cache = cache
        self.threshold = threshold
        self.channels = channels
        self.distance_maps = distance_maps

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, resized ((C, H, W) image, (H, W) mask) of the ``position``-th slice, before augmentation."""
        index = self.indices[position]
        if self.cache is not None:
            image, mask = self.cache[0][index], self.cache[1][index]
        else:
            image, mask = load_pair(self.pairs[index], self.image_size, self.threshold, self.channels)
        if self.windows is None:
            return image, mask
        return stack_window([image if other == index else self._image(other) for other in self.windows[index]]), mask

    @property
    def own_channel(self) -> int:
        """Index of the slice's own first channel in its image: the middle of its scan window (0 without one)."""
        if not self.windows:
            return 0
        return own_channel(len(self.windows[0]) // 2, 1 if self.channels is None else len(self.channels))

    def _image(self, index: int) -> np.ndarray:
        """The decoded, resized (C, H, W) image of pair ``index`` (a scan neighbour: its mask is not needed)."""
        if self.cache is not None:
            return self.cache[0][index]
        return resize_image(read_channels(self.pairs[index].image, self.channels), self.image_size)

    def scan_positions(self) -> list[Position]:
        """(scan folder, slice number) of every slice, in order (:func:`~bts_lightning.data.neighbours.slice_position`;
        ``None`` for a file without a number)."""
        return [slice_position(self.pairs[index].image) for index in self.indices]

    def stem(self, position: int) -> str:
        """Slice id of the ``position``-th slice."""
        return self.pairs[self.indices[position]].stem

    def files_digest(self) -> str:
        """SHA-256 of the resolved image paths of the slices (:func:`~bts_lightning.data.splits.slice_ids_digest`):
        the same slices read from the same files, whatever split settings chose them."""
        return slice_ids_digest(str(Path(self.pairs[index].image).resolve()) for index in self.indices)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        image, mask = self.load(position)
        if self.transform is not None:
            augmented = self.transform(image=_to_albumentations(image), mask=mask)
            image, mask = _from_albumentations(augmented["image"]), augmented["mask"]
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "index": self.indices[position],
        }
        if self.distance_maps:
            sample["distance"] = torch.from_numpy(signed_distance_map(mask)).unsqueeze(0)
        return sample


class CombinedSlices(ConcatDataset):
    """Several :class:`SliceDataset` as one (the train split plus ``data.negatives``), sharing one pipeline.

    :attr:`transform` is the first dataset's, which the others share, so loader workers can seed it
    (:func:`~bts_lightning.callbacks.reproducibility.seed_worker_transform`).
    """

    datasets: list[SliceDataset]

    @property
    def transform(self) -> Callable[..., dict] | None:
        return self.datasets[0].transform
