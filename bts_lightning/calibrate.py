"""Hydra app: ``python -m bts_lightning.calibrate ckpt_path=RUN/checkpoints/best.ckpt target_false_alarm_rate=0.05``.

Chooses the slice-level "tumor present" decision (:mod:`bts_lightning.decision`) of a training
checkpoint on one split of its data (``split=val`` by default; loaded exactly as ``evaluate`` loads
it: the checkpoint's data root and split unless overridden): every slice is scored with ``rule``
(``component_fraction`` or ``max_probability``, at pixel ``threshold``), and the threshold is the
smallest one that marks at most ``target_false_alarm_rate`` of the split's empty slices (with
``target_on=new_slices``: the smallest one expected to mark at most that share of new empty slices like them,
which needs at least 19 empty slices at 5 %). The decision
is written into the checkpoint (atomically), so ``evaluate``, ``predict``, the demo and every file
exported from it afterwards apply it; ``calibration.json`` in the run folder records it with the
checkpoint and the slices used. The false-alarm rate and sensitivity it reaches on that split are printed.

Exported files (``.onnx``, ``.pt``, hub folders) are not calibrated: calibrate their checkpoint, then export it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from bts_lightning.checkpoint import write_decision
from bts_lightning.data.dataset import SliceDataset
from bts_lightning.decision import (
    SliceDecision,
    calibrated_decision,
    chance_warning,
    check_rule,
    check_target,
    check_target_on,
    empty_slices_needed,
    on_new_slices,
    on_new_slices_line,
    slice_score,
)
from bts_lightning.errors import ConfigError
from bts_lightning.evaluate import load_split
from bts_lightning.inference import CHECKPOINT_SUFFIXES, Predictor, predict_probabilities
from bts_lightning.models.cascade import cascade_of
from bts_lightning.runtime import flag_setting, hydra_app, number_setting, write_json_atomic

log = logging.getLogger(__name__)

NO_EMPTY_HINT = ("use a dataset with tumor-free slices (e.g. lgg) or data=synthetic_empty (data.negatives adds empty "
                 "slices to the training split only)")


def check_settings(target: Any, rule: Any, key: str = "") -> tuple[float, str]:
    """``(target, rule)`` checked; ``ConfigError`` naming the setting (``key`` prefixes the names, e.g. ``decision.``)."""
    try:
        return check_target(target, f"{key}target_false_alarm_rate"), check_rule(rule, f"{key}rule")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_target_on_setting(target_on: Any, target: float, key: str = "") -> str:
    """``target_on`` checked against ``target``; ``ConfigError`` naming the setting (``key`` prefixes it)."""
    try:
        return check_target_on(target_on, target, f"{key}target_on")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_enough_empty(n_empty: int, target: float, target_on: str, split: str, where: str, key: str = "") -> None:
    """``ConfigError`` when ``n_empty`` empty slices of ``split`` of ``where`` cannot calibrate ``target``
    ``target_on`` (:func:`~bts_lightning.decision.empty_slices_needed`), saying what to change (``key`` prefixes the
    settings named, e.g. ``decision.``)."""
    if n_empty == 0:
        raise no_empty_slices(split, where)
    needed = empty_slices_needed(target, target_on)
    if n_empty < needed:
        raise ConfigError(f"The {split} split of {where} has {n_empty} empty slices, too few to expect at most "
                          f"{100 * target:g} % false alarms on new empty slices (target_on=new_slices needs at least "
                          f"{needed}): calibrate on a split with more empty slices, raise {key}target_false_alarm_rate, "
                          f"or set {key}target_on=split.")


def no_empty_slices(split: str, where: str) -> ConfigError:
    """The error for a split without tumor-free slice: calibration needs some, and how to get them."""
    return ConfigError(f"The {split} split of {where} has no empty slice (every mask has a tumor), and calibrating "
                       f"the slice decision needs empty slices on that split: {NO_EMPTY_HINT}.")


def score_slices(dataset: SliceDataset, score_batch: Callable[[np.ndarray], Sequence[float]], batch_size: int = 16,
                 desc: str = "calibrate") -> tuple[list[float], list[bool]]:
    """``score_batch`` of every slice of ``dataset`` (called on stacked batches of its images), and whether its
    truth has a tumor."""
    scores: list[float] = []
    tumor: list[bool] = []
    with tqdm(total=len(dataset), desc=desc, unit="slice", disable=None) as bar:
        for start in range(0, len(dataset), batch_size):
            positions = range(start, min(start + batch_size, len(dataset)))
            images, truths = zip(*(dataset.load(position) for position in positions))
            scores.extend(float(score) for score in score_batch(np.stack(images)))
            tumor.extend(bool(np.any(truth)) for truth in truths)
            bar.update(len(positions))
    return scores, tumor


def slice_scores(predictor: Predictor, dataset: SliceDataset, decision_rule: str, pixel_threshold: float,
                 tta: bool = False, batch_size: int = 16) -> tuple[list[float], list[bool]]:
    """Score of every slice of ``dataset`` under ``decision_rule``, and whether its truth has a tumor."""

    def score_batch(images: np.ndarray) -> list[float]:
        probabilities = predict_probabilities(predictor, images, tta).numpy()
        return [slice_score(probability, decision_rule, pixel_threshold) for probability in probabilities]

    return score_slices(dataset, score_batch, batch_size)


def calibrate_on(predictor: Predictor, dataset: SliceDataset, target: float, rule: str, pixel_threshold: float,
                 split: str, dataset_name: str, tta: bool = False, batch_size: int = 16,
                 target_on: str = "split") -> SliceDecision:
    """The decision calibrated on the empty slices of ``dataset`` (the ``split`` of ``dataset_name``).

    Raises ``ConfigError`` when it has no empty slice, or too few for ``target_on`` (:func:`check_enough_empty`).
    """
    scores, tumor = slice_scores(predictor, dataset, rule, pixel_threshold, tta, batch_size)
    empty = [score for score, has_tumor in zip(scores, tumor) if not has_tumor]
    check_enough_empty(len(empty), target, target_on, split, dataset_name)
    present = [score for score, has_tumor in zip(scores, tumor) if has_tumor]
    return calibrated_decision(empty, present, target, rule, pixel_threshold, split, dataset_name, target_on, tta,
                               dataset.files_digest())


def calibrate_checkpoint(ckpt_path: Path, predictor: Predictor, dataset: SliceDataset, target: float, rule: str,
                         pixel_threshold: float, split: str, dataset_name: str, tta: bool = False,
                         batch_size: int = 16, target_on: str = "split") -> SliceDecision:
    """:func:`calibrate_on`, then write the decision into checkpoint ``ckpt_path`` (atomically)."""
    decision = calibrate_on(predictor, dataset, target, rule, pixel_threshold, split, dataset_name, tta, batch_size,
                            target_on)
    write_decision(ckpt_path, decision.to_dict())
    log.info("Calibrated the slice decision of %s: tumor present iff %s", ckpt_path, decision.describe())
    return decision


def reached_line(decision: SliceDecision) -> str:
    """One line: the false-alarm rate and sensitivity the decision reaches on its calibration split, and what to
    expect on new empty slices (:func:`~bts_lightning.decision.false_alarm_bound`)."""
    cal, target = decision.calibration, decision.target_false_alarm_rate
    sensitivity = "n/a (no tumor slice)" if cal["sensitivity"] is None else f"{cal['sensitivity']:.4f}"
    aim = f"target {target:g}" + (" expected on new slices" if decision.target_on == "new_slices" else "")
    return (f"Slice decision {decision.describe()}: on the {cal['split']} split of {cal['dataset']}, false-alarm rate "
            f"{cal['false_alarm_rate']:.4f} on {cal['n_empty']} empty slices ({aim}), sensitivity {sensitivity} on "
            f"{cal['n_tumor']} tumor slices; "
            f"{on_new_slices_line(on_new_slices(cal['n_empty'], target, decision.target_on))}.")


def warn_if_chance(decision: SliceDecision) -> None:
    """Log :func:`~bts_lightning.decision.chance_warning` for ``decision`` on its calibration split, if any."""
    cal = decision.calibration
    warning = chance_warning("The slice decision", cal["split"], cal["sensitivity"], cal["false_alarm_rate"])
    if warning:
        log.warning(warning)


def calibrate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Calibrate ``cfg.ckpt_path``'s slice decision on ``cfg.split``, store it there, write calibration.json.

    ``overrides``: the user's command-line overrides, as for ``evaluate`` (which data and split).
    Returns the calibration.json content.
    """
    target, rule = check_settings(cfg.get("target_false_alarm_rate"), cfg.get("rule", "component_fraction"))
    target_on = check_target_on_setting(cfg.get("target_on", "split"), target)
    threshold = float(number_setting(cfg, "threshold", 0.5))
    tta = flag_setting(cfg, "tta", False)
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold={threshold} must be in [0, 1) (tumor where probability > threshold).")
    ckpt = cfg.get("ckpt_path")
    if ckpt and (Path(str(ckpt)).is_dir() or Path(str(ckpt)).suffix.lower() not in CHECKPOINT_SUFFIXES):
        raise ConfigError(f"ckpt_path={ckpt} is not a training checkpoint (.ckpt): exported models and hub folders "
                          "carry the decision of the checkpoint they were exported from; calibrate the checkpoint, "
                          "then export it again.")
    split = str(cfg.get("split", "val"))
    scoring = load_split(cfg, overrides, split, "calibrate")
    if scoring.scored.get("training_slices_scored"):
        log.warning("The decision is calibrated partly on %d training slices, whose scores the network learned: its "
                    "false-alarm rate on new slices will be higher than here. Calibrate on held-out slices (split=val).",
                    scoring.scored["training_slices_scored"])
    cascade = cascade_of(scoring.predictor)
    if cascade is not None and cascade.context:
        log.warning("%s is a cascade with a scan context (%d slice(s) either side): evaluate and predict over scans "
                    "decide with it, not with the slice decision calibrated here, which applies where slices are "
                    "judged alone (scan_context=off, exported files, the demo; calibrated so, one slice at a time). "
                    "To move the scan context's threshold, run cascade again with target_false_alarm_rate.",
                    scoring.ckpt_path, cascade.context)
    batch_size = int(number_setting(cfg, "data.batch_size", 16, whole=True, minimum=1))
    decision = calibrate_checkpoint(scoring.ckpt_path, scoring.predictor, scoring.dataset, target, rule, threshold,
                                    split, scoring.datamodule.name, tta, batch_size,
                                    target_on)
    result = {"checkpoint": str(scoring.ckpt_path.resolve()), "data_root": str(scoring.datamodule.root),
              "slices": scoring.scored, "tta": tta, "decision": decision.to_dict(),
              "on_new_empty_slices": on_new_slices(decision.calibration["n_empty"], target, target_on)}
    write_json_atomic(Path(cfg.paths.output_dir) / "calibration.json", result)
    print(reached_line(decision), flush=True)
    warn_if_chance(decision)
    return result


main = hydra_app("calibrate", calibrate, pass_overrides=True)  # entry point: bts-calibrate


if __name__ == "__main__":
    main()
