"""Checkpoint loading, per-image metrics (every empty case) and the evaluate app end to end."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bts_lightning.checkpoint import CheckpointError, load_module, training_image_size
from bts_lightning.errors import ConfigError
from bts_lightning.evaluate import evaluate, summarize_by_type, tumor_type, worst_positions
from bts_lightning.metrics import (
    METRICS,
    count_cases,
    empty_slices_by_distance,
    image_metrics,
    per_image_overlap,
    summarize,
    summarize_by_truth,
)
from bts_lightning.runtime import run_app
from tests import fixtures_checkpoint
from tests.conftest import run_cli
from tests.fixtures_checkpoint import SYNTHETIC, compose_app

tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below


def square(top: int, left: int, size: int, shape: tuple[int, int] = (10, 10)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = 1
    return mask


# ---------------------------------------------------------------- per-image metrics, by hand


def test_overlapping_masks_score_by_hand():
    truth = square(0, 0, 4)  # 16 px
    prediction = np.zeros((10, 10), np.uint8)
    prediction[0:2, 0:4] = 1  # 8 px, all inside the truth
    scores = image_metrics(prediction, truth)
    assert scores["dice"] == pytest.approx(2 * 8 / (8 + 16))
    assert scores["iou"] == pytest.approx(8 / 16)
    assert scores["precision"] == pytest.approx(1.0)
    assert scores["recall"] == pytest.approx(0.5)
    assert (scores["area_true"], scores["area_pred"]) == (16, 8)


def test_hd95_in_pixels_by_hand():
    # One pixel each, 3 rows and 4 columns apart: every distance is 5.
    a, b = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    a[0, 0], b[3, 4] = 1, 1
    scores = image_metrics(a, b)
    assert scores["hd95"] == pytest.approx(5.0)
    assert scores["dice"] == scores["iou"] == scores["precision"] == scores["recall"] == 0.0
    # 2x2 squares 3 columns apart: directed distances {2, 2, 3, 3} both ways -> 95th percentile 3.
    assert image_metrics(square(2, 5, 2), square(2, 2, 2))["hd95"] == pytest.approx(3.0)
    assert image_metrics(square(2, 2, 3), square(2, 2, 3))["hd95"] == 0.0


def test_perfect_prediction_scores_one():
    scores = image_metrics(square(1, 1, 3), square(1, 1, 3))
    assert [scores[m] for m in METRICS] == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_empty_case_policy():
    empty = np.zeros((30, 40), np.uint8)
    tumor = square(5, 5, 4, (30, 40))
    diagonal = 50.0  # hypot(30, 40)
    both_empty = image_metrics(empty, empty)
    assert [both_empty[m] for m in METRICS] == [1.0, 1.0, 1.0, 1.0, 0.0]
    missed = image_metrics(empty, tumor)
    assert [missed[m] for m in METRICS] == [0.0, 0.0, 0.0, 0.0, diagonal]
    assert (missed["area_true"], missed["area_pred"]) == (16, 0)
    false_alarm = image_metrics(tumor, empty)
    assert [false_alarm[m] for m in METRICS] == [0.0, 0.0, 0.0, 0.0, diagonal]
    assert (false_alarm["area_true"], false_alarm["area_pred"]) == (0, 16)
    assert all(math.isfinite(v) for case in (both_empty, missed, false_alarm) for v in case.values())


def test_dice_and_iou_match_the_training_metric():
    rng = np.random.default_rng(0)
    truths = [rng.random((16, 16)) > 0.6 for _ in range(6)] + [np.zeros((16, 16), bool)] * 2
    preds = [rng.random((16, 16)) > 0.5 for _ in range(6)] + [np.zeros((16, 16), bool), rng.random((16, 16)) > 0.5]
    preds[1] = np.zeros((16, 16), bool)  # a missed tumor
    ours = [image_metrics(p, t) for p, t in zip(preds, truths)]
    for kind in ("dice", "iou"):
        training = per_image_overlap(torch.as_tensor(np.stack(preds)), torch.as_tensor(np.stack(truths)), kind)
        np.testing.assert_allclose([row[kind] for row in ours], training.numpy(), rtol=1e-5)


def test_summaries_keep_every_image_and_group_by_tumor_type():
    rows = [
        {"stem": "a", "tumor_type": "glioma", **image_metrics(square(0, 0, 2), square(0, 0, 2))},  # perfect
        {"stem": "b", "tumor_type": "glioma", **image_metrics(np.zeros((10, 10)), square(0, 0, 2))},  # missed
        {"stem": "c", "tumor_type": None, **image_metrics(np.zeros((10, 10)), np.zeros((10, 10)))},  # both empty
        {"stem": "d", "tumor_type": "meningioma", **image_metrics(square(0, 0, 2), np.zeros((10, 10)))},  # alarm
    ]
    summary = summarize(rows)
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["dice"]["std"] == pytest.approx(0.5)
    assert summary["dice"]["median"] == pytest.approx(0.5)
    assert summary["hd95"]["mean"] == pytest.approx(2 * math.hypot(10, 10) / 4)
    unlabelled = {"stem": "e", "tumor_type": None, **image_metrics(square(0, 0, 2), square(0, 0, 2))}
    groups = summarize_by_type([*rows, unlabelled])  # over the slices with a tumor: c and d show none of a type
    assert sorted(groups) == ["glioma", "unlabelled"]
    assert groups["glioma"]["n"] == 2 and groups["glioma"]["dice"]["mean"] == pytest.approx(0.5)
    assert summarize_by_type([{**row, "tumor_type": None} for row in rows]) is None
    assert count_cases(rows) == {"tumor_present": 2, "tumor_absent": 2, "missed_tumor": 1, "false_alarm": 1,
                                 "both_empty": 1}
    assert [rows[i]["stem"] for i in worst_positions(rows, 3)] == ["b", "d", "a"]
    assert [tumor_type(x) for x in ("1", 2, "3", "7", "", None)] == ["meningioma", "glioma", "pituitary", "7", None,
                                                                       None]


def test_tumor_and_empty_slices_are_scored_apart():
    half = np.zeros((10, 10), np.uint8)
    half[0:2, 0:4] = 1  # 8 of the 16 truth pixels: Dice 2/3
    tumor, empty = square(0, 0, 4), np.zeros((10, 10), np.uint8)
    rows = [image_metrics(prediction, truth) for prediction, truth in [
        (tumor, tumor), (half, tumor), (empty, tumor),  # tumor slices: perfect, partial, missed
        (empty, empty), (square(5, 5, 2), empty), (empty, empty), (square(0, 0, 1), empty),  # 2 false alarms
    ]]
    groups = summarize_by_truth(rows)
    tumor_slices, empty_slices = groups["tumor_slices"], groups["empty_slices"]
    assert (tumor_slices["n"], tumor_slices["detected"]) == (3, 2)
    assert tumor_slices["sensitivity"] == pytest.approx(2 / 3)
    assert tumor_slices["dice"]["mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert tumor_slices["dice"]["median"] == pytest.approx(2 / 3)
    assert tumor_slices["iou"]["mean"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert empty_slices == {"n": 4, "false_alarms": 2, "false_alarm_rate": 0.5, "note": None}
    assert summarize(rows)["dice"]["mean"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 0 + 1 + 0) / 7)  # all slices
    # Every slice has a tumor (the brain_tumor set): no false-alarm rate, and a note saying why.
    no_empty = summarize_by_truth(rows[:3])["empty_slices"]
    assert no_empty["n"] == 0 and no_empty["false_alarm_rate"] is None and "no slice has an empty mask" in no_empty["note"]
    no_tumor = summarize_by_truth(rows[3:])["tumor_slices"]
    assert (no_tumor["dice"], no_tumor["sensitivity"]) == (None, None) and "no slice has a tumor" in no_tumor["note"]


def test_false_alarms_are_grouped_by_the_slices_to_the_scans_nearest_tumor():
    tumor, empty, alarm = square(0, 0, 4), np.zeros((10, 10), np.uint8), square(5, 5, 2)
    # Scan A: tumor on slices 4-5; empty 1, 2, 3, 6, 7, 12 (alarms on 3, 6 and 12). Scan B: no tumor, one alarm.
    slices = [("A", 1, empty, empty), ("A", 2, empty, empty), ("A", 3, alarm, empty), ("A", 4, tumor, tumor),
              ("A", 5, empty, tumor), ("A", 6, alarm, empty), ("A", 7, empty, empty), ("A", 12, alarm, empty),
              ("B", 1, alarm, empty), ("B", 2, empty, empty)]
    rows = [image_metrics(prediction, truth) for _, _, prediction, truth in slices]
    positions = [(scan, number) for scan, number, _, _ in slices]
    groups = empty_slices_by_distance(rows, positions)
    assert {name: (group["n"], group["false_alarms"]) for name, group in groups.items()} == {
        "1": (2, 2), "2": (2, 0), "3-5": (1, 0), "6+": (1, 1), "no tumor slice in the scan": (2, 1)}
    assert groups["1"]["false_alarm_rate"] == 1.0 and groups["2"]["false_alarm_rate"] == 0.0
    assert sum(group["false_alarms"] for group in groups.values()) == summarize_by_truth(rows)["empty_slices"][
        "false_alarms"]
    # Unknown places in a scan, one place twice (two scans in one folder), or no empty slice: no grouping.
    assert empty_slices_by_distance(rows, [*positions[:-1], None]) is None
    assert empty_slices_by_distance(rows, [*positions[:-1], positions[0]]) is None
    assert empty_slices_by_distance(rows[3:5], positions[3:5]) is None
    with pytest.raises(ValueError, match="10 rows but 9 positions"):
        empty_slices_by_distance(rows, positions[:-1])


# ---------------------------------------------------------------- checkpoint loading


def test_load_module_rebuilds_eval_module_without_downloads(tiny_checkpoint, tmp_path):
    saved = torch.load(tiny_checkpoint.path, map_location="cpu", weights_only=True)
    module = load_module(tiny_checkpoint.path)
    assert not module.training
    for key, value in saved["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key
    # A weights name would make the U-Net builder refuse (and torchvision ones download): it is cleared.
    saved["hyper_parameters"]["net"]["weights"] = "DEFAULT"
    torch.save(saved, tmp_path / "named_weights.ckpt")
    assert load_module(tmp_path / "named_weights.ckpt").hparams.net["weights"] is None


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_module(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage.ckpt could not be read .*: it is not a PyTorch checkpoint of bts_lightning, or it is damaged"):
        load_module(tmp_path / "garbage.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="other.ckpt is not a bts_lightning checkpoint"):
        load_module(tmp_path / "other.ckpt")


def test_training_image_size_comes_from_the_run_config(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "paths:\n  output_dir: ${hydra:runtime.output_dir}\n"
        "data:\n  image_size: ${data.synthetic.size}\n  synthetic:\n    size: 96\n"
    )
    assert training_image_size(run / "checkpoints" / "best.ckpt") == 96
    assert training_image_size(tmp_path / "elsewhere.ckpt") is None


# ---------------------------------------------------------------- the app


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # a subprocess (~10 s); evaluate(cfg) writes the same files in-process in the quick tier
def test_evaluate_app_writes_consistent_outputs(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        ["bts_lightning.evaluate", f"ckpt_path={tiny_checkpoint.path}", *tiny_checkpoint.data_overrides,
         "worst_k=3", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dice" in result.stdout and "Dice by tumor type" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    rows = read_rows(run / "per_image.csv")
    assert metrics["split"] == "test" and metrics["n_images"] == len(rows) == 8  # fold 2 of 40 slices
    assert metrics["image_size"] == 64
    for column in (*METRICS, "area_true", "area_pred"):
        values = [float(row[column]) for row in rows]
        assert metrics["summary"][column]["mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12), column
        assert metrics["summary"][column]["median"] == pytest.approx(np.median(values), rel=1e-9, abs=1e-12)
    assert all(row["tumor_type"] in {"meningioma", "glioma", "pituitary"} for row in rows)
    assert sum(group["n"] for group in metrics["by_label"].values()) == 8
    worst_dice = [w["dice"] for w in metrics["worst"]]
    assert len(worst_dice) == 3 and worst_dice == sorted(worst_dice)
    assert worst_dice[0] == pytest.approx(min(float(row["dice"]) for row in rows))
    worst = cv2.imread(str(run / "worst_slices.png"))
    assert worst is not None and worst.shape[0] > 3 * 64 and worst.shape[1] == 4 * 64 + 6
    assert (run / ".hydra" / "config.yaml").is_file()


def test_evaluate_all_slices_with_tta_and_postprocessing(tiny_checkpoint, tmp_path):
    overrides = [f"ckpt_path={tiny_checkpoint.path}", *tiny_checkpoint.data_overrides, "split=all", "tta=true",
                 "postprocess.largest_component=true", "worst_k=0", "device=cpu"]
    (tmp_path / "worst_slices.png").write_bytes(b"an earlier evaluation's, in this reused folder")
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path))
    assert metrics["n_images"] == 40 and metrics["split"] == "all"
    assert metrics["inference"] == {"threshold": 0.5, "tta": True, "largest_component": True, "min_size": 0,
                                   "decision": None, "scan_context": None}
    assert metrics["cascade"] is None
    rows = read_rows(tmp_path / "per_image.csv")
    assert len({row["stem"] for row in rows}) == 40
    assert not (tmp_path / "worst_slices.png").exists()


def test_empty_split_and_bad_checkpoint_are_user_errors(tiny_checkpoint, tmp_path, make_dataset, capsys):
    root = make_dataset([str(i) for i in range(10)], size=64)  # no metadata: random split, no test slices
    cfg = compose_app("evaluate", [f"ckpt_path={tiny_checkpoint.path}", f"data.root={root}", "data.image_size=64",
                                   "data.num_workers=0", "data.split_by=slice", "data.test_fraction=0"],
                      tmp_path / "run")
    with pytest.raises(ConfigError, match="test split .* is empty"):
        evaluate(cfg)
    # What the app's main() does with a user error: one "error:" line and exit status 2.
    cfg = compose_app("evaluate", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "run2")
    with pytest.raises(SystemExit) as exit_info:
        run_app(evaluate, cfg)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: Checkpoint") and "nope.ckpt does not exist" in stderr
    for missing in ([], ["ckpt_path=model.h5"]):
        with pytest.raises(ConfigError, match="ckpt_path"):
            evaluate(compose_app("evaluate", missing, tmp_path / "run3"))


def test_evaluate_an_export_away_from_its_run_at_the_size_it_was_trained_at(tiny_checkpoint, tmp_path, make_dataset,
                                                                              caplog):
    """data.image_size defaults to the model file's contract (64 px here), not the data config's 256."""
    export = pytest.importorskip("bts_lightning.export")
    pytest.importorskip("onnxruntime")
    from bts_lightning.inference import load_predictor

    checkpoint = load_predictor(tiny_checkpoint.path, "cpu")
    model = export.export_model(checkpoint.module, tmp_path / "copied" / "model.onnx", "onnx", 64,
                                contract=checkpoint.contract)
    root = make_dataset([str(i) for i in range(6)], size=32)

    def run(*extra: str) -> dict:
        overrides = [f"ckpt_path={model}", f"data.root={root}", "data.num_workers=0", "data.split_by=slice",
                     "split=all", "worst_k=0", "device=cpu", *extra]
        return evaluate(compose_app("evaluate", overrides, tmp_path / f"run{len(extra)}"), overrides)

    assert run()["image_size"] == 64
    with caplog.at_level(logging.WARNING, logger="bts_lightning.evaluate"):
        assert run("data.image_size=32")["image_size"] == 32  # an explicit size still wins, with a warning
    assert "trained at 64 px but data.image_size=32" in caplog.text


def write_handmade_set(root: Path) -> Path:
    """Six 32x32 Kaggle-layout slices for a model that marks tumor where the image is brighter than 127:
    three tumor slices (found, half found, missed) and three empty ones (one false alarm)."""
    tumor = (slice(8, 16), slice(8, 16))  # 64 px
    cases = {"found": (tumor, tumor), "half": (tumor, (slice(8, 12), slice(8, 16))), "missed": (tumor, None),
             "empty1": (None, None), "empty2": (None, None), "alarm": (None, (slice(20, 24), slice(20, 24)))}
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, (truth, bright) in cases.items():
        image, mask = rng.integers(0, 100, (32, 32), dtype=np.uint8), np.zeros((32, 32), np.uint8)
        if bright:
            image[bright] = 220
        if truth:
            mask[truth] = 255
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return root


def test_evaluate_scores_tumor_and_empty_slices_apart_exactly(tmp_path, monkeypatch):
    """A stand-in model (tumor = pixels brighter than 127) on hand-made slices: every count and rate is known."""
    monkeypatch.setattr("bts_lightning.evaluate.load_predictor", lambda path, device: lambda x: (x[:, 0] > 127).float())
    root = write_handmade_set(tmp_path / "handmade")
    overrides = ["ckpt_path=bright.onnx", f"data.root={root}", "data.name=handmade", "data.image_size=32",
                 "data.num_workers=0", "data.split_by=slice", "split=all", "worst_k=2", "device=cpu"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "run"), overrides)
    assert metrics["dataset"] == "handmade" and metrics["n_images"] == 6
    assert "reads handmade as gray" in metrics["channels"]
    tumor, empty = metrics["tumor_slices"], metrics["empty_slices"]
    assert (tumor["n"], tumor["detected"], empty["n"], empty["false_alarms"]) == (3, 2, 3, 1)
    assert tumor["sensitivity"] == pytest.approx(2 / 3) and empty["false_alarm_rate"] == pytest.approx(1 / 3)
    assert tumor["dice"]["mean"] == pytest.approx((1 + 2 * 32 / (32 + 64)) / 3)  # found, half, missed
    assert metrics["summary"]["dice"]["mean"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 1 + 0) / 6)
    rows = {row["stem"]: row for row in read_rows(tmp_path / "run" / "per_image.csv")}
    assert {row["dataset"] for row in rows.values()} == {"handmade"}
    assert (float(rows["half"]["dice"]), float(rows["alarm"]["dice"]), rows["alarm"]["area_pred"]) == \
        (pytest.approx(2 / 3), 0.0, "16")
    # A 3-channel setting for this 1-channel model: refused before any file is read, naming data.channels.
    with pytest.raises(ConfigError, match=r"data.channels=\[0,1,2\] gives 3 channel\(s\) of handmade, but the model "
                                          r"\(1 channel, trained on unknown data.*takes 1"):
        evaluate(compose_app("evaluate", [*overrides, "data.channels=[0,1,2]"], tmp_path / "bad"),
                 [*overrides, "data.channels=[0,1,2]"])


# ---------------------------------------------------------------- which slices are scored


def test_evaluate_scores_the_split_the_checkpoint_was_trained_with(tmp_path, caplog):
    """A model trained with data.val_fold=3 is scored on fold 3, not on the config's default fold 1."""
    from bts_lightning.train import train
    from tests.conftest import compose_train
    from tests.fixtures_checkpoint import TINY_MODEL

    data = [*SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}"]
    train(compose_train([*data, *TINY_MODEL, "trainer=cpu", "debug=limit", "trainer.max_epochs=1", "logger=csv",
                         "data.val_fold=3", "data.test_fold=null"], tmp_path / "train"))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["BrainTumorDataModule"]["split"]
    trained_val = record["subsets"]["val"]["ids"]

    def scored(overrides: list[str], run: str) -> tuple[dict, list[str]]:
        cfg = compose_app("evaluate", [f"ckpt_path={ckpt}", "split=val", "worst_k=0", "device=cpu", *overrides],
                          tmp_path / run)
        metrics = evaluate(cfg, overrides)
        return metrics, [row["stem"] for row in read_rows(tmp_path / run / "per_image.csv")]

    # Nothing but the checkpoint: its data root, its folds, its image size.
    metrics, stems = scored([], "plain")
    assert sorted(stems) == sorted(trained_val) and metrics["image_size"] == 64
    assert metrics["slices"]["matches_trained_split"] is True and metrics["slices"]["training_slices_scored"] == 0
    assert metrics["split_note"] == (f"{len(stems)} of the {len(stems)} scored slices are the training run's "
                                     "validation slices, which chose its checkpoint (best.ckpt) and drove early "
                                     "stopping and the scheduler: these scores are optimistic.")
    # The data as in training, without data.val_fold: still fold 3 (the config's default is fold 1).
    metrics, stems = scored(data, "same_data")
    assert sorted(stems) == sorted(trained_val) and metrics["slices"]["settings"]["val_fold"] == 3
    # Another fold on purpose: scored, flagged, and the training slices among them counted.
    with caplog.at_level(logging.WARNING):
        metrics, stems = scored([*data, "data.val_fold=1"], "other_fold")
    assert metrics["slices"]["matches_trained_split"] is False
    assert metrics["slices"]["training_slices_scored"] == len(stems) > 0
    assert "NOT the checkpoint's val split" in caplog.text
    # The data changed on disk since training (folds reassigned): refused, unless split=all.
    metadata = Path(record["settings"]["root"]) / "metadata.csv"
    header, *rows = [line.split(",") for line in metadata.read_text().splitlines()]
    fold = header.index("fold")
    first_val_patient = next(row for row in rows if row[fold] == "3")[header.index("pid")]
    for row in rows:
        if row[header.index("pid")] == first_val_patient:
            row[fold] = "1"  # one validation patient moves to a training fold
    metadata.write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    with pytest.raises(ConfigError, match="not the val split this checkpoint was trained with"):
        scored([], "changed")
    overrides = [f"ckpt_path={ckpt}", "split=all", "worst_k=0", "device=cpu"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "all"), overrides)
    assert metrics["slices"]["training_slices_scored"] == record["subsets"]["train"]["n"]
    assert f"{record['subsets']['train']['n']} of the {metrics['n_images']} scored slices are the training run's " \
           "training slices" in metrics["split_note"]


def test_a_model_file_without_its_split_says_to_name_the_data(tiny_checkpoint, tmp_path, monkeypatch):
    """An exported file records no training data: when the config's default data is not there, the error says so."""
    from bts_lightning.errors import DataError
    from bts_lightning.export import export_model

    exported = export_model(load_module(tiny_checkpoint.path), tmp_path / "model.onnx", image_size=64)
    monkeypatch.setenv("BTS_DATA_DIR", str(tmp_path / "no_data"))
    overrides = [f"ckpt_path={exported}", "split=all", "data.download=false"]
    with pytest.raises(DataError, match=rf"\({exported} records no training data, so the evaluate config's default "
                                        r"data \(brain_tumor\) was used: name the data to score"):
        evaluate(compose_app("evaluate", overrides, tmp_path / "run"), overrides)


def test_training_slices_of_another_root_are_matched_by_name_only_and_say_so(tiny_checkpoint, tmp_path, make_dataset,
                                                                            caplog):
    """Flat-layout ids are file stems: another folder's 1.png is a training slice only if it is the same slice read
    from elsewhere, so the count is of names, and metrics.json and the warning say it."""
    root = make_dataset([str(i) for i in range(1, 11)], size=64)  # other images, named like the training slices
    overrides = [f"ckpt_path={tiny_checkpoint.path}", f"data.root={root}", "data.image_size=64", "data.num_workers=0",
                 "data.split_by=slice", "split=all", "worst_k=0", "device=cpu"]
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "other"), overrides)
    named = metrics["slices"]["in_trained_subsets"]["train"]
    assert named > 0 and metrics["slices"]["matched_by"] == "file names only"
    assert (f"Of the 10 scored slices, {named} of them have the names of training slices of "
            f"{tiny_checkpoint.data_dir.resolve()}") in caplog.text
    overrides = [f"ckpt_path={tiny_checkpoint.path}", *tiny_checkpoint.data_overrides, "split=all", "worst_k=0"]
    assert evaluate(compose_app("evaluate", overrides, tmp_path / "own"))["slices"]["matched_by"] == "slice"
    copy = tmp_path / "copy"  # the same slices elsewhere: its test split is the trained one, by their names
    shutil.copytree(tiny_checkpoint.data_dir, copy)
    overrides = [f"ckpt_path={tiny_checkpoint.path}", *SYNTHETIC, f"paths.data_dir={copy}", "split=test", "worst_k=0"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "copied"), overrides)
    assert metrics["slices"]["matches_trained_split"] and metrics["slices"]["matched_by"] == "file names only"
    assert "The 8 scored slices match the checkpoint's test split by file names only" in caplog.text


def test_training_scores_a_blank_slice_as_inference_does(tiny_checkpoint):
    """Inference empties a blank slice (every channel one value); validation in training must count the same masks, or
    its val/test scores differ from evaluate's on data with blank slices (the LGG sample has one)."""
    import lightning as L
    from torch.utils.data import DataLoader

    module = load_module(tiny_checkpoint.path, "cpu")
    module.forward = lambda images: {"out": torch.stack([torch.zeros_like(images[:, 0], dtype=torch.float32),
                                                        torch.ones_like(images[:, 0], dtype=torch.float32)], dim=1)}
    images = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    images[1, 0, :, :16] = 200  # not blank: the tumor-everywhere model's false alarm
    batch = {"image": images, "mask": torch.zeros(2, 32, 32, dtype=torch.long)}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, DataLoader([batch], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/false_alarm_rate"] == pytest.approx(0.5)
    assert trainer.callback_metrics["val/dice"] == pytest.approx(0.5)  # the blank slice: both empty, Dice 1


def test_captions_fit_their_panel_and_keep_the_end_of_a_long_slice_id():
    """LGG slice ids are long: at 64 px the worst-slice captions lost the slice number and the scores."""
    from bts_lightning.visualize import MIN_CAPTION_SCALE, captioned, fitted_caption

    stem = "kaggle_3m/TCGA_DU_5852_19950709/TCGA_DU_5852_19950709_12"
    text, scale = fitted_caption(stem, 256, 0.5)
    assert text.startswith("...") and text.endswith("_19950709_12") and scale == MIN_CAPTION_SCALE
    assert cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= 256
    assert fitted_caption("Dice 0.123  HD95 4.5", 256, 0.5) == ("Dice 0.123  HD95 4.5", 0.5)  # fits: unchanged
    row = np.zeros((64, 262, 3), np.uint8)
    shown = captioned(row, stem, "Dice 0.123  HD95 4.5")
    assert shown.shape == (64 + 2 * 14, 262, 3) and (shown[:28, -3:] == 32).all()  # two bands, text off the edge


def test_a_split_note_only_when_scored_slices_chose_or_trained_the_model():
    from bts_lightning.evaluate import split_note

    assert split_note({"n": 8, "in_trained_subsets": {"train": 0, "val": 0, "test": 8, "none": 0}}) is None
    assert split_note({"n": 8, "in_trained_subsets": None}) is None  # no split record: nothing to tell
    assert split_note({"n": 8, "in_trained_subsets": {"train": 2, "val": 0, "test": 6}}) == (
        "2 of the 8 scored slices are the training run's training slices: these scores are optimistic.")
