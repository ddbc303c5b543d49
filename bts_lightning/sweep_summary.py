"""Say what an Optuna search's best value is, and score its best trial on the split that chose nothing.

The sweeper writes ``optimization_results.yaml`` with ``best_value``: the best ``best_val_dice`` its trials returned,
chosen on the validation split twice (each trial's best epoch, then the best trial), so it is optimistic. This Hydra
callback (``conf/hparams_search/optuna.yaml``) adds which trial that is and its test-split Dice, held out from both.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bts_lightning.runtime import atomic_path

log = logging.getLogger(__name__)

RESULTS_NAME = "optimization_results.yaml"
BEST_VALUE_NOTE = ("best_val_dice of the best trial: the validation split's per-image Dice at that trial's best epoch, "
                   "chosen on the validation split twice (the epoch, then the trial), so optimistic; best_trial.test_dice "
                   "scores its best.ckpt on the test split, held out from both.")


def best_trial(sweep_dir: Path, best_value: float) -> tuple[Path, dict[str, Any]] | None:
    """(job folder, metrics.json) of the first job (by number) whose ``best_val_dice`` is ``best_value``."""
    jobs = sorted((path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()),
                  key=lambda path: int(path.name))
    for job in jobs:
        try:
            metrics = json.loads((job / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        value = metrics.get("best_val_dice")
        if isinstance(value, (int, float)) and math.isclose(value, best_value, rel_tol=0, abs_tol=1e-12):
            return job, metrics
    return None


def selection_note(sweep_dir: Path, best_value: float) -> dict[str, Any]:
    """What ``optimization_results.yaml`` gains: the note on ``best_value`` and the best trial's folder and test."""
    found = best_trial(sweep_dir, best_value)
    if found is None:
        return {"best_value_is": BEST_VALUE_NOTE, "best_trial": None}
    job, metrics = found
    test = metrics.get("test") or {}
    counts = metrics.get("test_slices")  # {"tumor_slices": n, "empty_slices": m}
    return {"best_value_is": BEST_VALUE_NOTE,
            "best_trial": {"job": int(job.name), "dir": str(job), "best_epoch": metrics.get("best_epoch"),
                           "test_dice": test.get("test/dice"),
                           "test_slices": sum(counts.values()) if isinstance(counts, dict) else None,
                           "test_note": None if test else "no test split (data.test_fold=null or test=false): score "
                                                          "its best.ckpt on held-out data with evaluate"}}


class OptunaSelectionNote(Callback):
    """Hydra callback: after an Optuna sweep, add :func:`selection_note` to ``optimization_results.yaml`` (rewritten
    atomically) and log it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / RESULTS_NAME
        if not path.is_file():  # the sweep stopped before the sweeper wrote it
            return
        results = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(results, dict) or not isinstance(results.get("best_value"), (int, float)):
            return
        results.update(selection_note(path.parent, float(results["best_value"])))
        with atomic_path(path) as temporary:
            temporary.write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
        trial = results["best_trial"]
        if trial is None:
            log.info("Best value %.4g is validation Dice chosen on the validation split (optimistic).",
                     results["best_value"])
            return
        tested = (f"its test Dice (held out from both choices) is {trial['test_dice']:.4f} on {trial['test_slices']} "
                  "slices" if trial["test_dice"] is not None else "it has no test split to score it on")
        log.info("Best value %.4g is validation Dice, chosen on the validation split (optimistic); the best trial is "
                 "job #%d (%s), and %s. Both in %s.", results["best_value"], trial["job"], trial["dir"], tested, path)
