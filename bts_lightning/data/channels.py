"""``data.channels``: which image channels a network sees, and how many (the ``bts.channel_count`` resolver).

``gray`` converts every image to one grayscale channel (the default). A list of channel indices in the
file's own order (RGB for 3-channel TIFF/PNG, not OpenCV's BGR) keeps those channels, in that order:
``[1]`` is FLAIR in the LGG set (channels: T1 pre-contrast, FLAIR, T1 post-contrast), ``[0, 1, 2]`` all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bts_lightning.data.neighbours import check_neighbours, window_size
from bts_lightning.errors import ConfigError

GRAY = "gray"

Channels = tuple[int, ...] | None  # parsed data.channels: None = gray


def parse_channels(value: Any, key: str = "data.channels") -> Channels:
    """``None`` for ``"gray"``, else the tuple of distinct non-negative channel indices of list ``value``.

    Raises:
        ConfigError: anything else (an empty list, a bare number, repeated or negative indices), naming ``key``.
    """
    if value == GRAY:
        return None
    usage = "it must be gray or a list of channel indices in file order, e.g. [1] or [0,1,2]"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        hint = f" (for channel {value} alone write [{value}])" if isinstance(value, int) else ""
        raise ConfigError(f"{key}={value!r} is invalid: {usage}{hint}.")
    indices = list(value)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices) or len(set(indices)) < len(indices):
        raise ConfigError(f"{key}={indices!r} is invalid: {usage}, each index a whole number >= 0 at most once.")
    return tuple(indices)


def channel_count(value: Any, neighbours: Any = 0) -> int:
    """How many channels ``data.channels`` gives the network: 1 for ``gray``, else the list's length; times the
    ``2 * neighbours + 1`` slices of each input with ``data.neighbours`` (:mod:`bts_lightning.data.neighbours`).

    Registered as the OmegaConf resolver ``bts.channel_count`` on ``import bts_lightning``, so model
    configs say ``in_channels: ${bts.channel_count:${data.channels},${data.neighbours}}``.
    """
    channels = parse_channels(value)
    return (1 if channels is None else len(channels)) * window_size(check_neighbours(neighbours))


def channels_setting(channels: Channels) -> str | list[int]:
    """The parsed ``channels`` as the config value that gives them (``"gray"`` or a list)."""
    return GRAY if channels is None else list(channels)


def describe_channels(channels: Channels) -> str:
    """What a network sees of each file, for messages: ``channel [1] of each file (file order)``."""
    if channels is None:
        return "each file converted to grayscale"
    return f"channel{'s' if len(channels) > 1 else ''} {list(channels)} of each file (file order)"
