"""Crash-safe checkpoint files: the Lightning ``CheckpointIO`` of every training run (``conf/trainer/default.yaml``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bts_lightning.runtime import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose saves never leave a partial or empty checkpoint.

    Lightning's own save writes a temporary file in the system temp folder and moves it, which
    across filesystems copies over the previous file: a SIGKILL or a full disk during that copy
    truncates ``last.ckpt``. Here ``torch.save`` writes a temporary file in the checkpoint's own
    folder that is flushed to disk and renamed over the target (:func:`~bts_lightning.runtime.atomic_path`),
    so the file is always the previous or the new checkpoint, and nothing is written elsewhere.
    A failed write (full disk, folder not writable) raises :class:`~bts_lightning.errors.OutputError`
    naming the file. Loading and removing are Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to local file ``path`` atomically (``storage_options`` is not supported)."""
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # raises Lightning's TypeError
            return
        with atomic_path(path) as temporary, temporary.open("wb") as stream:
            torch.save(checkpoint, stream)
