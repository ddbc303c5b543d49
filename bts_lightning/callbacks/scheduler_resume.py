"""The epoch's plateau-scheduler step that a checkpoint saved at the end of an epoch does not hold."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ResumeSchedulerStep(Callback):
    """Take, on resume, the ``ReduceLROnPlateau`` steps of the epoch a checkpoint was saved at.

    Lightning saves ``last.ckpt`` in ``on_train_epoch_end`` and steps epoch-interval schedulers after it; resuming
    from that checkpoint it replays the other schedulers' step but not a plateau scheduler's, whose monitored value a
    checkpoint does not keep, so a resumed run lowered its learning rate one epoch later than the uninterrupted run.
    This callback records, at each epoch end before the checkpoints are written, the epoch and the value each
    plateau scheduler steps on, and takes those steps when training resumes from it.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None  # {"epoch": N, "values": [metric or None per scheduler]}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Stopped before the epoch's last batch (max_time, max_steps): Lightning steps no scheduler for it. (Its own
        # test; a Lightning without it is taken as every epoch finishing.)
        if not getattr(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached", lambda: True)():
            self.pending = None
            return
        values = []
        for config in trainer.lr_scheduler_configs:
            value = trainer.callback_metrics.get(config.monitor) if config.reduce_on_plateau else None
            values.append(None if value is None else float(value))
        self.pending = {"epoch": trainer.current_epoch, "values": values}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pending, self.pending = self.pending, None
        if pending is None or trainer.current_epoch != pending["epoch"] + 1:  # a fresh run, or not from an epoch end
            return
        for config, value in zip(trainer.lr_scheduler_configs, pending["values"]):
            if not config.reduce_on_plateau or config.interval != "epoch" or (pending["epoch"] + 1) % config.frequency:
                continue
            if value is not None and math.isfinite(value):  # Lightning steps it only on the epochs that validate
                config.scheduler.step(value)

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict.get("pending")
