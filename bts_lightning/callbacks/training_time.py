"""Time spent fitting, kept in checkpoints: a resumed run reports the time of all its processes."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainingTime(Callback):
    """Seconds of ``trainer.fit`` (training and validation), summed over the processes of a resumed run.

    A checkpoint stores the seconds up to its save, so the time a killed process spent after its last checkpoint,
    which the resumed run repeats, is not counted twice.
    """

    def __init__(self) -> None:
        self.before = 0.0  # seconds of the processes before this one (from the checkpoint resumed)
        self.started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Seconds fitted so far, this process's included."""
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))
