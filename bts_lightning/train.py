"""Hydra app: ``python -m bts_lightning.train [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bts_lightning.callbacks import EpochSeed, MetricHistory, NonFiniteLossGuard
from bts_lightning.runtime import run_app, write_json_atomic
from bts_lightning.segmentation_module import SegmentationModule

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
MONITOR = "val/dice"


def _instantiate_all(configs: DictConfig | None) -> list[Any]:
    return [instantiate(config) for config in (configs or {}).values() if config]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint when a test split exists, and write ``metrics.json``."""
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # validates every file before anything heavy starts
    module = SegmentationModule(cfg.model, cfg.loss, cfg.optimizer, cfg.get("scheduler"))
    history = MetricHistory()
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*_instantiate_all(cfg.get("callbacks")), history, EpochSeed(cfg.seed), NonFiniteLossGuard()], logger=_instantiate_all(cfg.get("logger")) or False
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_time = time.perf_counter() - started

    best = history.best(MONITOR)
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None) == MONITOR), None)
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "num_params": sum(p.numel() for p in module.parameters()),
        "epochs_trained": trainer.current_epoch,
        "train_time_s": round(train_time, 2),
        "best_val_dice": best[MONITOR] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "best_checkpoint": best_path,
        "val_history": history.history,
    }
    if cfg.get("test") and datamodule.has_test:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        metrics["test"] = {key: float(value) for key, value in results[0].items()}
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        log.info("Best %s %s at epoch %s; metrics in %s", MONITOR, metrics["best_val_dice"], metrics["best_epoch"], output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns the best validation Dice (the value Hydra sweepers optimize)."""
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    return run_app(train, cfg)["best_val_dice"]


if __name__ == "__main__":
    main()
