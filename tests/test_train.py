"""End-to-end training through the Hydra app, in-process and as users run it."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bts_lightning.checkpoint import CheckpointError
from bts_lightning.errors import ConfigError
from bts_lightning.preprocessing import standardize
from bts_lightning.runtime import run_app
from bts_lightning.train import check_monitor, check_scheduler, never_improved_warning, train
from tests import fixtures_demo
from tests.conftest import REAL_DATA, compose_train, run_cli

readme_demo = fixtures_demo.readme_demo  # the pytest fixture, requested by name below

SMALL_SYNTHETIC = ["data=synthetic", "data.synthetic.n=40", "data.synthetic.size=64", "data.batch_size=8"]


def test_short_run_writes_checkpoints_tensorboard_and_metrics(tmp_path):
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "trainer.max_epochs=2"]
    cfg = compose_train([*overrides, "data.num_workers=0"], tmp_path / "run")
    metrics = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model"] == "unet" and saved["epochs_trained"] == 2 and saved["best_epoch"] in (0, 1)
    assert 0.0 <= saved["best_val_dice"] <= 1.0
    assert saved["best_val_dice"] == max(row["val/dice"] for row in saved["val_history"])
    assert set(saved["test"]) == {"test/dice", "test/iou", "test/loss", "test/dice_tumor", "test/sensitivity"}
    assert metrics["best_val_dice"] == saved["best_val_dice"]
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == saved["best_epoch"]
    assert checkpoint["hyper_parameters"]["net"]["name"] == "unet"
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss_epoch", "val/dice", "val/iou", "val/loss"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("lr-") for tag in events.Tags()["scalars"])
    assert "val/examples" in events.Tags()["images"]
    # Each epoch's panels sit at the step of its validation scores, so a picture lines up with its Dice.
    assert [image.step for image in events.Images("val/examples")] == [row.step for row in events.Scalars("val/dice")]


@pytest.mark.slow
def test_multirun_trains_all_four_architectures(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["bts_lightning.train", "-m", "model=unet,deeplabv3,fcn,lraspp", "data=synthetic", "data.synthetic.n=40",
         "data.synthetic.size=64", "debug=fast_dev_run",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        assert (job / ".hydra" / "config.yaml").is_file()
        models[json.loads((job / "metrics.json").read_text())["model"]] = job
    assert sorted(models) == ["deeplabv3", "fcn", "lraspp", "unet"]


@pytest.mark.slow  # a subprocess (~10 s); run_app's error path is quick-tested in-process
def test_bad_input_exits_with_one_clear_line_also_in_the_run_log(tmp_path):
    run = tmp_path / "run"
    result = run_cli(["bts_lightning.train", f"data.root={tmp_path / 'missing'}", "data.download=false",
                         "debug=fast_dev_run", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 2
    assert "error: Dataset root" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line in (run / "train.log").read_text()
    assert (result.stdout + result.stderr).count(line) == 1


def cache_fake_lraspp_weights() -> Path:
    """Random LR-ASPP weights where the torch hub cache expects the pretrained file (no download)."""
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

    from bts_lightning.models.weights import cached_path

    cached = cached_path(LRASPP_MobileNet_V3_Large_Weights.DEFAULT)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict(), cached)
    return cached


def frozen_lraspp_overrides(tmp_path: Path) -> list[str]:
    return [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
            "model=lraspp", "model.net.weights=DEFAULT", "model.freeze_backbone_epochs=1", "debug=limit", "test=false"]


def test_pretrained_backbone_is_frozen_for_the_first_epochs(tmp_path):
    cached = cache_fake_lraspp_weights()
    overrides = frozen_lraspp_overrides(tmp_path)
    first_conv = {}
    for epochs in (1, 2):
        cfg = compose_train([*overrides, f"trainer.max_epochs={epochs}"], tmp_path / f"run{epochs}")
        train(cfg)
        best = torch.load(tmp_path / f"run{epochs}" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        first_conv[epochs] = best["state_dict"]["net.backbone.0.0.weight"]
    saved = torch.load(cached, map_location="cpu")["backbone.0.0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(first_conv[1], saved), "backbone changed while frozen"
    assert not torch.equal(first_conv[2], saved), "backbone never unfroze"


class BackboneModeProbe(Callback):
    """Before each training step, compare the backbone as training runs it with the backbone in eval mode."""

    latest: BackboneModeProbe | None = None

    def __init__(self) -> None:
        self.same_as_eval: dict[int, list[bool]] = {}
        BackboneModeProbe.latest = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        backbone = pl_module.net.backbone
        modes = {name: module.training for name, module in backbone.named_modules()}
        images = standardize(batch["image"].float())
        with torch.no_grad():
            as_trained = backbone(images)  # feature maps by name
            backbone.eval()
            as_validated = backbone(images)
        for name, module in backbone.named_modules():
            module.train(modes[name])
        same = all(torch.equal(as_trained[key], as_validated[key]) for key in as_trained)
        self.same_as_eval.setdefault(trainer.current_epoch, []).append(same)


def test_frozen_backbone_trains_what_validation_scores(tmp_path):
    """A frozen backbone's BatchNorm uses its running statistics in training steps too (not batch statistics)."""
    cache_fake_lraspp_weights()
    cfg = compose_train([*frozen_lraspp_overrides(tmp_path), "trainer.max_epochs=2"], tmp_path / "run")
    with open_dict(cfg):
        cfg.callbacks.backbone_mode_probe = {"_target_": f"{__name__}.BackboneModeProbe"}
    train(cfg)
    probe = BackboneModeProbe.latest
    assert probe.same_as_eval[0] and all(probe.same_as_eval[0]), "frozen epoch trained with batch statistics"
    assert not any(probe.same_as_eval[1]), "released backbone should train with batch statistics"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "images").is_dir(), reason="real data not present")
def test_real_data_deeplabv3_mixed_precision_with_limits(tmp_path):
    result = run_cli(
        ["bts_lightning.train", "model=deeplabv3", "trainer.precision=bf16-mixed", "model.net.weights=null",
         f"data.root={REAL_DATA}", "debug=limit", "data.image_size=64", "data.batch_size=2",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model"] == "deeplabv3" and saved["best_val_dice"] is not None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_readme_demo_reaches_dice_0_7(readme_demo):
    """The README's offline demo, exactly as written (plus where to put its files); its time is in the README."""
    assert readme_demo.result.returncode == 0, readme_demo.result.stderr[-3000:]
    saved = json.loads((readme_demo.run_dir / "metrics.json").read_text())
    assert saved["best_val_dice"] >= 0.7


def test_checkpoint_records_the_training_image_size(tmp_path):
    from bts_lightning.checkpoint import training_image_size

    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                         "trainer.max_epochs=1", "data.num_workers=0", "data.image_size=48", "test=false"], tmp_path / "run")
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    copied = tmp_path / "elsewhere.ckpt"  # away from its run directory and .hydra/config.yaml
    copied.write_bytes(checkpoint.read_bytes())
    assert training_image_size(copied) == 48


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1 must be"),
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("optimizer.lr=-0.001", "optimizer.lr=-0.001"),
        ("data.image_size=40", "data.image_size=40 is not a multiple of 16"),
        ("monitor.metric=train/loss", "monitor.metric=train/loss must name a validation metric"),
        ("monitor.mode=up", "monitor.mode=up must be max"),
        ("monitor.metric=val/false_alarm", "monitor.metric=val/false_alarm must name a validation metric"),
        ("model.net.name=unetx", "Unknown model 'unetx'"),
        ("+model.aux_loss_weight=-0.4", "model.aux_loss_weight=-0.4 must be a number >= 0"),
        ("+model.presence_loss_weight=nan", "model.presence_loss_weight=nan must be a number >= 0"),
        ("model.net.num_classes=3", "model.net.num_classes=3: the network segments tumor against background, 2"),
        ("model.net.in_channels=3", "model.net.in_channels=3, but the data gives 1 channel"),
        ("callbacks.early_stopping.patience=abc", 'callbacks.early_stopping.patience="abc" is not a whole number'),
        ("model.freeze_backbone_epochs=-1", "model.freeze_backbone_epochs=-1 must be >= 0"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 must be a number >= 0"),
        ("seed=abc", 'seed="abc" is not a whole number'),
        ("seed=null", "seed=null is not a whole number"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 trains no batch"),
        ("trainer.limit_val_batches=0.0", "trainer.limit_val_batches=0.0 validates no batch"),
        ("trainer.max_steps=0", "trainer.max_steps=0 trains no step"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be a whole number >= 1"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be a fraction in"),
        ("callbacks.model_checkpoint.monitor=val/loss", ("callbacks.model_checkpoint.monitor=val/loss differs from "
                                                         "monitor.metric=val/dice")),
        ("callbacks.early_stopping.mode=min", "callbacks.early_stopping.mode=min differs from monitor.mode=max"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 must be a fraction"),
        ("trainer.check_val_every_n_epoch=31", ("trainer.check_val_every_n_epoch=31 validates on no epoch of "
                                               "trainer.max_epochs=30")),
    ],
)
def test_values_nothing_else_checks_are_config_errors(override, message, tmp_path):
    """Each before training starts (a misspelled monitor would otherwise stop the run after its first epoch)."""
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                         override], tmp_path / "run")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "data").exists()  # refused before the synthetic slices are generated


@pytest.mark.parametrize(("precision", "ran"), [("bf16-true", "bf16-true"), ("64-true", "64-true"),
                                               ("16-mixed", "bf16-mixed")])  # a CPU has no fp16 autocast
def test_true_precisions_train_in_the_weights_dtype(tmp_path, precision, ran):
    """Lightning converts the weights; the standardized float32 input follows them (it crashed in the first conv).
    metrics.json records the precision that ran."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "trainer.max_epochs=1", f"trainer.precision={precision}", "data.batch_size=2"]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    assert 0 <= metrics["test"]["test/dice"] <= 1 and metrics["precision"] == ran
    # debug=limit scores two batches of each split, and the note says so
    scored = {name: sum(metrics[f"{name}_slices"].values()) for name in ("val", "test")}
    for name in ("val", "test"):
        assert scored[name] < metrics["split"][f"n_{name}"]
        assert (f"The {name} scores cover {scored[name]} of its {metrics['split'][f'n_{name}']} slices "
                f"(trainer.limit_{name}_batches, overfit_batches or fast_dev_run)") in metrics["selection"]["note"]


def test_resume_needs_a_matching_readable_checkpoint(tmp_path):
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "trainer.max_epochs=1", "test=false", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]"]
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: there is no .*last\.ckpt"):
        train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "metrics.json").exists()

    train(compose_train(overrides, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"another network \(model\.net\.channels: \[8, 16, 32\] in the checkpoint"):
        train(compose_train([*overrides, "model.net.channels=[8,16,64]", "ckpt_path=last"], tmp_path / "run"))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.ckpt could not be read"):
        train(compose_train([*overrides, f"ckpt_path={truncated}"], tmp_path / "other"))
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        train(compose_train([*overrides, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"last.ckpt finished epoch 1 of trainer.max_epochs=1 already, so "
                                              r"resuming would train nothing: raise trainer.max_epochs"):
        train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))
    before = last.read_bytes()
    finished = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (tmp_path / "run" / "metrics.json").unlink()  # killed after its last epoch (in test or calibration)
    again = train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))  # finishes it, training nothing
    assert last.read_bytes() == before and json.loads((tmp_path / "run" / "metrics.json").read_text()) == again
    assert {key: value for key, value in again.items() if key != "train_time_s"} == \
        {key: value for key, value in finished.items() if key != "train_time_s"}
    (tmp_path / "run" / "metrics.json").unlink()  # and killed inside its last epoch, after that epoch's last.ckpt:
    (tmp_path / "run" / "checkpoints" / "fit_finished.json").unlink()  # its fit never ended
    with pytest.raises(CheckpointError, match=r"finished epoch 1 of trainer.max_epochs=1 already"):
        train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(again))  # refused resumes below must keep it
    for changed, message in (
        ("data.val_fold=3", "the train, val slices of the split (data.val_fold: 1 then, 3 now)"),
        ("data.image_size=32", "data.image_size: 64 then, 32 now"),
        ("optimizer=sgd", "optimizer._target_: 'torch.optim.AdamW' then, 'torch.optim.SGD' now"),
        ("optimizer.lr=0.1", "optimizer.lr: 0.002 then, 0.1 now"),
        ("loss=dice", "loss._target_: "),
        ("seed=1", "seed: 42 then, 1 now"),
    ):
        with pytest.raises(CheckpointError, match=r"last.ckpt: its run was trained with other settings \(.*"
                                                  + re.escape(message)):
            train(compose_train([*overrides, "trainer.max_epochs=2", changed, "ckpt_path=last"], tmp_path / "run"))
    assert last.read_bytes() == before  # refused before training
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_run_stopped_early_then_killed_is_finished_without_training(tmp_path):
    """Early stopping ends the fit before max_epochs: resuming such a run must not train on (and move best.ckpt)."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "test=false", "trainer.max_epochs=5", "callbacks.early_stopping.patience=1",
                 "+callbacks.early_stopping.min_delta=10"]  # never improves enough: stops after 2 epochs
    finished = train(compose_train(overrides, tmp_path / "run"))
    assert finished["epochs_trained"] == 2
    checkpoints = {path.name: path.read_bytes() for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt")}
    (tmp_path / "run" / "metrics.json").unlink()
    again = train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))
    assert again["epochs_trained"] == 2 and again["val_history"] == finished["val_history"]
    assert {path.name: path.read_bytes() for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt")} == checkpoints


def test_a_new_run_in_a_finished_runs_folder_is_refused(tmp_path):
    """It would replace that run's checkpoints, and until its own metrics.json the folder would show the old scores
    under the new config (``report``)."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "test=false", "trainer.max_epochs=1"]
    train(compose_train(overrides, tmp_path / "run"))
    kept = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()
            and ".hydra" not in path.parts and "tensorboard" not in path.parts}
    with pytest.raises(CheckpointError, match=r"run holds a training run already \(checkpoints/best.ckpt, "
                                              r"checkpoints/last.ckpt, metrics.json\), .* Resume it with ckpt_path=last"):
        train(compose_train([*overrides, "optimizer.lr=0.01"], tmp_path / "run"))
    train(compose_train(overrides, tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"run holds a training run already"):  # another run continued here
        train(compose_train([*overrides, "trainer.max_epochs=2",
                             f"ckpt_path={tmp_path / 'other' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "run"))
    assert {path: path.read_bytes() for path in kept} == kept


def test_finishing_a_finished_fit_keeps_its_marker_while_fitting(tmp_path, monkeypatch):
    """Under DDP the other ranks start inside ``Trainer.fit`` and run ``train`` again: they must still find
    fit_finished.json, or they refuse the resume (and the marker was gone for good)."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "test=false", "trainer.max_epochs=1"]
    train(compose_train(overrides, tmp_path / "run"))
    (tmp_path / "run" / "metrics.json").unlink()  # killed after fitting
    marker, seen, fit = tmp_path / "run" / "checkpoints" / "fit_finished.json", [], L.Trainer.fit

    def fit_seeing_the_marker(self, *args, **kwargs):
        seen.append(marker.is_file())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_seeing_the_marker)
    train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))
    assert seen == [True] and marker.is_file()


class StopAtEpoch(Callback):
    """Ctrl-C as epoch ``epoch`` starts: the run is killed after the previous epoch's last.ckpt."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("scheduler", [["scheduler=plateau", "scheduler.scheduler.patience=0", "monitor.mode=min"],
                                       ["scheduler=cosine"]])
def test_a_resumed_run_takes_the_scheduler_step_of_the_epoch_it_resumes_after(tmp_path, scheduler):
    """Lightning steps epoch schedulers after saving last.ckpt and skips that step on resume: the plateau scheduler
    (here lowering the learning rate every epoch) then acted one epoch late, so the resumed run's scores differed."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "test=false", "trainer.max_epochs=4", "callbacks.early_stopping.patience=10", *scheduler]
    straight = train(compose_train(overrides, tmp_path / "straight"))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train(compose_train([*overrides, "+callbacks.stop._target_=tests.test_train.StopAtEpoch",
                             "+callbacks.stop.epoch=2"], tmp_path / "resumed"))
    resumed = train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "resumed"))
    assert [row["val/dice"] for row in resumed["val_history"]] == [row["val/dice"] for row in straight["val_history"]]
    assert resumed["val_history"] == straight["val_history"]


def test_a_resume_removes_the_metrics_of_the_process_it_continues(tmp_path, monkeypatch):
    """Killed while resuming, a run must not keep a metrics.json that describes the earlier best.ckpt."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "test=false"]
    train(compose_train([*overrides, "trainer.max_epochs=1"], tmp_path / "run"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(L.Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        train(compose_train([*overrides, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=dice_ce_slice", "loss.terms.slice.pos_weight=0"],
     "error: bts_lightning.losses.SlicePresenceLoss refused its settings: pos_weight=0 must be > 0. Correct the override"),
    (["loss=dice_ce_slice", "loss.weights.slice=-1"],
     "error: bts_lightning.losses.WeightedLossSum refused its settings: weights.slice=-1 must be a number >= 0"),
    (["trainer.accelerator=mps"], ("error: lightning.pytorch.trainer.trainer.Trainer refused its settings: "
                                  "`MPSAccelerator` can not run on your system since the accelerator is not "
                                  "available")),
    (["debug=limit", "trainer.limit_train_batches=0.01"],  # refused by Lightning only when fitting starts
     "error: Lightning refused its settings: You requested to check 0.01 of the `train_dataloader`"),
    (["debug=limit", "trainer.val_check_interval=500"],  # more batches than an epoch has: refused when fitting starts
     ("error: Lightning refused its settings: `val_check_interval` (500) must be less than or equal to the number of "
     "the training batches (3).")),
    (["data.extra_augmentations=[{_target_: albumentations.NoSuchThing}]"],
     ("error: _target_: albumentations.NoSuchThing (at data.extra_augmentations0) cannot be imported: "
      "ModuleNotFoundError(\"No module named 'albumentations.NoSuchThing'\")")),
    (["data.extra_augmentations=[{_target_: bts_lightning.data.augment.TumorFreeCrop, p: 1.5}]"],
     ("error: bts_lightning.data.augment.TumorFreeCrop refused its settings: 1 validation error for InitSchema; p; "
      "Input should be less than or equal to 1")),
])
def test_a_constructor_refusing_a_setting_is_one_error_line(tmp_path, capsys, overrides, message):
    """Values checked where the config is instantiated: one line naming the class and why, exit status 2."""
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                         *overrides], tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_app(train, cfg)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1, error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_accelerator_the_machine_lacks_names_the_trainer_that_runs_without_one(tmp_path, capsys):
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer.accelerator=mps"],
                        tmp_path / "run")
    with pytest.raises(SystemExit):
        run_app(train, cfg)
    assert capsys.readouterr().err.endswith(
        "Correct the override (or config file) that sets it; trainer=default (accelerator=auto) or trainer=cpu runs "
        "without one.\n")


def test_callbacks_none_means_no_callbacks(tmp_path):
    """No checkpoints, history or example images; test scores the final weights and says so."""
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                         "trainer.max_epochs=1", "data.num_workers=0", "callbacks=none", "logger=csv"], tmp_path / "run")
    assert not cfg.get("callbacks")
    saved = train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert saved["best_checkpoint"] is None and saved["val_history"] == [] and saved["best_val_dice"] is None
    assert saved["selection"]["chosen_on"] is None and "final weights" in saved["selection"]["note"]
    assert saved["selection"]["note"].startswith("no checkpoint callback chose a best epoch; test is the final weights")
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # nor Lightning's own checkpoint in the logger's folder
    assert set(saved["test"]) == {"test/dice", "test/iou", "test/loss", "test/dice_tumor", "test/sensitivity"}


def test_logger_none_trains_without_logs_or_the_learning_rate_monitor(tmp_path, caplog):
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                         "trainer.max_epochs=1", "data.num_workers=0", "logger=none", "test=false"], tmp_path / "run")
    assert not cfg.logger and cfg.callbacks.lr_monitor
    with caplog.at_level(logging.INFO):
        saved = train(cfg)
    assert saved["best_epoch"] == 0 and "the learning-rate monitor, which writes to one, is left out" in caplog.text
    assert saved["selection"]["note"].endswith("not tested (test=false).") and saved["split"]["n_test"] > 0
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "csv").exists()


def test_one_monitor_key_drives_checkpoint_early_stopping_and_scheduler(tmp_path):
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                 "trainer.max_epochs=3", "data.num_workers=0", "test=false", "monitor.metric=val/loss",
                 "monitor.mode=min"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.callbacks.model_checkpoint.monitor == cfg.callbacks.early_stopping.monitor == "val/loss"
    assert cfg.callbacks.model_checkpoint.mode == cfg.model.scheduler.scheduler.mode == "min"
    assert cfg.model.scheduler.monitor == "val/loss"
    saved = train(cfg)
    losses = {row["epoch"]: row["val/loss"] for row in saved["val_history"]}
    assert saved["best_epoch"] == min(losses, key=losses.get)
    assert saved["selection"]["monitor"] == "val/loss" and saved["selection"]["mode"] == "min"
    best_row = next(row for row in saved["val_history"] if row["epoch"] == saved["best_epoch"])
    assert saved["best_val_dice"] == best_row["val/dice"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == saved["best_epoch"]


def test_a_monitor_mode_against_its_metric_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_monitor(OmegaConf.create({"metric": "val/dice", "mode": "min"})) == ("val/dice", "min")
    assert "monitor.mode=min with monitor.metric=val/dice" in caplog.text and "the usual mode is max" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_monitor(OmegaConf.create({"metric": "val/false_alarm_rate", "mode": "min"}))
    assert not caplog.text


def test_validating_every_second_epoch_steps_the_plateau_scheduler_on_those_epochs(tmp_path):
    """``ReduceLROnPlateau`` waits for a validation metric: it steps on the epochs that validate."""
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                         "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2", "data.num_workers=0",
                         "test=false", "scheduler=plateau"], tmp_path / "run")
    assert cfg.model.scheduler.monitor == "val/dice"
    saved = train(cfg)  # Lightning refused a step after epoch 0, which has no val/dice
    assert [row["epoch"] for row in saved["val_history"]] == [1] and saved["best_epoch"] == 1


def test_last_ckpt_holds_the_epochs_after_the_last_validation(tmp_path):
    """With ``check_val_every_n_epoch=2`` and 3 epochs, the third epoch trains after the last validation: last.ckpt
    must hold it (Lightning saves after validations only by default), so the fit's end can be finished from it."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                 "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "data.num_workers=0", "test=false"]
    finished = train(compose_train(overrides, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    marker = json.loads((checkpoints / "fit_finished.json").read_text())
    assert last["epoch"] == 2 and last["global_step"] == marker["global_step"] and marker["epochs"] == 3
    before = (checkpoints / "last.ckpt").read_bytes()
    (tmp_path / "run" / "metrics.json").unlink()  # killed after fitting
    again = train(compose_train([*overrides, "ckpt_path=last"], tmp_path / "run"))  # finishes without training
    assert (checkpoints / "last.ckpt").read_bytes() == before
    assert {key: value for key, value in again.items() if key != "train_time_s"} == \
        {key: value for key, value in finished.items() if key != "train_time_s"}


def test_several_validations_an_epoch_report_the_one_that_chose_best_ckpt(tmp_path):
    """With ``trainer.val_check_interval=0.5`` ModelCheckpoint compares every validation, so the history keeps each."""
    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "trainer.max_epochs=2",
                         "trainer.val_check_interval=0.5", "data.num_workers=0", "test=false"], tmp_path / "run")
    saved = train(cfg)
    history = saved["val_history"]
    epochs = [row["epoch"] for row in history]
    assert epochs.count(0) == epochs.count(1) >= 2 and len({row["step"] for row in history}) == len(history)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    chosen = next(row for row in history if row["step"] == checkpoint["global_step"])
    assert saved["best_val_dice"] == chosen["val/dice"] == max(row["val/dice"] for row in history)
    assert (saved["best_epoch"], saved["best_step"]) == (chosen["epoch"], chosen["step"])


def test_a_best_checkpoint_training_never_improved_on_is_warned_about():
    rows = [{"epoch": 0, "val/dice_tumor": 0.016}, {"epoch": 1, "val/dice_tumor": 0.0}, {"epoch": 2, "val/dice_tumor": 0.0}]
    warning = never_improved_warning(rows, rows[0], "val/dice_tumor")
    assert "epoch 0" in warning and "val/dice_tumor never beat its value there (0.016)" in warning
    assert "in the 2 validations after it" in warning and "Train it again" in warning
    assert never_improved_warning(rows[:2], rows[0], "val/dice_tumor") is None  # one later epoch: too early to say
    improved = [*rows, {"epoch": 3, "val/dice_tumor": 0.4}]
    assert never_improved_warning(improved, improved[3], "val/dice_tumor") is None
    assert never_improved_warning([], None, "val/dice_tumor") is None


def test_train_warns_when_the_monitor_never_beats_the_first_epoch(tmp_path, caplog):
    # Every synthetic slice has a tumor and an untrained network marks some pixel on each: val/sensitivity is 1 at
    # the first epoch and no later epoch can beat it.
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                 "trainer.max_epochs=3", "data.num_workers=0", "test=false", "monitor.metric=val/sensitivity"]
    with caplog.at_level("WARNING", logger="bts_lightning.train"):
        saved = train(compose_train(overrides, tmp_path / "run"))
    assert saved["val_history"][0]["val/sensitivity"] == 1.0 and saved["best_epoch"] == 0
    assert len(saved["val_history"]) == 3
    assert saved["selection"]["warning"] in caplog.messages
    assert "val/sensitivity never beat its value there (1)" in saved["selection"]["warning"]


def test_experiment_options_on_a_removed_entry_are_left_out_with_a_warning_or_refused(tmp_path, caplog):
    """experiment=empty_slices/presence set options of early stopping and of the plateau scheduler: with
    callbacks=none or scheduler=none those options are all that is left of the entry (no class), which crashed
    mid-training; a scheduler that refuses them (cosine: patience) crashed after the first epoch."""
    base = ["data=synthetic_empty", "data.synthetic.n=40", "data.synthetic.size=64", "data.image_size=64",
            f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0", "debug=limit",
            "trainer.max_epochs=1", "test=false"]
    with caplog.at_level(logging.WARNING):
        train(compose_train([*base, "experiment=presence", "callbacks=none", "scheduler=none",
                             "trainer.max_epochs=1"], tmp_path / "none"))
    assert "callbacks.early_stopping (patience=30) names no class (_target_): left out" in caplog.text
    assert "scheduler.scheduler (patience=8) names no class (_target_): no learning-rate scheduler" in caplog.text
    with pytest.raises(ConfigError, match=r"torch\.optim\.lr_scheduler\.CosineAnnealingLR refused its settings "
                                          r"\(.*patience=8\): .*patience"):
        train(compose_train([*base, "experiment=presence", "scheduler=cosine", "trainer.max_epochs=1"],
                            tmp_path / "cosine"))
    with pytest.raises(ConfigError, match=r"scheduler\.scheduler\.T_max=-1 must be a whole number >= 1"):
        train(compose_train([*base, "scheduler=cosine", "trainer.max_epochs=-1", "trainer.max_steps=4"],
                            tmp_path / "steps"))
    assert not (tmp_path / "cosine" / "checkpoints").exists() and not (tmp_path / "steps" / "checkpoints").exists()


def test_a_cosine_schedule_cut_short_by_max_steps_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        check_scheduler(compose_train([*SMALL_SYNTHETIC, "scheduler=cosine", "trainer.max_epochs=10",
                                       "trainer.max_steps=6"], tmp_path / "run"))
    assert "CosineAnnealingLR anneals over T_max=10 epochs, but trainer.max_steps=6 may end training sooner" in \
        caplog.text
    assert compose_train(["debug=overfit"], tmp_path / "overfit").scheduler.scheduler is None  # a constant rate


def test_settings_with_nothing_to_act_on_are_said(tmp_path, caplog):
    """Silently ignored before: freezing a backbone the network lacks; validation images without TensorBoard."""
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "debug=limit", "trainer.max_epochs=1", "test=false", "model.freeze_backbone_epochs=2", "logger=csv"]
    with caplog.at_level(logging.INFO):
        train(compose_train(overrides, tmp_path / "run"))
    assert "model.freeze_backbone_epochs=2 is ignored: this network has no pretrained backbone to freeze" in caplog.text
    assert "No TensorBoard logger: the validation images, which are written to it, are left out." in caplog.text
