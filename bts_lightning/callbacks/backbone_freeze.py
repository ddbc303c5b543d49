"""Freeze a pretrained backbone for the first epochs, then train it."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bts_lightning.models import backbone_of

log = logging.getLogger(__name__)


def freeze(backbone: nn.Module) -> None:
    """No gradients for ``backbone`` and its BatchNorm layers in eval mode.

    In eval mode BatchNorm normalizes with its (pretrained) running statistics in training steps
    too, so the frozen backbone computes the same function in training and validation.
    (Lightning's ``BaseFinetuning.freeze(train_bn=False)`` instead stops tracking statistics but
    leaves the layers in train mode: training sees batch statistics, validation the stale ones.)
    """
    backbone.requires_grad_(False)
    for module in backbone.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def release(backbone: nn.Module) -> None:
    """Undo :func:`freeze`: gradients on and every layer in train mode."""
    backbone.requires_grad_(True)
    backbone.train()


class BackboneFreeze(Callback):
    """Keep the backbone frozen (see :func:`freeze`) for ``epochs`` epochs when pretrained weights were loaded.

    ``epochs=None`` (the default) takes the module's ``freeze_backbone_epochs`` hyperparameter
    (``model.freeze_backbone_epochs``, which each model config sets for its network).

    All parameters stay in the optimizer (frozen ones simply get no gradient), so schedulers and
    optimizer state are unaffected when the backbone is released. Lightning restores each layer's
    mode after validation, so the frozen BatchNorm layers stay in eval mode for the whole epoch.
    """

    def __init__(self, epochs: int | None = None) -> None:
        self.epochs = epochs

    def _epochs(self, pl_module: L.LightningModule) -> int:
        return self.epochs if self.epochs is not None else int(pl_module.hparams.get("freeze_backbone_epochs", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say once when the setting has nothing to act on, rather than ignore it silently."""
        epochs, backbone = self._epochs(pl_module), backbone_of(pl_module.net)
        if epochs > 0 and trainer.is_global_zero and (backbone is None or not pl_module.pretrained):
            log.warning("model.freeze_backbone_epochs=%d is ignored: %s.", epochs,
                        "this network has no pretrained backbone to freeze" if backbone is None else
                        "no pretrained weights were loaded (model.net.weights)")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = self._epochs(pl_module)
        backbone = backbone_of(pl_module.net)
        if epochs <= 0 or backbone is None or not pl_module.pretrained:
            return
        if trainer.current_epoch < epochs:
            freeze(backbone)
        else:
            if trainer.current_epoch == epochs:
                log.info("Unfreezing the pretrained backbone at epoch %d", trainer.current_epoch)
            release(backbone)
