"""Freeze a pretrained backbone for the first epochs, then train it."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning, Callback

from bts_lightning.models import backbone_of

log = logging.getLogger(__name__)


class BackboneFreeze(Callback):
    """Keep the backbone's parameters frozen for ``epochs`` epochs when pretrained weights were loaded.

    All parameters stay in the optimizer (frozen ones simply get no gradient), so schedulers and
    optimizer state are unaffected when the backbone is released.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backbone = backbone_of(pl_module.net)
        if self.epochs <= 0 or backbone is None or not pl_module.pretrained:
            return
        if trainer.current_epoch < self.epochs:
            BaseFinetuning.freeze(backbone, train_bn=False)
        else:
            if trainer.current_epoch == self.epochs:
                log.info("Unfreezing the pretrained backbone at epoch %d", trainer.current_epoch)
            BaseFinetuning.make_trainable(backbone)
