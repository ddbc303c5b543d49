"""Seed every epoch from (seed, epoch), so a resumed run replays the epochs an uninterrupted run sees."""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import Callback


class EpochSeed(Callback):
    """Before each training epoch, seed torch/numpy/random and the augmentation pipeline with ``seed + epoch``.

    Shuffling, augmentation (in the main process and in loader workers started that epoch) and
    dropout then depend only on the seed and the epoch number, not on what ran before: resuming
    from ``last.ckpt`` continues exactly as the uninterrupted run. (Persistent loader workers keep
    their own augmentation stream across epochs; use ``data.num_workers=0`` for bit-exact resumes.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def state_dict(self) -> dict[str, int]:
        """Kept in checkpoints, so a resume can check it continues with the same seed."""
        return {"seed": self.seed}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seed = self.seed + trainer.current_epoch
        L.seed_everything(epoch_seed, workers=True, verbose=False)
        transform = getattr(trainer.datamodule, "train_transform", None) if trainer.datamodule else None
        if transform is not None:
            transform.set_random_seed(epoch_seed)


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation pipeline its own seed.

    ``torch.initial_seed()`` in a worker is the loader's base seed (drawn from the seeded main
    process) plus the worker id, so it is reproducible and distinct per worker.
    """
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)
