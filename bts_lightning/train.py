"""Hydra app: ``python -m bts_lightning.train [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from bts_lightning.calibrate import (
    calibrate_checkpoint,
    check_enough_empty,
    check_settings,
    check_target_on_setting,
    reached_line,
    warn_if_chance,
)
from bts_lightning.callbacks import MetricHistory, TrainingTime, ValidationImages
from bts_lightning.checkpoint import (
    FIT_FINISHED_NAME,
    check_new_run_dir,
    check_resume_settings,
    mark_fit_finished,
    resolve_resume,
)
from bts_lightning.cross_dataset import check_cross_data, checkpoint_to_score, evaluate_across, evaluation_row
from bts_lightning.data.channels import channels_setting
from bts_lightning.data.neighbours import window_size
from bts_lightning.errors import ConfigError, first_line
from bts_lightning.evaluate import evaluate
from bts_lightning.inference import load_predictor
from bts_lightning.losses import uses_distance_maps
from bts_lightning.metrics import SLICE_SCORES, VAL_DICE, VAL_IOU
from bts_lightning.models import check_input_size
from bts_lightning.runtime import (
    as_number,
    flag_setting,
    hydra_app,
    keep_run_record,
    number_setting,
    user_error_of,
    write_json_atomic,
)
from bts_lightning.segmentation_module import SegmentationModule, data_settings_of

log = logging.getLogger(__name__)

MONITOR_MODES = ("max", "min")
# The metrics monitor.metric can name (what validation logs), each with the direction it improves in.
NATURAL_MODES = {VAL_DICE: "max", VAL_IOU: "max", "val/loss": "min", "val/dice_tumor": "max", "val/sensitivity": "max",
                 "val/false_alarm_rate": "min"}
# Pixel threshold the slice decision is calibrated at after training (the apps' default threshold).
DECISION_PIXEL_THRESHOLD = 0.5


def _instantiate_all(configs: DictConfig | None, group: str) -> list[Any]:
    """The objects of group ``group``'s nodes (``callbacks``, ``logger``). A node that names no class (``_target_``)
    only holds options an experiment or override gave an entry that ``callbacks=none`` or a debug config removed
    (e.g. ``experiment=empty_slices callbacks=none``): it is left out, with a warning naming it."""
    built = []
    for name, config in (configs or {}).items():
        if not config:
            continue
        if isinstance(config, DictConfig) and "_target_" not in config:
            log.warning("%s.%s (%s) names no class (_target_): left out. Its options come from an experiment or "
                        "override, on an entry that %s=none or a debug config removed.", group, name,
                        ", ".join(f"{key}={value}" for key, value in config.items()), group)
            continue
        built.append(instantiate(config))
    return built


def check_scheduler(cfg: DictConfig) -> None:
    """Check ``cfg.scheduler`` before training (its errors came after the first epoch, as tracebacks).

    A ``scheduler.scheduler`` node without ``_target_`` (options an experiment gives a scheduler that
    ``scheduler=none`` removed) is dropped with a warning; one that its class refuses (an option another scheduler
    takes, e.g. ``patience`` for ``scheduler=cosine``) or a ``T_max`` that is not a whole number >= 1 (``cosine`` with
    ``trainer.max_epochs=-1``) is a ``ConfigError``.
    """
    node = (cfg.get("scheduler") or {}).get("scheduler")
    if not node:
        return
    options = ", ".join(f"{key}={value}" for key, value in node.items() if not str(key).startswith("_"))
    if "_target_" not in node:
        log.warning("scheduler.scheduler (%s) names no class (_target_): no learning-rate scheduler. Its options come "
                    "from an experiment or override, on a scheduler that scheduler=none (or a debug config) removed.", options)
        cfg.scheduler = None
        return
    t_max = node.get("T_max")
    if "T_max" in node and not (isinstance(t_max, int) and t_max >= 1):
        raise ConfigError(f"scheduler.scheduler.T_max={t_max} must be a whole number >= 1 (the epochs to anneal over; "
                          "cosine takes trainer.max_epochs): set trainer.max_epochs, or scheduler.scheduler.T_max.")
    steps = cfg.trainer.get("max_steps")
    if "T_max" in node and _is_number(steps) and steps > 0:
        log.warning("%s anneals over T_max=%s epochs, but trainer.max_steps=%s may end training sooner, the learning "
                    "rate part-way down: set scheduler.scheduler.T_max to the epochs those steps take.",
                    node["_target_"].rsplit(".", 1)[-1], t_max, steps)
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        instantiate(node)(stand_in)
    except Exception as error:  # noqa: BLE001 - whatever the class refuses, it refuses before training
        reason = first_line(error.__cause__ or error)
        raise ConfigError(f"{node['_target_']} refused its settings ({options}): {reason}. An experiment may set "
                          "options of another scheduler (experiment=presence: plateau's patience); choose that "
                          "scheduler, or correct the override.") from None


def check_sweep_objective(callbacks: DictConfig | None) -> None:
    """An Optuna sweep (``hparams_search=optuna``) maximizes what the app returns, ``best_val_dice``, which only
    the metric history callback records: ``ConfigError`` before training when a trial would return nothing."""
    if not HydraConfig.initialized() or "optuna" not in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        return
    if not any(str((callback or {}).get("_target_", "")).endswith(".MetricHistory")
               for callback in (callbacks or {}).values()):
        raise ConfigError("hparams_search=optuna maximizes best_val_dice, which the metric history callback records, "
                          "but callbacks has none (callbacks=none?): keep callbacks=default, or add "
                          "+callbacks.metric_history._target_=bts_lightning.callbacks.MetricHistory.")


def check_input_channels(in_channels: int, datamodule: Any) -> None:
    """``ConfigError`` unless the network takes the channels the data gives each slice: ``data.channels`` (gray: 1)
    of the slice and its ``data.neighbours`` either side (``model.net.in_channels`` follows them unless set)."""
    per_slice = 1 if datamodule.channels is None else len(datamodule.channels)
    given = per_slice * window_size(datamodule.neighbours)
    if in_channels != given:
        raise ConfigError(
            f"model.net.in_channels={in_channels}, but the data gives {given} channel(s) per input (data.channels="
            f"{channels_setting(datamodule.channels)}, data.neighbours={datamodule.neighbours}): leave "
            "model.net.in_channels as the config sets it (it follows them), or choose data.channels to match "
            "(e.g. data.channels=[0,1,2] for 3)."
        )


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_batches(trainer: DictConfig) -> None:
    """Raise ``ConfigError`` for trainer settings under which no batch trains or no validation chooses ``best.ckpt``
    (Lightning would test untrained weights and exit 0, or fail after the first epoch)."""
    if trainer.get("fast_dev_run"):
        return
    steps = trainer.get("max_steps")
    if _is_number(steps) and (steps == 0 or steps < -1):
        raise ConfigError(f"trainer.max_steps={steps} trains no step: remove it (-1, the default: no step limit) "
                          "or set a whole number >= 1.")
    for key, what in (("limit_train_batches", "trains no batch"), ("limit_val_batches", ("validates no batch, "
                      "but validation chooses best.ckpt and drives early stopping and the scheduler"))):
        limit = trainer.get(key)
        if _is_number(limit) and limit <= 0:
            raise ConfigError(f"trainer.{key}={limit} {what}: remove it (every batch), or set a count >= 1 or a "
                              "fraction in (0, 1].")
    every, epochs = trainer.get("check_val_every_n_epoch"), trainer.get("max_epochs")
    if _is_number(every) and (every < 1 or _is_number(epochs) and epochs >= 1 and every > epochs):
        raise ConfigError(f"trainer.check_val_every_n_epoch={every} validates on no epoch of trainer.max_epochs="
                          f"{epochs}, but validation chooses best.ckpt: set a whole number from 1 to {epochs}.")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (_is_number(interval) and interval > 0 and (interval <= 1 or interval % 1 == 0)):
        raise ConfigError(f"trainer.val_check_interval={interval} must be a fraction in (0, 1] of an epoch, or a whole "
                          "number >= 1 of training batches (null: once per epoch); Lightning's time intervals "
                          "('DD:HH:MM:SS', a dict) are not supported with the project's callbacks.")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip} must be a number >= 0 (null or 0: no clipping).")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1):
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be a whole number >= 1 (1: an "
                          "optimizer step every batch).")


def check_callback_settings(callbacks: DictConfig | None) -> None:
    """``ConfigError`` for early-stopping settings the callback takes but fails on later (``patience=abc``)."""
    for name, node in (callbacks or {}).items():
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("EarlyStopping"):
            as_number(f"callbacks.{name}.patience", node.get("patience", 3), whole=True, minimum=0)
            as_number(f"callbacks.{name}.min_delta", node.get("min_delta", 0.0), minimum=0)


def check_callback_monitors(callbacks: DictConfig | None, monitor: str, mode: str) -> None:
    """``ConfigError`` when the checkpoint callbacks choose ``best.ckpt`` by another metric than ``monitor.metric``
    (none of them monitors it), or a checkpoint or early-stopping callback watches it in another mode: ``metrics.json``,
    the scheduler and the decision follow ``monitor``, so they would describe another epoch than ``best.ckpt``'s."""
    watching: dict[str, tuple[str, Any, Any]] = {}  # callback name -> (kind, its monitor, its mode)
    for name, node in (callbacks or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        for kind in ("ModelCheckpoint", "EarlyStopping"):
            if target.endswith(kind) and node.get("monitor") is not None:
                watching[name] = (kind, node.get("monitor"), node.get("mode", "min"))
    for name, (_, metric, its_mode) in watching.items():
        if metric == monitor and its_mode != mode:
            raise ConfigError(f"callbacks.{name}.mode={its_mode} differs from monitor.mode={mode} for {monitor}: set "
                              f"monitor.mode (the callbacks follow it) instead of callbacks.{name}.mode.")
    checkpoints = {name: metric for name, (kind, metric, _) in watching.items() if kind == "ModelCheckpoint"}
    if checkpoints and monitor not in checkpoints.values():
        name, metric = next(iter(checkpoints.items()))
        raise ConfigError(f"callbacks.{name}.monitor={metric} differs from monitor.metric={monitor}, which "
                          "metrics.json, the scheduler and early stopping follow: set monitor.metric (and monitor.mode) "
                          f"instead, e.g. monitor.metric={metric} monitor.mode=min for a loss.")



# Seeds are drawn from [0, 2**31): every epoch's seed + epoch (EpochSeed) stays within what NumPy takes.
MAX_SEED = 2**31 - 1


def check_seed(cfg: DictConfig) -> int:
    """The run's ``seed``: a whole number from 0 to :data:`MAX_SEED` (``ConfigError`` naming it otherwise)."""
    seed = int(number_setting(cfg, "seed", 0, whole=True, minimum=0))
    if seed > MAX_SEED:
        raise ConfigError(f"seed={seed} must be at most {MAX_SEED}.")
    return seed


def check_monitor(monitor: DictConfig | None) -> tuple[str, str]:
    """``(metric, mode)`` of the ``monitor`` node, checked: a ``val/`` metric and ``max`` or ``min``."""
    metric = (monitor or {}).get("metric")
    mode = (monitor or {}).get("mode")
    if metric not in NATURAL_MODES:
        raise ConfigError(
            f"monitor.metric={metric} must name a validation metric: val/dice, val/iou, val/dice_tumor, "
            "val/sensitivity, val/false_alarm_rate (only when the validation split has empty slices) or val/loss."
        )
    if mode not in MONITOR_MODES:
        raise ConfigError(f"monitor.mode={mode} must be max (val/dice, val/iou, val/dice_tumor, val/sensitivity) "
                          "or min (val/loss, val/false_alarm_rate).")
    if NATURAL_MODES[metric] != mode:
        log.warning("monitor.mode=%s with monitor.metric=%s: best.ckpt, early stopping and the plateau scheduler take "
                    "the epoch with the %s %s as the best one (the usual mode is %s).", mode, metric,
                    "lowest" if mode == "min" else "highest", metric, NATURAL_MODES[metric])
    return metric, mode


def build_module(cfg: DictConfig) -> SegmentationModule:
    """The :class:`SegmentationModule` of ``cfg.model``, its nested configs passed as plain configs.

    A user error while building it (bad learning rate, unknown network) is raised as itself, not
    wrapped in Hydra's ``InstantiationException``.
    """
    try:
        module = instantiate(cfg.model, _recursive_=False)
    except Exception as error:
        user_error = user_error_of(error)
        if user_error is None:
            raise
        raise user_error from None
    if not isinstance(module, SegmentationModule):
        raise ConfigError(f"model._target_={cfg.model.get('_target_')} must build a SegmentationModule.")
    return module


def check_decision(decision: DictConfig | None, datamodule: Any) -> tuple[float, str] | None:
    """The ``decision.target_false_alarm_rate`` and ``decision.target_on`` to calibrate after fitting (``None``:
    none), checked before training.

    Raises ``ConfigError`` for a bad target, rule or target_on, or a validation split without (enough) empty slices.
    """
    target = (decision or {}).get("target_false_alarm_rate")
    if target is None:
        return None
    target, _ = check_settings(target, (decision or {}).get("rule", "component_fraction"), "decision.")
    target_on = check_target_on_setting((decision or {}).get("target_on", "split"), target, "decision.")
    check_enough_empty(datamodule.empty_slices("val"), target, target_on, "val",
                       f"{datamodule.name} ({len(datamodule.datasets['val'])} slices)", "decision.")
    return target, target_on


def calibrate_best(trainer: L.Trainer, best_path: str | None, datamodule: Any, target: float,
                   rule: str, target_on: str = "split") -> dict[str, Any] | None:
    """Calibrate the slice decision of ``best_path`` on the val split and store it there (rank 0 only).

    Returns the decision's record (``None`` on other ranks, or without a best checkpoint, with a warning).
    """
    if not best_path:
        log.warning("decision.target_false_alarm_rate is set but no checkpoint callback chose a best.ckpt: "
                    "nothing to calibrate; run python -m bts_lightning.calibrate on a checkpoint.")
        return None
    record = None
    if trainer.is_global_zero:
        predictor = load_predictor(best_path, trainer.strategy.root_device)
        decision = calibrate_checkpoint(Path(best_path), predictor, datamodule.datasets["val"], target, rule,
                                        DECISION_PIXEL_THRESHOLD, "val", datamodule.name,
                                        batch_size=datamodule.batch_size, target_on=target_on)
        log.info(reached_line(decision))
        warn_if_chance(decision)
        record = decision.to_dict()
    trainer.strategy.barrier("slice decision")  # the other ranks test best.ckpt once it holds the decision
    return record


def test_with_decision(cfg: DictConfig, ckpt_path: Path, output_dir: Path) -> dict[str, Any]:
    """``ckpt_path`` scored on the test split with the slice decision calibrated after fitting, by the evaluate app's
    function (:func:`bts_lightning.evaluate.evaluate`) into ``output_dir``: what ``evaluate`` reports for the
    checkpoint. (``metrics.json``'s ``test`` scores the network's own masks, without the decision.)

    Returns its :func:`~bts_lightning.cross_dataset.evaluation_row` (slice counts and scores, all-slice Dice) with
    evaluate's ``decision_note`` and ``false_alarm_check`` (the test false alarms against what the val calibration
    allows).
    """
    config = OmegaConf.create({"ckpt_path": str(ckpt_path), "split": "test", "paths": {"output_dir": str(output_dir)},
                               "data": OmegaConf.to_container(cfg.data, resolve=True)})
    log.info("Scoring %s on the test split with its slice decision into %s", ckpt_path.name, output_dir)
    scored = evaluate(config)
    return {**evaluation_row("test with the slice decision", scored, output_dir, chose_checkpoint=False),
            "decision_note": scored["decision_note"], "false_alarm_check": scored["false_alarm_check"]}


def never_improved_warning(history: list[dict[str, float]], best: dict[str, float] | None, monitor: str) -> str | None:
    """A warning when ``best`` (the row that chose ``best.ckpt``) is the first validated epoch of ``history`` although
    at least two more were validated: ``monitor`` never beat the network it started from, so ``best.ckpt`` is a
    network that training did not improve. ``None`` otherwise."""
    if best is None or len(history) < 3 or best is not history[0]:
        return None
    return (f"best.ckpt is the first validated epoch's network (epoch {best['epoch']}): {monitor} never beat its value "
            f"there ({best.get(monitor):.4g}) in the {len(history) - 1} validations after it, so training did "
            "not improve the network it started from. Train it again (another seed, a lower optimizer.lr). With "
            "empty slices, a network still learning to outline tumors has no tumor pixel above 0.5 for a while, so "
            "val/dice_tumor sits at 0 and stops the run: loss=dice_ce_slice_tumor monitor.metric=val/loss "
            "monitor.mode=min gives it a monitor that moves (for a cascade's presence model: experiment=presence; "
            "README \"Empty slices\").")


def split_summary(datamodule: Any) -> dict[str, Any]:
    """How the slices were split: method, whether patients may leak between subsets, subset sizes, and
    ``n_negatives``, the ``data.negatives`` slices trained on besides ``n_train``."""
    sizes = {f"n_{name}": len(dataset) for name, dataset in datamodule.datasets.items()}
    return {"method": datamodule.split.method, "leaky": datamodule.split.leaky, **sizes,
            "n_negatives": datamodule.n_negatives}


def partial_note(split: str, counts: dict[str, int] | None, size: int | None) -> str:
    """`` The <split> scores cover N of its M slices (...).`` when fewer slices were scored than the split holds
    (``trainer.limit_<split>_batches``, ``fast_dev_run``, ``debug=limit``), else ``""``."""
    scored = sum(counts.values()) if counts else None
    if scored is None or size is None or scored >= size:
        return ""
    return (f" The {split} scores cover {scored} of its {size} slices (trainer.limit_{split}_batches, overfit_batches or "
            "fast_dev_run): not a score of the whole split.")


def slice_scores(prefix: str, row: dict[str, float] | None) -> dict[str, float | None]:
    """``{prefix}dice_tumor``, ``{prefix}sensitivity``, ``{prefix}false_alarm_rate`` of a history row (None when
    the row lacks them: no such row, or no tumor / no empty slice in the validation split)."""
    return {f"{prefix}{name}": (row or {}).get(f"val/{name}") for name in SLICE_SCORES}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint when a test split exists, and write ``metrics.json``.

    ``metrics.json`` reports the dataset's name, the best validation epoch (the epoch that chose
    ``best.ckpt``, so an optimistic score of the validation split), the last validation epoch, each with
    its slice-level scores (``best_val_``/``last_val_`` ``dice_tumor``, ``sensitivity``, ``false_alarm_rate``:
    None when not measurable), and the test scores of ``best.ckpt`` on the held-out test split when one
    exists (``test``: every ``test/`` key logged, the network's own masks). ``val_slices`` and ``test_slices``
    count the tumor and empty slices scored (no empty slice: no false-alarm rate). With a slice decision calibrated
    after fitting (``decision.target_false_alarm_rate``), ``test_with_decision`` scores ``best.ckpt`` on the test
    split with it, as ``evaluate`` does (:func:`test_with_decision`, into ``<run dir>/test_with_decision/``).
    With a ``cross_data`` node (``experiment=cross_dataset``) the model is then scored in domain and on that second
    dataset (:mod:`bts_lightning.cross_dataset`), summarized under ``cross_dataset``.
    """
    output_dir = Path(cfg.paths.output_dir)
    check_epochs(cfg.trainer)
    check_batches(cfg.trainer)
    seed = check_seed(cfg)
    check_callback_settings(cfg.get("callbacks"))
    check_sweep_objective(cfg.get("callbacks"))
    monitor, mode = check_monitor(cfg.get("monitor"))
    check_callback_monitors(cfg.get("callbacks"), monitor, mode)
    check_scheduler(cfg)  # after the monitor, whose mode the plateau scheduler takes
    test = flag_setting(cfg, "test", False)
    if cfg.get("cross_data") is not None:
        log.info("Cross-dataset channels: %s", check_cross_data(cfg, int(cfg.model.net.get("in_channels", 1))))
    network = OmegaConf.to_container(cfg.model.net, resolve=True)
    resume = resolve_resume(cfg.get("ckpt_path"), output_dir, network, cfg.trainer.get("max_epochs"))
    resume_from = resume.path if resume else None
    if resume is None or resume.path.resolve() != (output_dir / "checkpoints" / "last.ckpt").resolve():
        check_new_run_dir(output_dir)  # a new run, or another run's checkpoint continued here
    L.seed_everything(seed, workers=True, verbose=False)  # Lightning would print this on stderr, before any error
    log.info("Seed %s (Python, NumPy, PyTorch and the loader workers)", seed)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    check_input_channels(int(cfg.model.net.get("in_channels", 1)), datamodule)
    check_input_size(module.net, datamodule.image_size, "data.image_size")  # before data is read or generated
    datamodule.setup("fit")  # validates every file before anything heavy starts
    if resume_from is not None:
        check_resume_settings(resume_from, module.hparams, data_settings_of(datamodule), datamodule.split_record(),
                              seed)
    decision_aim = check_decision(cfg.get("decision"), datamodule)
    if datamodule.distance_maps is None:  # data.distance_maps: null = when the loss takes them
        datamodule.distance_maps = uses_distance_maps(module.criterion)
    if datamodule.distance_maps:
        log.info("Loader workers compute the masks' distance maps for the loss (data.distance_maps)")
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    if not loggers and any(isinstance(callback, LearningRateMonitor) for callback in callbacks):
        log.info("No logger: the learning-rate monitor, which writes to one, is left out.")
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    if not any(isinstance(logger, TensorBoardLogger) for logger in loggers) and \
            any(isinstance(callback, ValidationImages) for callback in callbacks):
        log.info("No TensorBoard logger: the validation images, which are written to it, are left out.")
        callbacks = [callback for callback in callbacks if not isinstance(callback, ValidationImages)]
    # Without the project's checkpoint callbacks, none: not Lightning's own in the logger's folder either.
    own_checkpoints = {} if any(isinstance(callback, ModelCheckpoint) for callback in callbacks) or \
        cfg.trainer.get("enable_checkpointing") is not None else {"enable_checkpointing": False}
    finishing = {"max_epochs": resume.finish_epochs} if resume and resume.finish_epochs else {}  # fit nothing more
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **own_checkpoints,
                                     **finishing)
    keep_run_record()  # settings accepted: the run's .hydra record is this process's from here on
    if resume_from is not None and trainer.is_global_zero:
        # A finished fit keeps its marker: under DDP the other ranks, started inside fit, read it to train nothing too.
        finished = [] if resume.finish_epochs else [output_dir / "checkpoints" / FIT_FINISHED_NAME]
        for stale in (output_dir / "metrics.json", *finished):
            if stale.is_file():  # it would describe the earlier best.ckpt / fit
                stale.unlink()
                log.info("Resuming: removed the earlier process's %s; this run writes it again.", stale)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.is_global_zero and (output_dir / "checkpoints" / "last.ckpt").is_file():
        mark_fit_finished(output_dir / "checkpoints", trainer.global_step, trainer.current_epoch)
    clock = next((callback for callback in trainer.callbacks if isinstance(callback, TrainingTime)), None)
    train_time = clock.seconds() if clock else time.perf_counter() - started  # a resumed run: all its processes

    history = next((cb for cb in trainer.callbacks if isinstance(cb, MetricHistory)), None)
    best = history.best(monitor, mode) if history else None
    last = history.history[-1] if history and history.history else None
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None) == monitor), None)
    best_path = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    tested = test and datamodule.has_test
    scored = "best.ckpt" if best_path else "the final weights"
    metrics: dict[str, Any] = {
        "model": cfg.model.net.name,
        "dataset": datamodule.name,
        "num_params": sum(p.numel() for p in module.parameters()),
        "precision": str(trainer.precision),  # what ran: Lightning turns 16-mixed into bf16-mixed on a CPU
        "epochs_trained": trainer.current_epoch,
        "train_time_s": round(train_time, 2),
        "split": split_summary(datamodule),
        "selection": {
            "monitor": monitor,
            "mode": mode,
            "chosen_on": "val" if best_path else None,
            "scored_on": "test" if tested else None,
            "note": (f"best_val_dice is {VAL_DICE} at the epoch with the best {monitor} on the split that chose "
                     "best.ckpt (optimistic); " if best_path else "no checkpoint callback chose a best epoch; ")
            + (f"test is {scored} scored on the held-out test split (the network's own masks; test_with_decision, when "
               "present, with the slice decision)." if tested else
               "not tested (test=false)." if datamodule.has_test else "there is no test split."),
        },
        "best_val_dice": best.get(VAL_DICE) if best else None,
        **slice_scores("best_val_", best),
        "best_epoch": best["epoch"] if best else None,
        "best_step": best.get("step") if best else None,  # which validation, when several per epoch
        "last_val_dice": last.get(VAL_DICE) if last else None,
        "last_val_iou": last.get(VAL_IOU) if last else None,
        **slice_scores("last_val_", last),
        "val_slices": module.slice_counts.get("val"),
        "last_epoch": last["epoch"] if last else None,
        "best_checkpoint": best_path,
        "val_history": history.history if history else [],
    }
    metrics["selection"]["note"] += partial_note("val", metrics["val_slices"], metrics["split"].get("n_val"))
    stalled = never_improved_warning(history.history, best, monitor) if history else None
    if stalled:
        log.warning(stalled)
        metrics["selection"]["warning"] = stalled
    if decision_aim is not None:
        metrics["decision"] = calibrate_best(trainer, best_path, datamodule, decision_aim[0],
                                             str(cfg.decision.get("rule", "component_fraction")), decision_aim[1])
    if tested:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        metrics["test"] = {key: float(value) for key, value in results[0].items()}
        metrics["test_slices"] = module.slice_counts.get("test")
        metrics["selection"]["note"] += partial_note("test", metrics["test_slices"], metrics["split"].get("n_test"))
        if metrics.get("decision") and trainer.is_global_zero:
            metrics["test_with_decision"] = test_with_decision(cfg, Path(best_path), output_dir / "test_with_decision")
    if cfg.get("cross_data") is not None:
        ckpt = checkpoint_to_score(trainer, best_path, output_dir)
        if trainer.is_global_zero:
            split = "test" if datamodule.has_test else "val"
            metrics["cross_dataset"] = evaluate_across(cfg, ckpt, split, metrics["selection"]["chosen_on"])
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "metrics.json", metrics)
        chosen_by = "" if monitor == VAL_DICE or not best else f" (chosen by {monitor} {best.get(monitor)})"
        if best:
            log.info("Best %s %s at epoch %s%s; metrics in %s", VAL_DICE, metrics["best_val_dice"],
                     metrics["best_epoch"], chosen_by, output_dir)
        else:
            log.info("No best epoch (no metric history or checkpoint callback); metrics in %s", output_dir)
    return metrics


# Entry point (``bts-train``); returns the best validation Dice, the value Hydra sweepers optimize.
main = hydra_app("train", train, result=lambda metrics: metrics["best_val_dice"])


if __name__ == "__main__":
    main()
