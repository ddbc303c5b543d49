"""benchmarks/accuracy_table.py: collecting runs laid out as benchmarks/accuracy_run.sh leaves them, and the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import accuracy_table


def summary(dice_mean: float, dice_median: float) -> dict:
    return {"dice": {"mean": dice_mean, "median": dice_median, "std": 0.1},
            "iou": {"mean": dice_mean - 0.1, "median": dice_median - 0.1, "std": 0.1},
            "hd95": {"mean": 12.34, "median": 3.0, "std": 5.0}}


def write_run(runs: Path, model: str, train: dict | None, last: dict | None, best: dict | None) -> None:
    (runs / f"{model}.command").write_text(f"python -m bts_lightning.train model={model}\n")
    run = runs / model
    run.mkdir()
    if train is not None:
        (run / "metrics.json").write_text(json.dumps(train))
    for which, scores in (("last", last), ("best", best)):
        if scores is not None:
            (run / f"evaluate_{which}").mkdir()
            (run / f"evaluate_{which}" / "metrics.json").write_text(json.dumps(
                {"summary": scores, "n_images": 570, "split": "val", "checkpoint": f"{which}.ckpt", "image_size": 256}))


def test_collected_runs_become_rows_with_the_honest_and_the_chosen_scores(tmp_path):
    write_run(tmp_path, "unet", {"num_params": 1_630_000, "train_time_s": 95.4, "epochs_trained": 40, "best_epoch": 31},
              summary(0.712, 0.845), summary(0.731, 0.851))
    write_run(tmp_path, "fcn", None, None, None)  # training failed: a row of n/a, not a crash
    results = accuracy_table.collect(tmp_path, val_fold=1)
    assert set(results["machine"]) >= {"gpu", "torch", "cuda", "lightning", "date"}
    assert list(results["models"]) == ["fcn", "unet"]
    text = accuracy_table.markdown(results)
    assert "validation fold 1 (570 slices at 256 px)" in text
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["unet"] == ["unet", "1.63", "40", "95", "0.712 / 0.845", "0.612", "12.3", "0.731 / 0.851", "31"]
    assert rows["fcn"] == ["fcn", *["n/a"] * 8]
    assert "python -m bts_lightning.train model=unet" in text.split("Commands:")[1]


def test_a_folder_without_runs_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run benchmarks/accuracy_run.sh first"):
        accuracy_table.collect(tmp_path, val_fold=1)
