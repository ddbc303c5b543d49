"""Record validation metrics per epoch; kept in checkpoints so resumed runs keep their history."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class MetricHistory(Callback):
    """Append ``{"epoch": e, "val/dice": ..., ...}`` after every (non-sanity) validation run.

    Read at ``on_validation_end``, after the module's ``on_validation_epoch_end`` logged its epoch-level
    scores (``val/dice_tumor``, ...), and before the checkpoint callbacks save this history.
    """

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        self.history = [row for row in self.history if row["epoch"] != trainer.current_epoch]
        self.history.append({"epoch": trainer.current_epoch, **values})

    def best(self, key: str, mode: str = "max") -> dict[str, float] | None:
        """The first epoch with the best ``key`` (as ModelCheckpoint picks it), or None."""
        rows = [row for row in self.history if key in row]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda row: row[key])

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
