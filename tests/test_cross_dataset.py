"""Cross-dataset validation: experiment=cross_dataset both ways, evaluate data=<other set>, channel mapping, report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bts_lightning.errors import ConfigError, DataError
from bts_lightning.evaluate import evaluate
from bts_lightning.report import report_app
from bts_lightning.train import train
from bts_lightning.trained_split import channel_mapping, data_config, explicit_data, override_keys
from tests.conftest import REAL_DATA, compose_app, compose_train
from tests.fixtures_checkpoint import TINY_MODEL

LGG_SAMPLE = REAL_DATA.parent / "lgg-sample"
# One epoch of the tiny U-Net at 32 px, on the CPU, without TensorBoard.
TINY_RUN = [*TINY_MODEL, "trainer=cpu", "trainer.max_epochs=1", "logger=csv", "data.image_size=32",
            "data.batch_size=4", "data.num_workers=0", "cross_evaluate.device=cpu", "cross_evaluate.worst_k=2"]


def blob(size: int, at: int, width: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[at : at + width, at : at + width] = 255
    return mask


def write_gray_set(root: Path, n: int = 16, size: int = 32) -> Path:
    """A Kaggle-layout gray set (``images/``, ``masks/``, ``metadata.csv`` folds 1-4): a tumor on every slice."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    rows = ["index,label,fold"]
    for i in range(1, n + 1):
        mask = blob(size, 4 + i % 12)
        image = np.clip(rng.normal(60, 15, (size, size)) + (mask > 0) * 120, 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{i}.png"), mask)
        rows.append(f"{i},{1 + i % 3},{1 + i % 4}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def write_flair_set(root: Path, patients: int = 6, size: int = 32) -> Path:
    """A suffix-layout (LGG-like) 3-channel set: per patient slices 1 and 3 empty, slice 2 with a tumor bright in
    channel 1 (FLAIR); 18 slices, 6 with a tumor, 12 empty."""
    rng = np.random.default_rng(2)
    for p in range(patients):
        folder = root / "kaggle_3m" / f"TCGA_XX_000{p}_2000010{p}"
        folder.mkdir(parents=True)
        for n in (1, 2, 3):
            mask = blob(size, 6 + p) if n == 2 else np.zeros((size, size), np.uint8)
            rgb = np.clip(rng.normal(60, 15, (size, size, 3)), 0, 255).astype(np.uint8)
            rgb[..., 1] = np.clip(rgb[..., 1] + (mask > 0) * 120, 0, 255)
            Image.fromarray(rgb).save(folder / f"{folder.name}_{n}.tif")
            cv2.imwrite(str(folder / f"{folder.name}_{n}_mask.tif"), mask)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cross")
    return write_gray_set(base / "gray"), write_flair_set(base / "flair")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- channel mapping and which settings apply


def test_channel_mapping_says_which_channels_feed_the_model_and_refuses_another_count():
    trained = {"name": "brain_tumor", "channels": "gray"}
    assert channel_mapping(1, trained, (1,), "lgg") == \
        "model (1 channel, trained on brain_tumor: gray) reads channel [1] of lgg (file order)"
    assert channel_mapping(1, {"name": "lgg", "channels": [1]}, None, "brain_tumor") == \
        "model (1 channel, trained on lgg: [1]) reads brain_tumor as gray (each image converted to one grayscale channel)"
    assert channel_mapping(3, {"name": "lgg", "channels": (0, 1, 2)}, (2, 1, 0), "lgg_full").endswith(
        "reads channels [2, 1, 0] of lgg_full (file order)")
    with pytest.raises(ConfigError, match=r"data.channels=\[0,1,2\] gives 3 channel\(s\) of lgg, but the model "
                                          r"\(1 channel, trained on brain_tumor: gray\) takes 1: .* e.g. data.channels=gray"):
        channel_mapping(1, trained, (0, 1, 2), "lgg")
    with pytest.raises(ConfigError, match=r"cross_data.channels=gray gives 1 .* e.g. cross_data.channels=\[0,1,2\]"):
        channel_mapping(3, {"name": "lgg", "channels": [0, 1, 2]}, None, "brain_tumor", key="cross_data.channels")


def test_only_a_data_group_or_root_means_other_data(tmp_path):
    """data.num_workers=0 alone keeps the trained root and split; data=lgg (another dataset) takes nothing but the
    image size from the checkpoint; data.root keeps the trained split settings."""
    trained_root = tmp_path / "trained"
    trained_root.mkdir()
    record = {"method": "folds", "leaky": False, "subsets": {}, "settings": {
        "name": "brain_tumor", "root": str(trained_root), "layout": "kaggle", "channels": "gray", "mask_suffix": "_mask",
        "patient_pattern": None, "split_by": "fold", "val_fold": 3, "test_fold": None, "num_folds": None,
        "val_fraction": 0.2, "test_fraction": 0.0, "seed": 7}}

    def data(*overrides: str):
        cfg = compose_app("evaluate", list(overrides), tmp_path / "run")
        return data_config(cfg.data, record, override_keys(overrides), 64)

    loader_only = data("data.num_workers=0", "data.batch_size=2")
    assert (loader_only.root, loader_only.val_fold, loader_only.seed, loader_only.num_workers) == \
        (str(trained_root), 3, 7, 0)
    assert not explicit_data(override_keys(["data.num_workers=0", "data.batch_size=2"]))
    other_root = data(f"data.root={tmp_path}")
    assert (other_root.root, other_root.val_fold, other_root.name) == (str(tmp_path), 3, "brain_tumor")
    lgg = data("data=lgg")
    assert (lgg.name, lgg.layout, lgg.channels, lgg.num_folds, lgg.val_fold, lgg.seed, lgg.image_size) == \
        ("lgg", "suffix", [1], 5, 1, 42, 64)
    assert lgg.root != str(trained_root) and explicit_data({"data"})
    same = data("data=brain_tumor")  # the trained dataset named again: its split settings still apply
    assert (same.val_fold, same.seed) == (3, 7)


def test_cross_data_is_any_data_option_at_the_training_size(tmp_path):
    cfg = compose_train(["experiment=cross_dataset", "data=lgg", "data.image_size=64", "data@cross_data=synthetic"],
                        tmp_path / "run")
    assert (cfg.data.name, cfg.cross_data.name, cfg.cross_data.image_size) == ("lgg", "synthetic", 64)
    assert cfg.cross_data.root.endswith("synthetic/n400-size128-seed0")  # its own generator settings, not data's
    assert compose_train(["experiment=cross_dataset"], tmp_path / "run").cross_data.channels == [1]  # lgg: FLAIR


@pytest.mark.parametrize(("setting", "message"), [
    ("cross_evaluate.threshold=2", r"cross_evaluate.threshold=2.0 must be in \[0, 1\)"),
    ("cross_evaluate.tta=maybe", 'cross_evaluate.tta="maybe" is not true or false; pass cross_evaluate.tta=true'),
    ("cross_evaluate.postprocess.min_size=2.5", "cross_evaluate.postprocess.min_size=2.5 is not a whole number"),
    ("+cross_evaluate.slice_decision=on", "cross_evaluate.slice_decision=on must be auto"),
])
def test_cross_evaluate_settings_are_refused_by_their_own_key(tmp_path, setting, message):
    from bts_lightning.cross_dataset import evaluate_options

    with pytest.raises(ConfigError, match=f"^{message}"):
        evaluate_options(compose_train(["experiment=cross_dataset", setting], tmp_path / "run"))


def test_cross_data_channels_are_checked_before_training(tmp_path, datasets):
    gray, flair = datasets
    cfg = compose_train(["experiment=cross_dataset", f"data.root={gray}", f"cross_data.root={flair}",
                         "cross_data.channels=[0,1,2]", *TINY_RUN], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"cross_data.channels=\[0,1,2\] gives 3 channel\(s\) of lgg, but the model "
                                          r"\(1 channel, trained on brain_tumor: gray\) takes 1"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_model_with_scan_neighbours_needs_a_cross_dataset_of_scans_before_training(tmp_path, datasets):
    gray, flair = datasets
    cfg = compose_train(["experiment=cross_dataset", "data=lgg", f"data.root={flair}", "data.neighbours=1",
                         "data@cross_data=brain_tumor", f"cross_data.root={gray}", *TINY_RUN], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"cross_data brain_tumor .* kaggle layout.*data.neighbours=1 scan neighbours"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()



def test_a_cross_dataset_that_cannot_be_read_stops_the_run_before_training(tmp_path, datasets):
    """A missing folder or a slice without its mask fails before training, naming the cross_data keys and file."""
    gray, flair = datasets
    missing = tmp_path / "nowhere"
    cfg = compose_train(["experiment=cross_dataset", f"data.root={gray}", f"cross_data.root={missing}",
                         "cross_data.download=false", *TINY_RUN], tmp_path / "run")
    with pytest.raises(DataError, match=rf"^cross_data: Dataset root {missing} does not exist.*cross_data.root=DIR"):
        train(cfg)
    broken = tmp_path / "broken"
    shutil.copytree(flair, broken)
    lost = min(broken.rglob("*_2_mask.tif"))
    lost.unlink()
    cfg = compose_train(["experiment=cross_dataset", f"data.root={gray}", f"cross_data.root={broken}",
                         *TINY_RUN], tmp_path / "run")
    with pytest.raises(DataError, match=rf"^cross_data: .*{lost.name.replace('_mask', '')}"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- experiment=cross_dataset end to end


def check_cross_outputs(run: Path, name: str, n: int, tumor: int) -> dict:
    """The cross-dataset evaluation's files in ``run/cross_dataset/<name>/``; returns its metrics.json."""
    metrics = json.loads((run / "cross_dataset" / name / "metrics.json").read_text())
    rows = read_csv(run / "cross_dataset" / name / "per_image.csv")
    assert metrics["dataset"] == name and metrics["split"] == "all" and metrics["n_images"] == len(rows) == n
    assert {row["dataset"] for row in rows} == {name}
    assert (metrics["tumor_slices"]["n"], metrics["empty_slices"]["n"]) == (tumor, n - tumor)
    assert sum(int(row["area_true"]) > 0 for row in rows) == tumor
    return metrics


def test_cross_dataset_both_ways_then_evaluate_and_report(tmp_path, datasets, capsys):
    gray, flair = datasets
    # brain_tumor (gray, a tumor on every slice) -> lgg (FLAIR = channel 1, two thirds empty), test fold held out.
    forward = tmp_path / "forward"
    metrics = train(compose_train(["experiment=cross_dataset", f"data.root={gray}", f"cross_data.root={flair}",
                                   "data.test_fold=2", *TINY_RUN], forward))
    assert metrics["dataset"] == "brain_tumor"
    cross = metrics["cross_dataset"]
    assert cross["trained_on"] == "brain_tumor" and cross["checkpoint"].endswith("best.ckpt")
    in_domain, other = cross["evaluations"]
    assert (in_domain["role"], in_domain["dataset"], in_domain["split"], in_domain["n_images"]) == \
        ("in-domain", "brain_tumor", "test", 4)
    assert not in_domain["chose_checkpoint"] and in_domain["empty_slices"]["false_alarm_rate"] is None
    assert (other["role"], other["dataset"], other["split"], other["n_images"]) == ("cross-dataset", "lgg", "all", 18)
    assert other["channels"] == "model (1 channel, trained on brain_tumor: gray) reads channel [1] of lgg (file order)"
    lgg = check_cross_outputs(forward, "lgg", 18, 6)
    assert lgg["data_root"] == str(flair)
    assert other["all_slices_dice"] == lgg["summary"]["dice"]["mean"]
    assert other["empty_slices"]["false_alarm_rate"] == lgg["empty_slices"]["false_alarms"] / 12
    assert json.loads((forward / "metrics.json").read_text())["cross_dataset"] == json.loads(json.dumps(cross))
    assert json.loads((forward / "cross_dataset" / "in_domain" / "metrics.json").read_text())["slices"][
        "matches_trained_split"] is True

    # The evaluate app on the same checkpoint: data=lgg reads that config's root, layout and channel [1].
    ckpt = cross["checkpoint"]
    overrides = [f"ckpt_path={ckpt}", "data=lgg", f"data.root={flair}", "data.num_workers=0", "split=all",
                 "worst_k=0", "device=cpu"]
    again = evaluate(compose_app("evaluate", overrides, tmp_path / "evaluate"), overrides)
    assert (again["dataset"], again["n_images"], again["channels"]) == ("lgg", 18, other["channels"])
    assert again["summary"]["dice"]["mean"] == pytest.approx(other["all_slices_dice"])
    # data.num_workers=0 alone is not other data: the checkpoint's own root and test split.
    overrides = [f"ckpt_path={ckpt}", "data.num_workers=0", "worst_k=0", "device=cpu"]
    own = evaluate(compose_app("evaluate", overrides, tmp_path / "own"), overrides)
    assert (own["dataset"], own["split"], own["n_images"], own["slices"]["matches_trained_split"]) == \
        ("brain_tumor", "test", 4, True)

    # The reverse, lgg -> brain_tumor, without checkpoint callbacks: the final weights are saved and scored.
    reverse = tmp_path / "reverse"
    metrics = train(compose_train(["experiment=cross_dataset", "data=lgg", f"data.root={flair}",
                                   "data@cross_data=brain_tumor", f"cross_data.root={gray}", "callbacks=none",
                                   *TINY_RUN], reverse))
    cross = metrics["cross_dataset"]
    assert metrics["dataset"] == "lgg" and cross["checkpoint"] == str(reverse / "checkpoints" / "final.ckpt")
    in_domain, other = cross["evaluations"]
    assert (in_domain["dataset"], in_domain["split"], in_domain["chose_checkpoint"]) == ("lgg", "val", False)
    assert in_domain["decision_note"] is other["decision_note"] is None  # no decision
    assert other["channels"] == ("model (1 channel, trained on lgg: [1]) reads brain_tumor as gray (each image "
                                 "converted to one grayscale channel)")
    brain_tumor = check_cross_outputs(reverse, "brain_tumor", 16, 16)
    assert brain_tumor["empty_slices"]["false_alarm_rate"] is None and "no slice has an empty mask" in \
        brain_tumor["empty_slices"]["note"]

    # The report: both runs, each with its in-domain and cross-dataset rows side by side.
    capsys.readouterr()
    report_app(compose_app("report", [f"dirs=[{forward},{reverse}]", f"out={tmp_path / 'report'}"], tmp_path / "r"))
    printed = capsys.readouterr().out
    assert "In-domain and cross-dataset: tumor-slice Dice / false-alarm rate / all-slice Dice" in printed
    table = read_csv(tmp_path / "report" / "cross_dataset.csv")
    assert [(row["trained_on"], row["dataset"], row["split"], row["role"]) for row in table] == [
        ("brain_tumor", "brain_tumor", "test", "in-domain"), ("brain_tumor", "lgg", "all", "cross-dataset"),
        ("lgg", "lgg", "val", "in-domain"), ("lgg", "brain_tumor", "all", "cross-dataset"),
    ]  # in ranking order: the reverse run, without checkpoint callbacks, has no validation Dice to rank by
    lgg_row = next(row for row in table if row["dataset"] == "lgg" and row["role"] == "cross-dataset")
    assert (lgg_row["tumor_slices"], lgg_row["empty_slices"]) == ("6", "12")
    far = json.loads((forward / "metrics.json").read_text())["cross_dataset"]["evaluations"][1]["empty_slices"]
    assert float(lgg_row["false_alarm_rate_mean"]) == far["false_alarm_rate"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## In-domain and cross-dataset" in markdown and "| brain_tumor | lgg | all | cross-dataset | 6 / 12 |" in markdown
    assert "| lgg | brain_tumor | all | cross-dataset | 16 / 0 |" in markdown
    assert all(row["slice_decision"] == "" for row in table) and markdown.count(" | – |\n") >= 4  # no decision


def test_the_cross_dataset_rows_say_where_the_slice_decision_was_calibrated(tmp_path, datasets):
    gray, flair = datasets
    run = tmp_path / "run"
    metrics = train(compose_train(["experiment=cross_dataset", "data=lgg", f"data.root={flair}",
                                   "data@cross_data=brain_tumor", f"cross_data.root={gray}",
                                   "decision.target_false_alarm_rate=0.5", *TINY_RUN], run))
    in_domain, other = metrics["cross_dataset"]["evaluations"]
    assert (in_domain["split"], in_domain["chose_checkpoint"]) == ("val", True)  # lgg has no test fold here
    in_domain_note = ("slice decision calibrated on the val split scored here: its false-alarm rate was chosen on "
                      "these slices (optimistic).")
    assert in_domain["decision_note"] == in_domain_note
    assert other["decision_note"] == "slice decision calibrated on the val split of lgg, not this dataset."
    report_app(compose_app("report", [f"dirs={run}", f"out={tmp_path / 'report'}"], tmp_path / "r"))
    table = read_csv(tmp_path / "report" / "cross_dataset.csv")
    assert [row["slice_decision"] for row in table] == [in_domain_note, other["decision_note"]]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| cross-dataset | 16 / 0 |" in markdown and all(f" | {note} |\n" in markdown for note in
                                                             (in_domain_note, other["decision_note"]))


# ---------------------------------------------------------------- the real sample sets


@pytest.mark.skipif(not (REAL_DATA.is_dir() and LGG_SAMPLE.is_dir()), reason="the real data sets are not present")
@pytest.mark.slow  # decodes the 2,400 brain-tumor slices twice (training, in-domain evaluation)
def test_real_brain_tumor_to_lgg_sample(tmp_path):
    run = tmp_path / "run"
    metrics = train(compose_train(["experiment=cross_dataset", f"data.root={REAL_DATA}", f"cross_data.root={LGG_SAMPLE}",
                                   *TINY_RUN, "data.image_size=64", "trainer.limit_train_batches=2",
                                   "trainer.limit_val_batches=2", "data.batch_size=8"], run))
    in_domain, other = metrics["cross_dataset"]["evaluations"]
    assert (in_domain["dataset"], in_domain["split"], in_domain["n_images"]) == ("brain_tumor", "val", 570)
    assert in_domain["chose_checkpoint"] and in_domain["empty_slices"]["n"] == 0
    assert (other["dataset"], other["n_images"]) == ("lgg", 413)
    assert other["channels"] == "model (1 channel, trained on brain_tumor: gray) reads channel [1] of lgg (file order)"
    lgg = json.loads((run / "cross_dataset" / "lgg" / "metrics.json").read_text())
    n_tumor, n_empty = lgg["tumor_slices"]["n"], lgg["empty_slices"]["n"]
    assert n_tumor + n_empty == 413 and 0.5 < n_empty / 413 < 0.8  # about two thirds of LGG slices are empty
