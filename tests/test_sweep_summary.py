"""The note an Optuna sweep's results gain: what best_value is, and its trial's held-out test score."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from bts_lightning.sweep_summary import RESULTS_NAME, OptunaSelectionNote


def write_job(sweep: Path, number: int, best_val_dice: float, test: dict | None) -> None:
    (sweep / str(number)).mkdir(parents=True)
    metrics = {"best_val_dice": best_val_dice, "best_epoch": 3, "test": test,
               "test_slices": {"tumor_slices": 7, "empty_slices": 2} if test else None}
    (sweep / str(number) / "metrics.json").write_text(json.dumps(metrics))


def test_the_results_name_the_best_trial_and_its_test_score(tmp_path):
    write_job(tmp_path, 0, 0.61, {"test/dice": 0.55})
    write_job(tmp_path, 1, 0.7, {"test/dice": 0.52})
    write_job(tmp_path, 2, 0.7, {"test/dice": 0.9})  # a tie: the sweeper's best trial is the first one
    (tmp_path / RESULTS_NAME).write_text("name: optuna\nbest_params: {model: unet}\nbest_value: 0.7\n")
    OptunaSelectionNote().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    results = OmegaConf.load(tmp_path / RESULTS_NAME)
    assert results.best_params.model == "unet" and results.best_value == 0.7  # the sweeper's keys are kept
    assert "optimistic" in results.best_value_is
    assert results.best_trial.job == 1 and results.best_trial.test_dice == 0.52 and results.best_trial.test_slices == 9
    assert results.best_trial.test_note is None


def test_a_best_trial_without_a_test_split_says_how_to_score_it(tmp_path):
    write_job(tmp_path, 0, 0.6, None)
    (tmp_path / RESULTS_NAME).write_text("best_value: 0.6\n")
    OptunaSelectionNote().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    trial = OmegaConf.load(tmp_path / RESULTS_NAME).best_trial
    assert trial.test_dice is None and "evaluate" in trial.test_note


def test_a_sweep_that_wrote_no_results_is_left_alone(tmp_path):
    OptunaSelectionNote().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert list(tmp_path.iterdir()) == []
