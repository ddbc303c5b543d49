"""Read slices (as uint8 channels) and masks (as 8-bit grayscale) from disk."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from bts_lightning.data.channels import Channels
from bts_lightning.visualize import to_uint8

BINARY_THRESHOLD = 0  # masks with values in {0, 1}: tumor = 1
BYTE_THRESHOLD = 127  # 8-bit 0-255 masks (other depths are min-max scaled to 0-255 on reading)
GREY_LEVELS, GREY_LIMIT = (32, 223), 0.05  # a mask with over 5 % of pixels strictly in between is not binary
MIN_IMAGE_SIZE = 32  # smallest side slices are resized to for a network (data.image_size, predict image_size)
_FILE_ORDER = {3: [2, 1, 0], 4: [2, 1, 0, 3]}  # OpenCV's BGR(A) -> the file's RGB(A)
_TO_GRAY = {3: cv2.COLOR_RGB2GRAY, 4: cv2.COLOR_RGBA2GRAY}
# OpenCV's own warnings on a damaged file ("PNG input buffer is incomplete") would come before the error that names it.
cv2.utils.logging.setLogLevel(min(cv2.utils.logging.getLogLevel(), cv2.utils.logging.LOG_LEVEL_ERROR))


class UnreadableImageError(ValueError):
    """A file could not be decoded as an image."""


class NonFiniteImageError(UnreadableImageError):
    """A float image holds NaN or infinite values: its scaling to 0-255 cannot be told."""


def check_finite(image: np.ndarray, path: str | Path) -> np.ndarray:
    """``image`` itself; :class:`NonFiniteImageError` naming ``path`` when it is a float array with NaN or inf."""
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise NonFiniteImageError(f"{path}: holds NaN or infinite pixel values")
    return image


class ChannelError(ValueError):
    """An image lacks a channel that ``data.channels`` asks for; ``count`` is how many channels it has."""

    def __init__(self, count: int, channels: tuple[int, ...]) -> None:
        super().__init__(f"has {count} channel(s), data.channels={list(channels)} needs {max(channels) + 1}")
        self.count = count


def decode(path: str | Path) -> np.ndarray:
    """Decode any common format (8/16-bit, float, gray/RGB/RGBA) as stored: 2-D, or (H, W, C) in file (RGB) order."""
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as error:  # e.g. a header claiming more pixels than OpenCV decodes (CV_IO_MAX_IMAGE_PIXELS)
        check = re.search(r"error: \([^)]*\) (.*?)(?: in function|$)", str(error), re.MULTILINE)
        raise UnreadableImageError(f"{path}: not a readable image (OpenCV refused its header"
                                   f"{f': {check[1]}' if check else ''}: corrupt, or more pixels than it decodes)") \
            from None
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if Path(path).suffix.lower() in (".tif", ".tiff") and (pages := cv2.imcount(str(path))) > 1:
        raise UnreadableImageError(f"{path}: holds {pages} pages (a volume or a stack), not one slice; save each slice "
                                   "as its own image file")
    if image.ndim == 3 and image.shape[2] in _FILE_ORDER:
        image = image[..., _FILE_ORDER[image.shape[2]]]
    return check_finite(image, path)


def to_channels(image: np.ndarray, channels: Channels) -> np.ndarray:
    """(C, H, W) uint8 of a decoded 2-D or (H, W, C) file-order ``image``: grayscale (``None``) or ``channels``.

    Grayscale converts RGB(A) with OpenCV's luma weights. Non-8-bit values (16-bit, int16, float) are
    min-max scaled to 0-255 per slice, over the kept channels together (their relative scale is kept).
    Raises :class:`ChannelError` when ``image`` lacks one of ``channels``.
    """
    if channels is None:
        if image.ndim == 3 and image.shape[2] in _TO_GRAY:
            if image.dtype not in (np.uint8, np.uint16, np.float32):  # int16, float64, ...: OpenCV converts none
                image = image.astype(np.float32)
            image = cv2.cvtColor(np.ascontiguousarray(image), _TO_GRAY[image.shape[2]])
        elif image.ndim == 3:
            image = image.mean(axis=2).astype(image.dtype)  # 1, 2 or 5+ channels: no standard luma; their mean
        planes = image[None]
    else:
        stack = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        if max(channels) >= len(stack):
            raise ChannelError(len(stack), channels)
        planes = stack[list(channels)]
    return np.ascontiguousarray(planes if planes.dtype == np.uint8 else to_uint8(planes))


def read_channels(path: str | Path, channels: Channels) -> np.ndarray:
    """Decode an image file into (C, H, W) uint8: see :func:`to_channels`."""
    return to_channels(decode(path), channels)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file of any common format (8/16-bit, float, gray/RGB/RGBA) into a 2-D uint8 array.

    A colour mask's value at a pixel is its brightest colour channel: a tumor drawn in red or blue, dark in luma
    (76, 29), stays 255. With an alpha plane (gray + alpha, RGBA), transparent pixels are 0 whatever their colour,
    and a mask whose colours are all 0 is its alpha plane. Non-8-bit masks are min-max scaled to 0-255.
    """
    mask = decode(path)
    if mask.ndim == 3 and mask.shape[2] in (2, 4):
        colour, alpha = mask[..., :-1].max(axis=2), mask[..., -1]
        mask = np.where(alpha > 0, colour, 0).astype(mask.dtype) if colour.any() else alpha
    elif mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask if mask.dtype == np.uint8 else to_uint8(mask)


def mask_threshold(largest_value: int) -> int:
    """Dataset-wide mask rule from the largest value of all its masks: 0/1 masks when it is at most 1, else 0-255.

    Deciding per dataset, not per mask, keeps a tumor-free mask with a few faint noise pixels empty.
    """
    return BINARY_THRESHOLD if largest_value <= 1 else BYTE_THRESHOLD


def binarize_mask(mask: np.ndarray, threshold: int) -> np.ndarray:
    """Tumor = value above ``threshold`` (see :func:`mask_threshold`); returns uint8 {0, 1}."""
    return (mask > threshold).astype(np.uint8)


def mask_problem(mask: np.ndarray, image: np.ndarray) -> str | None:
    """Why decoded ``mask`` cannot be the tumor mask of (C, H, W) ``image`` ("copy" or "grey"), else ``None``.

    "copy": the mask equals (a channel of) its image and is not constant. "grey": over 5 % of its pixels lie strictly
    between 32 and 223. JPEG-compressed binary masks stay below that (edge ringing: under 1 % at
    quality 50 from 64x64 up, 4.2 % at worst for a 32x32 mask at quality 10); MRI slices are far
    above it (20 % or more of the real slices).
    """
    if mask.min() != mask.max() and any(np.array_equal(mask, channel) for channel in image):
        return "copy"
    grey = np.count_nonzero((mask > GREY_LEVELS[0]) & (mask < GREY_LEVELS[1]))
    return "grey" if grey > GREY_LIMIT * mask.size else None


def resize(image: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """Resize to ``size`` x ``size``. Shrinking: area interpolation, for images and masks alike. Enlarging: linear for
    images, the source pixel under each pixel's centre for masks (``INTER_NEAREST_EXACT``).

    A mask keeps its raw values' scale (0/1 or 0/255, read as tumor above the dataset's :func:`mask_threshold`), so
    :func:`binarize_mask` then marks the pixels that are tumor over at least half of their area (OpenCV rounds a
    half-covered pixel up: 128 of 255, 1 of 1), where the image shows them. Nearest-neighbour shrinking cannot: at an even factor it samples one side of each pixel's centre, which
    put a 256 px mask 0.375 px (at 64 px) below and right of its image (OpenCV's ``INTER_NEAREST``), 0.25 px above and
    left at 128 px (``INTER_NEAREST_EXACT``).
    """
    if image.shape == (size, size):
        return image
    if image.shape[0] > size:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_NEAREST_EXACT if is_mask else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)
