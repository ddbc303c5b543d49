"""Resolve torchvision weight names and make sure their file is in the torch hub cache."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch.hub
from torchvision.models import WeightsEnum

from bts_lightning.errors import ConfigError, WeightsUnavailableError


def resolve_weights(enum: type[WeightsEnum], name: str) -> WeightsEnum:
    """Look up ``name`` (``"DEFAULT"`` or a member name) in a torchvision weights enum."""
    try:
        return enum[name]
    except KeyError:
        valid = ", ".join(enum.__members__)
        raise ConfigError(
            f"Unknown weights {name!r} for {enum.__name__}. Valid names: {valid} "
            "(or null for no pretrained weights)."
        ) from None


def cached_path(weights: WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``weights`` (honours TORCH_HOME)."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def ensure_cached(weights: WeightsEnum) -> Path:
    """Return the cached file of ``weights``, downloading it first if needed.

    Raises ``WeightsUnavailableError`` (telling where to put the file) if the download fails.
    ``torch.hub.download_url_to_file`` writes to a temporary file, so no partial file remains.
    """
    path = cached_path(weights)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None)
    except Exception as exc:  # noqa: BLE001 - any network, filesystem or hash failure
        raise WeightsUnavailableError(
            f"Pretrained weights {weights} are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}).\n"
            f"  Expected file: {path}\n"
            f"  Download it from: {weights.url}\n"
            f"Copy the file to that path (or set TORCH_HOME to a directory holding "
            f"checkpoints/{path.name}), or train from scratch with model.net.weights=null."
        ) from None
    return path
