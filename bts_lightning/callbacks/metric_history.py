"""Record validation metrics per epoch; kept in checkpoints so resumed runs keep their history."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class MetricHistory(Callback):
    """Append ``{"epoch": e, "step": s, "val/dice": ..., ...}`` after every (non-sanity) validation run.

    Read at ``on_validation_end``, after the module's ``on_validation_epoch_end`` logged its epoch-level
    scores (``val/dice_tumor``, ...), and before the checkpoint callbacks save this history. Every validation
    is a row, also several in one epoch (``trainer.val_check_interval`` < 1), as ``ModelCheckpoint`` compares
    them all; a validation run again at the same step (a resumed run) replaces its row.
    """

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        at = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        self.history = [row for row in self.history if (row["epoch"], row.get("step")) != (at["epoch"], at["step"])]
        self.history.append({**at, **values})

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
