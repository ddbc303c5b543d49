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


# Module of each app -> its config (conf/<name>.yaml).
APPS = {"train": "train", "evaluate": "evaluate", "predict": "predict", "calibrate": "calibrate", "cascade": "cascade",
        "export": "export", "demo": "demo", "report": "report", "data.synthetic": "synthetic",
        "data.figshare_metadata": "figshare_metadata"}


def test_every_documented_command_passes_the_unknown_setting_check():
    """The check before Hydra knows each app's settings and those its experiments add (cross_data, ...): no command
    the README or the benchmark notes give is refused by it ([...] marks optional arguments there)."""
    import re
    import shlex

    from bts_lightning.runtime import unknown_setting
    from tests.conftest import REPO_ROOT

    commands = 0
    for document in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "benchmarks").glob("*.md"))]:
        text = document.read_text().replace("\\\n", " ")
        for found in re.finditer(r"python -m bts_lightning\.([a-z_.]+)([^\n`|#]*)", text):
            if found.group(1) not in APPS:
                continue
            arguments = [token.strip("[]") for token in shlex.split(found.group(2))]
            assert unknown_setting(APPS[found.group(1)], arguments) is None, (document.name, found.group(0))
            commands += 1
    assert commands > 80
    assert unknown_setting("train", ["experiment=cross_dataset", "cross_data.root=x"]) is None
    assert unknown_setting("train", ["-m", "experiment=cv,cross_dataset", "cross_evaluate.tta=true"]) is None
    for plus in ("", "+"):  # without the experiment that has it: Hydra's hint (+) led to another error
        assert unknown_setting("train", [f"{plus}cross_data.root=x"]) == (
            f"{plus}cross_data.root=x: cross_data is a setting of experiment=cross_dataset, which this command does not "
            f"choose; add experiment=cross_dataset{' (and leave out the +)' if plus else ''}.")
    assert unknown_setting("train", ["--config-dir", "my_conf", "--config-name=mine", "my_key=1"]) is None
    assert unknown_setting("train", ["logger=null"]) == ("logger=null: logger is a config group, whose value names "
                                                          "one of its options: csv, none, tensorboard.")
    from bts_lightning.runtime import unreadable_override
    assert unreadable_override(["-m", "model=unet,fcn", "input='Ünï dir/a.png'", "--config-name", "train"]) is None
    assert unreadable_override(["model=unet", "input=a, b=c.png"]).startswith("input=a, b=c.png cannot be read")
    assert unreadable_override(["input=it's, here.png"]).endswith(  # a value with ' is quoted with "
        "e.g. 'input=\"it's, here.png\"' (the outer ones for the shell).")
    assert unknown_setting("train", ["trainr.max_epochs=1"]).startswith("trainr.max_epochs=1: trainr is not a setting "
                                                                         "of train (did you mean trainer?)")


@pytest.mark.parametrize("app", [app for app in sorted(set(APPS.values())) if app != "train"])
def test_help_of_apps_without_config_groups_lists_their_settings_only(app):
    """Hydra's help lists every group under conf/ (model, loss, trainer...), which these apps refuse."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=app, return_hydra_config=True)
    assert "$APP_CONFIG_GROUPS" not in cfg.hydra.help.template and "$CONFIG" in cfg.hydra.help.template
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        assert "$APP_CONFIG_GROUPS" in compose(config_name="train", return_hydra_config=True).hydra.help.template


def test_a_group_option_whose_plugin_is_missing_names_the_extra(monkeypatch):
    import importlib.util

    from bts_lightning.runtime import missing_plugin

    assert missing_plugin(["hparams_search=optuna", "hydra/launcher=slurm"]) is None  # the dev install has both
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert missing_plugin(["hparams_search=optuna"]) == ("hparams_search=optuna needs the sweep extra: "
                                                         "pip install 'bts_lightning[sweep]'.")
    assert "pip install 'bts_lightning[slurm]'" in missing_plugin(["-m", "hydra/launcher=slurm"])
    assert missing_plugin(["model=unet"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: (_ for _ in ()).throw(ModuleNotFoundError(name)))
    assert missing_plugin(["hparams_search=optuna"]) is not None  # no hydra_plugins package at all
