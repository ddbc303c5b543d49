"""Stop training when the loss turns NaN/inf, before any checkpoint of the broken weights is written."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bts_lightning.errors import BtsError


class TrainingDivergedError(BtsError):
    """The training loss became non-finite."""


class NonFiniteLossGuard(Callback):
    """Track non-finite training losses on the device; check on the host only every ``check_every`` steps
    before validation and at epoch end (ModelCheckpoint always runs after this callback), so there is no per-step sync.
    """

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = check_every
        self.bad_steps: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = (~torch.isfinite(loss.detach())).long()
        self.bad_steps = bad if self.bad_steps is None else self.bad_steps + bad
        if (batch_idx + 1) % self.check_every == 0:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bad_steps is None or int(self.bad_steps) == 0:
            return
        learning_rates = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
        kept = ("earlier best.ckpt/last.ckpt are intact" if any(
            getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
            for callback in trainer.checkpoint_callbacks) else "none was written before either")
        precision = str(trainer.precision)
        steadier = "" if precision.startswith("32") else (f" or a more stable precision (trainer.precision, now "
                                                          f"{precision}; e.g. 32-true or bf16-mixed)")
        raise TrainingDivergedError(
            f"The training loss became NaN/inf ({int(self.bad_steps)} step(s) by epoch {trainer.current_epoch}, "
            f"step {trainer.global_step}); training stopped and no checkpoint of these weights was written "
            f"({kept}). Try a lower learning rate (optimizer.lr, now "
            f"{', '.join(f'{lr:g}' for lr in learning_rates)}){steadier}."
        )
