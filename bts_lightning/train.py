"""Hydra app: ``python -m bts_lightning.train [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bts_lightning.callbacks import EpochSeed, MetricHistory, NonFiniteLossGuard
from bts_lightning.checkpoint import resolve_resume
from bts_lightning.errors import ConfigError
from bts_lightning.models import check_input_size
from bts_lightning.runtime import hydra_app, write_json_atomic
from bts_lightning.segmentation_module import SegmentationModule

log = logging.getLogger(__name__)

MONITOR = "val/dice"


def _instantiate_all(configs: DictConfig | None) -> list[Any]:
    return [instantiate(config) for config in (configs or {}).values() if config]


def check_epochs(trainer: DictConfig) -> None:
    """Raise ``ConfigError`` unless the run ends after at least one epoch (or step)."""
    if trainer.get("fast_dev_run"):
        return
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 and epochs in (None, -1):
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(
            f"trainer.max_epochs={epochs} must be a whole number >= 1 (0 would only test untrained weights, "
            "-1 never ends); early stopping (callbacks.early_stopping.patience) ends a run sooner."
        )


def split_summary(datamodule: Any) -> dict[str, Any]:
    """How the slices were split: method, whether patients may leak between subsets, subset sizes."""
    sizes = {f"n_{name}": len(dataset) for name, dataset in datamodule.datasets.items()}
    return {"method": datamodule.split.method, "leaky": datamodule.split.leaky, **sizes}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint when a test split exists, and write ``metrics.json``.

    ``metrics.json`` reports the best validation epoch (the epoch that chose ``best.ckpt``, so an
    optimistic score of the validation split), the last validation epoch, and the test scores of
    ``best.ckpt`` on the held-out test split when one exists.
    """
    output_dir = Path(cfg.paths.output_dir)
    check_epochs(cfg.trainer)
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    resume_from = resolve_resume(cfg.get("ckpt_path"), output_dir, model_config)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # validates every file before anything heavy starts
    module = SegmentationModule(cfg.model, cfg.loss, cfg.optimizer, cfg.get("scheduler"))
    check_input_size(module.net, datamodule.image_size, "data.image_size")
    history = MetricHistory()
    callbacks = [*_instantiate_all(cfg.get("callbacks")), history, EpochSeed(cfg.seed), NonFiniteLossGuard()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_instantiate_all(cfg.get("logger")) or False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    train_time = time.perf_counter() - started

    best = history.best(MONITOR)
    last = history.history[-1] if history.history else None
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None) == MONITOR), None)
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    tested = bool(cfg.get("test") and datamodule.has_test)
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "num_params": sum(p.numel() for p in module.parameters()),
        "epochs_trained": trainer.current_epoch,
        "train_time_s": round(train_time, 2),
        "split": split_summary(datamodule),
        "selection": {
            "monitor": MONITOR,
            "chosen_on": "val",
            "scored_on": "test" if tested else None,
            "note": "best_val_dice is the maximum over epochs on the split that chose best.ckpt (optimistic); "
            + ("test is best.ckpt scored on the held-out test split." if tested else "there is no test split."),
        },
        "best_val_dice": best[MONITOR] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "last_val_dice": last.get(MONITOR) if last else None,
        "last_val_iou": last.get("val/iou") if last else None,
        "last_epoch": last["epoch"] if last else None,
        "best_checkpoint": best_path,
        "val_history": history.history,
    }
    if tested:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        metrics["test"] = {key: float(value) for key, value in results[0].items()}
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        log.info("Best %s %s at epoch %s; metrics in %s", MONITOR, metrics["best_val_dice"], metrics["best_epoch"], output_dir)
    return metrics


# Entry point (``bts-train``); returns the best validation Dice, the value Hydra sweepers optimize.
main = hydra_app("train", train, result=lambda metrics: metrics["best_val_dice"])


if __name__ == "__main__":
    main()
