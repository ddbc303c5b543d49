"""``data.neighbours``: each slice's scan neighbours as extra input channels (2.5D input).

With ``data.neighbours=K`` a network sees, for slice ``n`` of a scan, the ``data.channels`` of slices ``n - K`` to
``n + K`` of that scan, in that order (its own in the middle): ``len(channels) * (2K + 1)`` input channels. A scan
is a folder, and a slice's number the number its file name ends with (``TCGA_CS_4941_19960909_12.tif`` is slice 12
of folder ``TCGA_CS_4941_19960909``): :func:`slice_position`. A neighbour that is not there (past the first or last
slice, a gap in the numbers) is replaced by the nearest slice towards ``n`` that is, so a scan's end slices repeat
their own planes (replicate padding); a slice without a number repeats its own planes in every place.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bts_lightning.errors import ConfigError, DataError, format_names

SCAN_LAYOUTS = ("suffix",)  # layouts whose folders are scans (the LGG set: one folder per patient scan)
_TRAILING_NUMBER = re.compile(r"(\d+)$")

Position = tuple[str, int] | None  # (scan folder, slice number); None: not numbered, so without neighbours


def slice_position(path: str | Path) -> Position:
    """(scan, slice number) of a slice file: its folder and the number its stem ends with; ``None`` without one."""
    path = Path(path)
    found = _TRAILING_NUMBER.search(path.stem)
    return None if found is None else (str(path.parent), int(found.group(1)))


def check_neighbours(value: Any, key: str = "data.neighbours") -> int:
    """``value`` as a whole number >= 0; ``ConfigError`` naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r} is invalid: it must be a whole number >= 0 (how many slices before and "
                          "after each slice of its scan the network also sees; 0 = the slice alone).")
    return value


def window_size(neighbours: int) -> int:
    """How many slices one input holds: ``2 * neighbours + 1``."""
    return 2 * neighbours + 1


def position_index(positions: Sequence[Position], needs: str, fix: str) -> dict[tuple[str, int], int]:
    """The index (into ``positions``) of every slice position. Raises :class:`DataError` when two slices claim one
    position (one folder holding two scans whose numbers overlap): saying that ``needs`` (what reads the scan order)
    needs distinct numbers per folder, and ending with ``fix``."""
    at: dict[tuple[str, int], int] = {}
    clashes: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, position in enumerate(positions):
        if position is None:
            continue
        if position in at:
            clashes[position].append(index)
        else:
            at[position] = index
    if clashes:
        names = [f"{scan}: slice {number}" for scan, number in sorted(clashes)]
        raise DataError(f"{len(clashes)} slice number(s) occur more than once in one folder ({format_names(names)}); "
                        f"{needs} needs each folder to be one scan whose file names end with distinct slice numbers. "
                        f"Put each scan in its own folder, or {fix}.")
    return at


def neighbour_windows(positions: Sequence[Position], neighbours: int,
                      fix: str = "set data.neighbours=0") -> list[tuple[int, ...]]:
    """For every slice, the indices (into ``positions``) of slices ``n - K .. n + K`` of its scan, in that order.

    A missing slice is replaced by the nearest one towards ``n`` that is present; a slice without a position has
    only itself. Raises :class:`DataError` when two slices claim the same position (one folder holding two scans),
    ending with ``fix``.
    """
    at = position_index(positions, "a model with scan neighbours", fix)
    windows = []
    for index, position in enumerate(positions):
        if position is None:
            windows.append((index,) * window_size(neighbours))
            continue
        windows.append(tuple(_nearest(at, position, step, index) for step in range(-neighbours, neighbours + 1)))
    return windows


def _nearest(at: dict[tuple[str, int], int], position: tuple[str, int], step: int, own: int) -> int:
    """Index of the slice ``step`` away from ``position`` in its scan, else of the nearest one towards it, else ``own``."""
    scan, number = position
    for offset in range(step, 0, -1 if step > 0 else 1):
        if (scan, number + offset) in at:
            return at[(scan, number + offset)]
    return own


def stack_window(planes: Sequence[np.ndarray]) -> np.ndarray:
    """One network input of a window's (C, H, W) slices: (len(planes) * C, H, W), the slices' channels in order."""
    return np.concatenate(planes, axis=0)


def own_channel(neighbours: int, slice_channels: int) -> int:
    """Index, in a stacked input, of the first channel of the slice itself (what overlays are drawn on)."""
    return neighbours * slice_channels
