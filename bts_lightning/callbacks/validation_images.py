"""Log a fixed set of validation slices as image | truth | prediction | overlay panels."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from bts_lightning.visualize import panel, panel_grid


class ValidationImages(Callback):
    """Each validation epoch, add ``count`` evenly spaced validation slices to TensorBoard."""

    def __init__(self, count: int = 4, tag: str = "val/examples") -> None:
        self.count = count
        self.tag = tag

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        dataset = trainer.datamodule.datasets.get("val") if trainer.datamodule else None
        if logger is None or trainer.sanity_checking or not trainer.is_global_zero or not dataset:
            return
        positions = np.unique(np.linspace(0, len(dataset) - 1, min(self.count, len(dataset))).astype(int))
        slices = [dataset.load(int(p)) for p in positions]
        images = torch.stack([torch.from_numpy(image) for image, _ in slices])  # (N, C, H, W)
        predictions = (pl_module.predict_probabilities(images.to(pl_module.device)) > 0.5).cpu().numpy()
        own = dataset.own_channel  # the slice itself, not a scan neighbour (data.neighbours)
        grid = panel_grid([panel(image[own], mask, pred) for (image, mask), pred in zip(slices, predictions)])
        # The step Lightning logs this validation's scores at: the optimizer step of the batch before it ran.
        step = max(trainer.global_step - 1, 0)
        logger.experiment.add_image(self.tag, grid, global_step=step, dataformats="HWC")
