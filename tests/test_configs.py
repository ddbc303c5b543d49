"""Every option of every config group composes, and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.train import build_module
from tests.conftest import compose_train

GROUPS = ["data", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger", "debug", "experiment"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", "model.net.weights=null"], tmp_path)  # nothing to download
    module = build_module(cfg)
    assert module.net is not None
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    datamodule = instantiate(cfg.data)
    assert datamodule.image_size == cfg.data.image_size
    if cfg.trainer.accelerator in ("cpu", "auto"):
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("option", options("scheduler"))
def test_schedulers_build_on_the_optimizer(option, tmp_path):
    module = build_module(compose_train([f"scheduler={option}", "model=unet"], tmp_path))
    configured = module.configure_optimizers()
    if option == "none":
        assert isinstance(configured, torch.optim.Optimizer)
    else:
        assert isinstance(configured["optimizer"], torch.optim.AdamW)
        assert configured["lr_scheduler"]["interval"] == "epoch"


def test_command_line_style_overrides_reach_objects(tmp_path):
    cfg = compose_train(["model=deeplabv3", "model.net.weights=null", "optimizer=sgd", "optimizer.lr=0.05",
                         "trainer.precision=16-mixed"], tmp_path)
    assert cfg.model.net.name == "deeplabv3" and cfg.model.net.weights is None
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05
    assert cfg.trainer.precision == "16-mixed"


def test_experiment_sets_the_notebook_recipe(tmp_path):
    cfg = compose_train(["experiment=deeplabv3_transfer"], tmp_path)
    assert cfg.model.net.name == "deeplabv3" and cfg.model.net.weights == "DEFAULT"
    assert cfg.loss._target_ == "monai.losses.DiceLoss" and cfg.trainer.precision == "16-mixed"


def test_the_presence_experiment_is_the_measured_cascade_presence_training(tmp_path):
    """experiment=presence: the overrides benchmarks/cascade_cv.sh was measured with (PRESENCE_EXTRA included)."""
    measured = ["experiment=empty_slices", "trainer.max_epochs=120", "callbacks.early_stopping.patience=30",
                "scheduler.scheduler.patience=8", "loss=dice_ce_slice_tumor", "monitor.metric=val/loss",
                "monitor.mode=min"]
    for data in ("data=lgg", "data=synthetic_empty"):
        experiment = compose_train(["experiment=presence", data], tmp_path)
        assert experiment == compose_train([*measured, data], tmp_path)
    assert experiment.loss.terms.keys() >= {"slice"} and experiment.monitor.metric == "val/loss"
