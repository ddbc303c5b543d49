"""Slice-level scores in training: SliceDetection by hand, against evaluate's summaries, and in a training run."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bts_lightning.errors import ConfigError
from bts_lightning.metrics import SliceDetection, image_metrics, per_image_overlap, summarize_by_truth
from bts_lightning.report import report
from bts_lightning.train import train
from tests.conftest import compose_train


def square(top: int, left: int, side: int, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top : top + side, left : left + side] = 1
    return mask


def hand_made() -> tuple[torch.Tensor, torch.Tensor, float]:
    """2 tumor slices (one found with Dice 0.5, one missed) and 3 empty slices (one false alarm); the Dice found."""
    empty = torch.zeros(8, 8, dtype=torch.long)
    truths = torch.stack([square(0, 0, 4), square(4, 4, 2), empty, empty, empty])
    preds = torch.stack([square(0, 2, 4), empty, square(1, 1, 1), empty, empty])
    return preds, truths, 2 * 8 / 32


def test_scores_of_hand_made_slices():
    preds, truths, found_dice = hand_made()
    metric = SliceDetection()
    metric.update(preds, truths)
    values = metric.compute()
    assert (values["tumor_slices"].item(), values["empty_slices"].item()) == (2, 3)
    assert values["sensitivity"].item() == pytest.approx(0.5)
    assert values["false_alarm_rate"].item() == pytest.approx(1 / 3)
    assert values["dice_tumor"].item() == pytest.approx((found_dice + 0.0) / 2)


def test_a_group_without_slices_has_no_score():
    preds, truths, _ = hand_made()
    metric = SliceDetection()
    metric.update(preds[:2], truths[:2])  # tumor slices only
    assert set(metric.compute()) == {"tumor_slices", "empty_slices", "dice_tumor", "sensitivity"}
    metric.reset()
    metric.update(preds[2:], truths[2:])  # empty slices only
    values = metric.compute()
    assert set(values) == {"tumor_slices", "empty_slices", "false_alarm_rate"}
    assert values["false_alarm_rate"].item() == pytest.approx(1 / 3)


def test_updates_accumulate_like_one_batch_and_reset_clears():
    preds, truths, _ = hand_made()
    whole, parts = SliceDetection(), SliceDetection()
    whole.update(preds, truths)
    for start in range(0, 5, 2):
        parts.update(preds[start : start + 2], truths[start : start + 2])
    expected, accumulated = whole.compute(), parts.compute()
    assert set(expected) == set(accumulated)
    for name, value in expected.items():
        assert accumulated[name].item() == pytest.approx(value.item())
    parts.reset()
    parts.update(preds[:1], truths[:1])
    assert parts.compute()["tumor_slices"].item() == 1 and parts.compute()["sensitivity"].item() == 1.0


def test_agrees_with_evaluate_summaries_of_the_same_masks():
    generator = torch.Generator().manual_seed(1)
    truths = (torch.rand(14, 16, 16, generator=generator) > 0.6).long()
    preds = (torch.rand(14, 16, 16, generator=generator) > 0.5).long()
    truths[9:] = 0  # empty slices: false alarms (9, 10), correctly empty (11-13)
    preds[11:] = 0
    preds[1] = preds[4] = 0  # missed tumors
    metric = SliceDetection()
    for start in range(0, 14, 4):
        metric.update(preds[start : start + 4], truths[start : start + 4])
    values = metric.compute()
    summary = summarize_by_truth([image_metrics(p.numpy(), t.numpy()) for p, t in zip(preds, truths)])
    assert values["sensitivity"].item() == pytest.approx(summary["tumor_slices"]["sensitivity"]) == 7 / 9
    assert values["false_alarm_rate"].item() == pytest.approx(summary["empty_slices"]["false_alarm_rate"]) == 2 / 5
    assert values["dice_tumor"].item() == pytest.approx(summary["tumor_slices"]["dice"]["mean"], abs=1e-6)
    assert values["dice_tumor"].item() == pytest.approx(per_image_overlap(preds[:9], truths[:9], "dice").mean().item())


# ------------------------------------------------------------------------------------------- training runs


def blank_masks(root: Path, folds: set[str], every: int = 2) -> int:
    """Copy of a Kaggle-layout dataset's masks with every ``every``-th slice of ``folds`` made empty; the count."""
    with open(root / "metadata.csv", newline="") as stream:
        indices = [row["index"] for row in csv.DictReader(stream) if row["fold"] in folds]
    for index in indices[::every]:
        path = root / "masks" / f"{index}.png"
        cv2.imwrite(str(path), np.zeros_like(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)))
    return len(indices[::every])


def train_on(root: Path, run: Path) -> dict:
    """One CPU epoch on ``root`` (val fold 1, test fold 2); the run's metrics.json."""
    overrides = [f"data.root={root}", "data.download=false", "data.image_size=64", "data.batch_size=8",
                 "data.test_fold=2", "data.num_workers=0", "data.augmentations=[]", "trainer=cpu",
                 "trainer.max_epochs=1"]
    train(compose_train(overrides, run))
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def small_dataset(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session's synthetic data (every slice has a tumor)."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def test_training_logs_false_alarm_rate_when_the_split_has_empty_slices(small_dataset, tmp_path, caplog):
    n_blank = blank_masks(small_dataset, {"1", "2"})
    with caplog.at_level(logging.INFO, logger="bts_lightning.segmentation_module"):
        saved = train_on(small_dataset, tmp_path / "run")
    assert "no empty slice" not in caplog.text
    (row,) = saved["val_history"]
    assert {"val/dice", "val/dice_tumor", "val/sensitivity", "val/false_alarm_rate"} <= set(row)
    for name in ("dice_tumor", "sensitivity", "false_alarm_rate"):
        assert saved[f"last_val_{name}"] == saved[f"best_val_{name}"] == row[f"val/{name}"]
    assert 0 < saved["val_slices"]["empty_slices"] < n_blank and saved["val_slices"]["tumor_slices"] > 0
    assert {"test/dice", "test/dice_tumor", "test/sensitivity", "test/false_alarm_rate"} <= set(saved["test"])
    assert saved["test_slices"]["empty_slices"] > 0
    (fields,) = [row.fields() for row in report([tmp_path / "run"], tmp_path / "report")]
    assert fields["last_val_false_alarm_rate_mean"] == saved["last_val_false_alarm_rate"]
    assert fields["test_false_alarm_rate_mean"] == saved["test"]["test/false_alarm_rate"]
    assert fields["val_empty_slices"] == saved["val_slices"]["empty_slices"]


def test_training_without_empty_slices_logs_no_false_alarm_rate(small_dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bts_lightning.segmentation_module"):
        saved = train_on(small_dataset, tmp_path / "run")
    notes = [r.message for r in caplog.records if "no empty slice" in r.message]
    assert notes == ["val split has no empty slice: no false-alarm rate (every slice shows a tumor)",
                     "test split has no empty slice: no false-alarm rate (every slice shows a tumor)"]
    (row,) = saved["val_history"]
    assert "val/false_alarm_rate" not in row and "val/sensitivity" in row
    assert saved["last_val_false_alarm_rate"] is None and saved["last_val_sensitivity"] == row["val/sensitivity"]
    assert saved["val_slices"]["empty_slices"] == 0 and "test/false_alarm_rate" not in saved["test"]
    report([tmp_path / "run"], tmp_path / "report")
    assert "| n/a (no empty slices) |" in (tmp_path / "report" / "report.md").read_text()


def test_monitoring_a_false_alarm_rate_that_cannot_exist_is_a_config_error(synthetic_root, tmp_path):
    overrides = [f"data.root={synthetic_root}", "data.download=false", "data.image_size=64", "data.num_workers=0",
                 "trainer=cpu", "trainer.max_epochs=1", "monitor.metric=val/false_alarm_rate", "monitor.mode=min"]
    with pytest.raises(ConfigError, match="monitor.metric=val/false_alarm_rate is never logged: the val split has no"):
        train(compose_train(overrides, tmp_path / "run"))
