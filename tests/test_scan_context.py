"""Scan context: a cascade's presence judged with the neighbouring slices of the same scan."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bts_lightning.cascade import calibrate_context, cascade
from bts_lightning.checkpoint import load_module
from bts_lightning.data.io import read_channels
from bts_lightning.data.neighbours import slice_position
from bts_lightning.decision import false_alarm_bound
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.evaluate import evaluate
from bts_lightning.export import export, export_model
from bts_lightning.hub import save_pretrained
from bts_lightning.inference import load_predictor, predict_probabilities
from bts_lightning.models.cascade import build_cascade, cascade_of
from bts_lightning.predict import predict
from bts_lightning.scan_context import (
    ScanContext,
    check_context,
    check_scan_layout,
    context_means,
    setting,
)
from bts_lightning.train import train
from tests.conftest import compose_app, compose_train
from tests.test_cascade import FixedLogits

SIZE = 32


def test_a_slice_is_its_folder_and_the_number_its_name_ends_with():
    assert slice_position(Path("lgg/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif")) == (
        "lgg/TCGA_CS_4941_19960909", 12)
    assert slice_position("scan/slice007.png") == ("scan", 7)
    assert slice_position("scan/flair.png") is None


def test_the_context_threshold_meets_the_target_on_the_split_or_on_new_slices():
    # 20 empty slices in one scan (numbered 0-19) whose context means are distinct, and one tumor slice elsewhere
    scores = [float(i % 7) / 10 + i / 1000 for i in range(20)] + [0.9]
    positions = [("e", i) for i in range(20)] + [("t", 0)]
    tumor = [False] * 20 + [True]
    means = context_means(scores, positions, 1)[:20]
    for target_on, above in (("split", 2), ("new_slices", 1)):  # floor(0.1 * 20); floor(0.1 * 21) - 1
        context, record = calibrate_context(scores, tumor, positions, 1, 0.1, 0.5, "val", target_on)
        assert sum(mean > context.threshold for mean in means) == above
        assert record["false_alarm_rate"] == pytest.approx(above / 20)
        expected = false_alarm_bound(20, 0.1, target_on=target_on)[0]
        assert record["on_new_empty_slices"]["expected_false_alarm_rate"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="has 20 empty slices, too few .* needs at least 99"):
        calibrate_context(scores, tumor, positions, 1, 0.01, 0.5, "val", "new_slices")


def test_each_presence_is_averaged_with_the_neighbours_present_in_its_own_scan():
    positions = [("a", 1), ("a", 2), ("a", 3), ("a", 5), ("b", 2), None]
    values = [0.9, 0.3, 0.6, 0.2, 0.8, 0.7]
    assert context_means(values, positions, 1) == pytest.approx([0.6, 0.6, 0.45, None, None, None], nan_ok=False)
    two = context_means(values, positions, 2)
    assert two[:4] == pytest.approx([0.6, 0.6, (0.9 + 0.3 + 0.6 + 0.2) / 4, 0.4]) and two[4:] == [None, None]
    with pytest.raises(DataError, match=r"a: slice 2\); a cascade's scan context needs .*, or pass context=0"):
        context_means([0.9, 0.1, 0.1], [("a", 1), ("a", 2), ("a", 2)], 1, fix="pass context=0")  # two scans in "a"


def test_slices_with_neighbours_use_the_context_threshold_and_lone_slices_the_slice_threshold():
    context = ScanContext(context=1, threshold=0.5, slice_threshold=0.75)
    positions = [("a", 1), ("a", 2), ("a", 3), ("b", 7), ("c", 1)]
    # scan a: window means 0.45, 0.4, 0.3; b and c: one slice each, judged alone against 0.75
    values = [0.6, 0.3, 0.3, 0.7, 0.8]
    decided = context.decide(values, positions)
    assert [score for score, _ in decided] == pytest.approx([0.45, 0.4, 0.3, 0.7, 0.8])
    assert [present for _, present in decided] == [False, False, False, False, True]
    assert ScanContext(1, 0.35, 0.75).present(values, positions) == [True, True, False, False, True]


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="context=-1 must be a whole number >= 0"):
        check_context(-1)
    with pytest.raises(ConfigError, match=r"data/x is in the kaggle layout.*scan_context=off"):
        check_scan_layout("kaggle", "data/x")
    check_scan_layout("suffix", "data/x")
    with pytest.raises(ConfigError, match="context_threshold=None must be a number in"):
        build_cascade(FixedLogits(), FixedLogits(), context=1)
    with pytest.raises(ConfigError, match="scan_context=sometimes must be auto"):
        setting({"scan_context": "sometimes"})
    assert setting({"scan_context": False}) == "off" and setting({}) == "auto"  # YAML reads off as false


# ------------------------------------------------------------------------------------------- the apps

def _scan_folders(flat: Path, out: Path) -> Path:
    """The synthetic set ``flat`` (Kaggle layout, metadata pid) rewritten one folder per patient scan, the suffix
    layout of the LGG set: ``SCAN/SCAN_<n>.png`` beside ``SCAN/SCAN_<n>_mask.png``, n counting each patient's slices."""
    with (flat / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    numbers: dict[str, int] = {}
    for row in rows:
        scan = f"SYN_SC_{int(row['pid']):04d}_2000"
        numbers[scan] = numbers.get(scan, 0) + 1
        (out / scan).mkdir(parents=True, exist_ok=True)
        shutil.copy(flat / "images" / f"{row['index']}.png", out / scan / f"{scan}_{numbers[scan]}.png")
        shutil.copy(flat / "masks" / f"{row['index']}.png", out / scan / f"{scan}_{numbers[scan]}_mask.png")
    return out


def _data(root: Path) -> list[str]:
    return ["data=lgg", f"data.root={root}", "data.channels=gray", f"data.image_size={SIZE}", "data.test_fold=2",
            "data.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def scan_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tumor-only run and a run with empty slices on synthetic scans in folders, and their context cascade."""
    from bts_lightning.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("scans")
    flat = generate_dataset(base / "flat", n=60, size=SIZE, seed=5, slices_per_patient=6, empty_fraction=0.5)
    root = _scan_folders(flat, base / "scans")
    common = [*_data(root), "trainer=cpu", "trainer.max_epochs=2", "logger=csv", "test=false",
              "model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "model.net.num_res_units=1"]
    paths = {"root": root, "flat": flat}
    for name, extra in (("segmentation", "data.empty_fraction=0"), ("presence", "loss=dice_ce_slice")):
        torch.manual_seed(0)
        train(compose_train([*common, extra], base / name))
        paths[name] = base / name / "checkpoints" / "last.ckpt"
    overrides = [f"segmentation={paths['segmentation']}", f"presence={paths['presence']}", "context=1",
                 "target_false_alarm_rate=0.2"]
    paths["record"] = base / "cascade"
    cascade(compose_app("cascade", overrides, paths["record"]), [])
    paths["cascade"] = paths["record"] / "checkpoints" / "cascade.ckpt"
    return paths


def _split(runs: dict[str, Path], split: str) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image files of a split of the scans (as the cascade's datamodule splits them), images and tumor truths."""
    from hydra.utils import instantiate

    cfg = compose_train([*_data(runs["root"])], runs["root"].parent / "x")
    datamodule = instantiate(cfg.data, augmentations=None)
    datamodule.setup("test")
    dataset = datamodule.datasets[split]
    files = [dataset.pairs[index].image for index in dataset.indices]
    images, masks = zip(*(dataset.load(i) for i in range(len(dataset))))
    return files, np.stack(images), np.array([mask.any() for mask in masks])


def _oracle(runs: dict[str, Path], images: np.ndarray, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, from the two runs' own predictors: the flip-averaged presence probability and the mean of it
    over the slice and its neighbours in its scan (NaN without neighbours)."""
    presence = predict_probabilities(load_predictor(runs["presence"], "cpu"), images, tta=True)
    scores = presence.flatten(1).amax(dim=1).numpy()
    means = []
    for file, score in zip(files, scores):
        window = [scores[files.index(other)] for other in files
                  if other.parent == file.parent and abs(int(other.stem.rsplit("_", 1)[1])
                                                        - int(file.stem.rsplit("_", 1)[1])) == 1]
        means.append(np.mean([score, *window]) if window else np.nan)
    return scores, np.array(means)


def test_the_cascade_calibrates_the_context_threshold_on_the_val_scans(scan_runs):
    """The context threshold is the calibrated one of the val empty slices' window means; both thresholds and
    what the context reaches are recorded."""
    record = json.loads((scan_runs["record"] / "cascade.json").read_text())
    files, images, tumor = _split(scan_runs, "val")
    _, means = _oracle(scan_runs, images, files)
    empty = sorted(means[~tumor & ~np.isnan(means)], reverse=True)
    expected = empty[math.floor(0.2 * len(empty) + 1e-9)]
    context = record["scan_context"]
    assert context["context"] == 1 and context["threshold"] == pytest.approx(expected, abs=1e-6)
    assert context["slice_threshold"] == record["presence_threshold"]
    assert context["false_alarm_rate"] <= 0.2 and context["n_empty"] == int((~tumor).sum())
    # What new empty slices can expect, from the number of empty slices each threshold was chosen on.
    assert context["on_new_empty_slices"]["expected_false_alarm_rate"] == pytest.approx(
        (math.floor(0.2 * len(empty) + 1e-9) + 1) / (len(empty) + 1))
    presence = record["presence_on_split"]
    assert presence["on_new_empty_slices"]["false_alarm_rate_upper_95"] == pytest.approx(
        false_alarm_bound(presence["n_empty"], 0.2)[1])
    net = torch.load(scan_runs["cascade"], map_location="cpu", weights_only=True)["hyper_parameters"]["net"]
    assert net["context"] == 1 and net["context_threshold"] == context["threshold"]


def test_evaluate_keeps_the_segmentation_where_the_scan_context_says_tumor(scan_runs, tmp_path):
    files, images, tumor = _split(scan_runs, "test")
    scores, means = _oracle(scan_runs, images, files)
    context = json.loads((scan_runs["record"] / "cascade.json").read_text())["scan_context"]
    present = np.where(np.isnan(means), scores > context["slice_threshold"], means > context["threshold"])
    segmentation = predict_probabilities(load_predictor(scan_runs["segmentation"], "cpu"), images).numpy() > 0.5
    expected_area = np.where(present, segmentation.sum(axis=(1, 2)), 0)

    overrides = [f"ckpt_path={scan_runs['cascade']}", "split=test"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "eval"), overrides)
    with (tmp_path / "eval" / "per_image.csv").open() as handle:
        areas = [float(row["area_pred"]) for row in csv.DictReader(handle)]
    assert areas == expected_area.tolist()
    assert metrics["inference"]["scan_context"]["threshold"] == context["threshold"]
    assert metrics["cascade"]["context_threshold"] == context["threshold"] and metrics["cascade"]["context"] == 1
    assert metrics["inference"]["decision"] is None and "held out" in metrics["decision_note"]
    # The false alarms on empty slices, by how many slices away the nearest tumor slice of their scan is.
    numbers = [(file.parent.name, int(file.stem.rsplit("_", 1)[1])) for file in files]
    expected: dict[str, list[int]] = {}
    for (scan, number), has_tumor, area in zip(numbers, tumor, expected_area):
        if has_tumor:
            continue
        gaps = [abs(number - other) for (other_scan, other), other_tumor in zip(numbers, tumor)
                if other_scan == scan and other_tumor]
        name = ("no tumor slice in the scan" if not gaps else "1" if min(gaps) == 1 else "2" if min(gaps) == 2
                else "3-5" if min(gaps) <= 5 else "6+")
        expected.setdefault(name, [0, 0])
        expected[name] = [expected[name][0] + 1, expected[name][1] + int(area > 0)]
    by_distance = metrics["empty_slices"]["by_distance_to_tumor"]
    assert {name: [group["n"], group["false_alarms"]] for name, group in by_distance.items() if group["n"]} == expected

    alone = [*overrides, "scan_context=off"]  # the network's own slice-alone gate
    alone_metrics = evaluate(compose_app("evaluate", alone, tmp_path / "alone"), alone)
    assert alone_metrics["inference"]["scan_context"] is None


def test_flat_layouts_are_refused_with_the_way_out(scan_runs, tmp_path):
    flat = [f"ckpt_path={scan_runs['cascade']}", "split=all", "data=brain_tumor",
            f"data.root={scan_runs['flat']}", f"data.image_size={SIZE}"]
    with pytest.raises(ConfigError, match=r"kaggle layout.*Pass scan_context=off"):
        evaluate(compose_app("evaluate", flat, tmp_path / "flat"), flat)
    alone = [*flat, "scan_context=off"]  # each slice alone: scored, but with no scans to group empty slices by
    metrics = evaluate(compose_app("evaluate", alone, tmp_path / "alone"), alone)
    assert metrics["empty_slices"]["n"] > 0 and metrics["empty_slices"]["by_distance_to_tumor"] is None
    overrides = [f"segmentation={scan_runs['segmentation']}", f"presence={scan_runs['presence']}", "context=1",
                 "data=brain_tumor", f"data.root={scan_runs['flat']}", f"data.image_size={SIZE}"]
    with pytest.raises(ConfigError, match=r"Pass context=0"):
        cascade(compose_app("cascade", overrides, tmp_path / "joined"), overrides)


def test_predict_takes_the_folder_as_one_scan_and_a_lone_file_alone(scan_runs, tmp_path, caplog):
    scan_folder = min(path for path in scan_runs["root"].iterdir() if path.is_dir())
    scan = tmp_path / scan_folder.name  # the scan's slices without their masks
    scan.mkdir()
    for path in scan_folder.glob("*.png"):
        if not path.stem.endswith("_mask"):
            shutil.copy(path, scan / path.name)
    files = sorted(scan.glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    images = np.stack([read_channels(path, None) for path in files])
    scores, means = _oracle(scan_runs, images, files)
    context = json.loads((scan_runs["record"] / "cascade.json").read_text())["scan_context"]
    segmented = (predict_probabilities(load_predictor(scan_runs["segmentation"], "cpu"), images) > 0.5).numpy()

    result = predict(compose_app("predict", [f"ckpt_path={scan_runs['cascade']}", f"input={scan}",
                                             f"output={tmp_path / 'scan_out'}"], tmp_path))
    by_file = {row["file"]: row for row in result["slices"]}
    assert [by_file[path.name]["score"] for path in files] == pytest.approx(means.tolist())
    assert [by_file[path.name]["tumor_present"] for path in files] == [
        bool(mean > context["threshold"] and mask.any()) for mean, mask in zip(means, segmented)]
    assert result["scan_context"]["threshold"] == context["threshold"]

    alone = predict(compose_app("predict", [f"ckpt_path={scan_runs['cascade']}", f"input={scan}", "scan_context=off",
                                            f"output={tmp_path / 'alone'}"], tmp_path))
    gated = (predict_probabilities(load_predictor(scan_runs["cascade"], "cpu"), images) > 0.5).numpy()
    assert alone["scan_context"] is None
    assert [row["tumor_present"] for row in alone["slices"]] == [bool(mask.any()) for mask in gated]

    lone = predict(compose_app("predict", [f"ckpt_path={scan_runs['cascade']}", f"input={files[0]}",
                                           f"output={tmp_path / 'lone'}"], tmp_path))
    assert lone["slices"][0]["score"] == pytest.approx(scores[0])
    joined = load_predictor(scan_runs["cascade"], "cpu")  # the network's own slice-alone gate
    assert lone["slices"][0]["tumor_present"] == bool((predict_probabilities(joined, images[:1]) > 0.5).any())

    two_scans = tmp_path / "two_scans"  # another scan's slices with the same numbers in the folder: not one scan
    shutil.copytree(scan, two_scans)
    for path in files[:2]:
        shutil.copy(path, two_scans / f"other_{path.stem.rsplit('_', 1)[1]}.png")
    with pytest.raises(DataError, match=r"2 slice number\(s\) occur more than once in one folder .*a cascade's scan "
                                        r"context needs .*, or pass scan_context=off"):
        predict(compose_app("predict", [f"ckpt_path={scan_runs['cascade']}", f"input={two_scans}",
                                        f"output={tmp_path / 'two_out'}"], tmp_path))

    folder = save_pretrained(scan_runs["cascade"], tmp_path / "hub")  # a hub folder keeps the scan context
    assert "Scan context:" in (folder / "README.md").read_text()
    assert cascade_of(load_predictor(folder, "cpu")).context == 1

    with caplog.at_level(logging.WARNING, logger="bts_lightning.export"):
        export_model(load_module(scan_runs["cascade"]), tmp_path / "cascade.onnx", image_size=SIZE)
    assert "judges each slice alone" in caplog.text


def test_networks_trained_on_the_same_scans_through_another_root_join(scan_runs, tmp_path):
    """A presence network whose record reads the scans through a parent folder (ids ``scans/<scan>/<slice>``) held out
    the same slices as the segmentation network: the cascade joins them; another val split is still refused."""
    from bts_lightning.cascade import check_compatible
    from bts_lightning.data.splits import slice_ids_digest

    checkpoint = torch.load(scan_runs["presence"], map_location="cpu", weights_only=True)
    record = checkpoint["BrainTumorDataModule"]["split"]
    record["settings"]["root"] = str(scan_runs["root"].parent)
    for subset in record["subsets"].values():
        subset["ids"] = [f"scans/{slice_id}" for slice_id in subset["ids"]]
        subset["sha256"] = slice_ids_digest(subset["ids"])
    through_parent = tmp_path / "through_parent.ckpt"
    torch.save(checkpoint, through_parent)
    check_compatible(scan_runs["segmentation"], through_parent)

    record["subsets"]["val"]["ids"], record["subsets"]["train"]["ids"] = (
        record["subsets"]["train"]["ids"][: len(record["subsets"]["val"]["ids"])], record["subsets"]["val"]["ids"])
    record["subsets"]["val"]["sha256"] = slice_ids_digest(record["subsets"]["val"]["ids"])
    torch.save(checkpoint, through_parent)
    with pytest.raises(ConfigError, match="trained on different splits"):
        check_compatible(scan_runs["segmentation"], through_parent)


def test_held_out_is_judged_by_the_slices_whatever_root_they_are_read_from(scan_runs, tmp_path):
    """The same scans read through another root (a parent folder, links to some patients) are the same slices: the
    checkpoint's val split is still its val split, and training patients are still training slices."""
    record = torch.load(scan_runs["cascade"], map_location="cpu", weights_only=True)["BrainTumorDataModule"]["split"]
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "scans").symlink_to(scan_runs["root"], target_is_directory=True)
    overrides = [f"ckpt_path={scan_runs['cascade']}", f"data.root={parent}", "split=val", "worst_k=0"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "val"), overrides)
    assert metrics["slices"]["matches_trained_split"] is True
    assert metrics["slices"]["in_trained_subsets"] == {"train": 0, "val": record["subsets"]["val"]["n"], "test": 0,
                                                       "none": 0}
    assert "scored here" in metrics["decision_note"] and metrics["false_alarm_check"] is None

    trained = tmp_path / "trained_patients"  # links to the training patients' scans only
    trained.mkdir()
    for scan in sorted({slice_id.split("/")[0] for slice_id in record["subsets"]["train"]["ids"]}):
        (trained / scan).symlink_to(scan_runs["root"] / scan, target_is_directory=True)
    overrides = [f"ckpt_path={scan_runs['cascade']}", f"data.root={trained}", "split=all", "worst_k=0"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "all"), overrides)
    n_train = record["subsets"]["train"]["n"]
    assert metrics["slices"]["in_trained_subsets"] == {"train": n_train, "val": 0, "test": 0, "none": 0}
    assert metrics["slices"]["training_slices_scored"] == n_train == metrics["n_images"]
    assert metrics["decision_note"] == (f"scan context calibrated on the val split, but {n_train} of the slices "
                                        "scored here were training slices (optimistic).")


def test_a_decision_calibrated_on_a_context_cascade_applies_where_slices_are_judged_alone(scan_runs, tmp_path,
                                                                                        caplog):
    """``calibrate`` scores slices alone: it says so for a scan-context cascade, whose scans evaluate and predict
    judge with the context instead (saying so once, without claiming the slice decision)."""
    from bts_lightning.calibrate import calibrate

    copy = tmp_path / "cascade.ckpt"
    shutil.copy(scan_runs["cascade"], copy)
    overrides = [f"ckpt_path={copy}", "target_false_alarm_rate=0.2"]
    with caplog.at_level(logging.INFO):
        calibrate(compose_app("calibrate", overrides, tmp_path / "cal"), overrides)
    assert "is a cascade with a scan context (1 slice(s) either side)" in caplog.text
    caplog.clear()
    scanned = [f"ckpt_path={copy}", "split=val"]
    with caplog.at_level(logging.INFO):
        metrics = evaluate(compose_app("evaluate", scanned, tmp_path / "scans"), scanned)
    assert metrics["inference"]["decision"] is None and metrics["inference"]["scan_context"] is not None
    assert "in place of the model's slice decision" in caplog.text and "Slice decision: tumor present iff" not in caplog.text
    alone = [*scanned, "scan_context=off"]
    assert evaluate(compose_app("evaluate", alone, tmp_path / "alone"), alone)["inference"]["decision"] is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bts_lightning.export"):
        export(compose_app("export", [f"ckpt_path={copy}", f"output={tmp_path / 'joined.onnx'}"], tmp_path / "ex"))
    assert "is not part of joined.onnx" in caplog.text  # the file written, not the file it was checked in
