"""Comparison report over training runs: a real sweep, and aggregation over seeds/folds."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bts_lightning.errors import BtsError, ConfigError
from bts_lightning.report import IGNORED_KEYS, find_runs, group_runs, report_app
from tests.conftest import assert_one_error_line, compose_app, run_cli


def _report(overrides: list[str], run_dir: Path) -> list:
    """Run the report app in this process on ``conf/report.yaml`` with ``overrides``; returns its rows."""
    return report_app(compose_app("report", overrides, run_dir))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow
def test_report_on_a_real_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["bts_lightning.train", "-m", "model=unet,lraspp", "data=synthetic", "data.synthetic.n=40",
         "data.synthetic.size=64", "trainer=cpu", "trainer.max_epochs=1", "data.num_workers=0",
         f"paths.data_dir={tmp_path}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(["bts_lightning.report", f"dirs={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("report.md", "report.csv", "report.png"):
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _read_csv(sweep / "report.csv")
    assert len(rows) == 2 and {row["model"] for row in rows} == {"unet", "lraspp"}
    # Both runs have a held-out test fold: it ranks them, not the validation fold that chose their checkpoints.
    assert {row["ranked_by"] for row in rows} == {"test/dice"}
    assert float(rows[0]["test_dice_mean"]) >= float(rows[1]["test_dice_mean"])
    for row in rows:
        (run_dir,) = row["run_dirs"].split()
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        assert row["model"] == metrics["model"] and row["runs"] == "1" and row["config"] == f"model={metrics['model']}"
        assert float(row["best_val_dice_mean"]) == metrics["best_val_dice"] and row["best_val_dice_std"] == ""
        assert float(row["last_val_dice_mean"]) == metrics["last_val_dice"] == metrics["val_history"][-1]["val/dice"]
        assert row["split"] == metrics["split"]["method"] == "folds"
        assert float(row["test_dice_mean"]) == metrics["test"]["test/dice"]
        assert float(row["test_iou_mean"]) == metrics["test"]["test/iou"]
        assert int(row["num_params"]) == metrics["num_params"]
        assert float(row["train_time_s_mean"]) == metrics["train_time_s"]
        assert int(row["epochs_mean"]) == metrics["epochs_trained"]
        assert (row["loss"], row["optimizer"], row["image_size"], row["precision"]) == ("DiceCELoss", "AdamW", "64", "32-true")
    markdown = (sweep / "report.md").read_text()
    assert "| model=unet | unet | DiceCELoss | AdamW |" in markdown and "![" in markdown
    assert "2 runs in 2 configurations" in markdown


# The model node of today's run configs: the LightningModule, the network's settings under model.net.
NET_LAYOUT = """model:
  _target_: bts_lightning.segmentation_module.SegmentationModule
  net:
    _target_: bts_lightning.models.build_model
    name: {model}
    weights: null
  loss: ${{loss}}
  optimizer: ${{optimizer}}
  scheduler: ${{scheduler}}
  compile: false
  aux_loss_weight: 0.4
  freeze_backbone_epochs: 0
scheduler: null
"""


def _write_run(directory: Path, model: str, seed: int, val_fold: int, val_dice: float, test_dice: float | None,
               lr: float = 0.001, data_dir: str = "data", last_val_dice: float | None = None,
               split: dict | None = None, net_layout: bool = False, test_fold: int | None = None,
               overrides: tuple[str, ...] = ()) -> None:
    """A training run's folder; its config has the model node of runs made before model.net (``model.name``)
    unless ``net_layout``."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\n"
        f"data:\n  image_size: 128\n  val_fold: {val_fold}\n  test_fold: {test_fold or 'null'}\n  seed: ${{seed}}\n"
        + (NET_LAYOUT.format(model=model) if net_layout else f"model:\n  name: {model}\n")
        +
        "loss:\n  _target_: monai.losses.DiceFocalLoss\n"
        f"optimizer:\n  _target_: torch.optim.Adam\n  _partial_: true\n  lr: {lr}\n"
        "trainer:\n  precision: bf16-mixed\n"
        f"paths:\n  data_dir: {data_dir}\n  output_dir: ${{hydra:runtime.output_dir}}\n"
    )
    (directory / ".hydra" / "overrides.yaml").write_text(
        f"- model={model}\n- seed={seed}\n- data.val_fold={val_fold}\n- optimizer.lr={lr}\n- paths.data_dir={data_dir}\n"
        + "".join(f"- {override}\n" for override in overrides)
    )
    metrics = {"model": model, "num_params": 1000, "epochs_trained": 10 + seed, "train_time_s": 60.0 * seed,
               "best_val_dice": val_dice, "best_epoch": 3, "best_checkpoint": None, "val_history": []}
    if test_dice is not None:
        metrics["test"] = {"test/dice": test_dice, "test/iou": test_dice / 2, "test/loss": 0.5}
    if last_val_dice is not None:
        metrics["last_val_dice"] = last_val_dice
    if split is not None:
        metrics["split"] = split
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_repeats_of_a_configuration_become_one_row_with_mean_and_std(tmp_path, capsys):
    root = tmp_path / "runs"
    # Two seeds (and folds, and data dirs) of one configuration, in different sub-folders...
    _write_run(root / "cv" / "fold1", "unet", seed=1, val_fold=1, val_dice=0.70, test_dice=0.60)
    _write_run(root / "cv" / "fold2", "unet", seed=2, val_fold=2, val_dice=0.80, test_dice=0.66, data_dir="/elsewhere")
    # ...a second configuration that differs only in the learning rate, without a test split...
    _write_run(root / "loose" / "a", "unet", seed=1, val_fold=1, val_dice=0.90, test_dice=None, lr=0.01)
    # ...and a third, another model.
    _write_run(root / "loose" / "b", "lraspp", seed=1, val_fold=1, val_dice=0.50, test_dice=0.45)
    # An evaluate run also writes metrics.json; it is not a training run and is skipped.
    (root / "evaluate").mkdir()
    (root / "evaluate" / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5}, "cases": 3}))

    rows = group_runs(find_runs([root, root / "cv"]))  # overlapping directories: each run once
    assert [len(row.runs) for row in rows] == [1, 2, 1]
    assert [row.label for row in rows] == ["model=unet, optimizer.lr=0.01", "model=unet, optimizer.lr=0.001",
                                           "model=lraspp, optimizer.lr=0.001"]
    fields = rows[1].fields()
    assert fields["best_val_dice_mean"] == pytest.approx(0.75)
    assert fields["best_val_dice_std"] == pytest.approx(statistics.stdev([0.70, 0.80]))
    assert fields["test_dice_mean"] == pytest.approx(0.63)
    assert fields["test_dice_std"] == pytest.approx(statistics.stdev([0.60, 0.66]))
    assert fields["train_time_s_mean"] == pytest.approx(90.0) and fields["epochs_mean"] == pytest.approx(11.5)
    assert (fields["model"], fields["loss"], fields["optimizer"], fields["lr"]) == ("unet", "DiceFocalLoss", "Adam", 0.001)
    assert (fields["image_size"], fields["precision"], fields["num_params"]) == (128, "bf16-mixed", 1000)
    assert rows[0].fields()["test_dice_mean"] is None

    out = tmp_path / "report"
    _report([f"dirs={root}", f"out={out}"], tmp_path / "run")
    printed = capsys.readouterr().out
    assert printed.startswith("Ranked by best val Dice\n  1. 0.9000  model=unet, optimizer.lr=0.01  (1 run)\n")
    assert "  2. 0.7500 ± 0.0707  model=unet, optimizer.lr=0.001  (2 runs)\n" in printed
    assert printed.endswith(f"Wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}\n")
    assert not (root / "report.md").exists()
    table = _read_csv(out / "report.csv")
    assert [row["runs"] for row in table] == ["1", "2", "1"] and table[0]["test_dice_mean"] == ""
    assert float(table[1]["best_val_dice_std"]) == pytest.approx(statistics.stdev([0.70, 0.80]))
    markdown = (out / "report.md").read_text()
    assert "0.7500 ± 0.0707" in markdown and "0.6300 ± 0.0424" in markdown
    assert "4 runs in 3 configurations" in markdown
    assert (out / "report.png").stat().st_size > 0


def test_runs_with_and_without_a_test_fold_are_not_repeats(tmp_path, capsys):
    """Another training set and no test score: ``data.test_fold=null`` is another configuration, named so."""
    root = tmp_path / "runs"
    for seed in (1, 2):
        _write_run(root / f"held{seed}", "unet", seed=seed, val_fold=1, val_dice=0.7, test_dice=0.6, test_fold=2)
    _write_run(root / "all", "unet", seed=1, val_fold=1, val_dice=0.8, test_dice=None,
               overrides=("data.test_fold=null",))
    rows = _report([f"dirs={root}"], tmp_path / "run")
    assert sorted((row.label, len(row.runs)) for row in rows) == [("unet (no test fold)", 1),
                                                                   ("unet (test fold held out)", 2)]
    # ranked by last val Dice (one configuration has no test split); the other datasets' runs are said to differ
    for run, dataset in (("held1", "synthetic"), ("held2", "synthetic"), ("all", "lgg")):
        metrics = json.loads((root / run / "metrics.json").read_text())
        (root / run / "metrics.json").write_text(json.dumps({**metrics, "dataset": dataset}))
    _report([f"dirs={root}"], tmp_path / "run2")
    assert "trained on different datasets (lgg, synthetic)" in (root / "report.md").read_text()


def test_copies_and_fast_dev_runs_are_not_repeats(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_run(root / "a", "unet", seed=1, val_fold=1, val_dice=0.70, test_dice=0.60)
    _write_run(root / "b", "unet", seed=2, val_fold=1, val_dice=0.80, test_dice=0.66)
    for name in ("a", "b"):  # each run's metrics.json names its own best.ckpt
        metrics = json.loads((root / name / "metrics.json").read_text())
        metrics["best_checkpoint"] = str(root / name / "checkpoints" / "best.ckpt")
        (root / name / "metrics.json").write_text(json.dumps(metrics))
    shutil.copytree(root / "a", root / "a_backup")  # a copy names the original's best.ckpt
    _write_run(root / "smoke", "unet", seed=3, val_fold=1, val_dice=0.09, test_dice=0.05)
    config = root / "smoke" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("trainer:\n", "trainer:\n  fast_dev_run: true\n"))

    rows = group_runs(find_runs([root]))
    assert [sorted(run.directory.name for run in row.runs) for row in rows] == [["a", "b"]]
    error = capsys.readouterr().err
    assert f"warning: skipped {root / 'a_backup'}: a copy of {root / 'a'}" in error
    assert "note: skipped 1 debug=fast_dev_run run(s)" in error


def test_cli_reports_several_folders(tmp_path):
    _write_run(tmp_path / "a" / "run", "unet", seed=1, val_fold=1, val_dice=0.7, test_dice=0.6, net_layout=True)
    _write_run(tmp_path / "b" / "run", "lraspp", seed=1, val_fold=1, val_dice=0.5, test_dice=0.4, net_layout=True)
    result = run_cli(["bts_lightning.report", "dirs=[a,b]", "out=report"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Ranked by test Dice",
        "  1. 0.6000  model=unet  (1 run)",
        "  2. 0.4000  model=lraspp  (1 run)",
        "Wrote report/report.md, report/report.csv, report/report.png",
    ]
    assert [row["model"] for row in _read_csv(tmp_path / "report" / "report.csv")] == ["unet", "lraspp"]
    assert not (tmp_path / "a" / "report.md").exists()


def test_no_runs_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["bts_lightning.report", f"dirs=[{tmp_path / 'empty'},{tmp_path}]"], cwd=tmp_path, timeout=120)
    error = assert_one_error_line(result, "No runs found under", str(tmp_path / "empty"))
    assert error.startswith("error: No runs found under")
    with pytest.raises(ConfigError, match=r"dirs: .*missing is not a folder; give the folders holding the training"):
        _report([f"dirs={tmp_path / 'missing'}"], tmp_path / "run")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "dirs is required: python -m bts_lightning.report dirs=RUNS_DIR"),
        (["dirs=[]"], "dirs is required"),
        (["dirs=true"], "dirs=true is not a path"),
        (["dirs=[a,[b]]"], 'dirs=["b"] is not a path'),
        (["dirs=a", "out=[x]"], 'out=["x"] is not a path'),
    ],
)
def test_bad_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _report(overrides, tmp_path / "run")


def test_cli_bad_value_is_one_error_line(tmp_path):
    assert_one_error_line(run_cli(["bts_lightning.report", "dirs=3.5"], cwd=tmp_path, timeout=120),
                          "dirs=3.5 is not a path")


def test_model_name_from_either_config_layout(tmp_path):
    """Runs configure the network under model.net (model.net.name); runs made before, under model (model.name)."""
    root = tmp_path / "runs"
    for seed in (1, 2):
        _write_run(root / f"new{seed}", "lraspp", seed, seed, val_dice=0.6, test_dice=0.5, net_layout=True)
    _write_run(root / "old", "fcn", 1, 1, val_dice=0.6, test_dice=0.4)
    for run in ("new1", "new2", "old"):
        (root / run / ".hydra" / "overrides.yaml").unlink()  # no overrides: rows are labelled by the model
        metrics = json.loads((root / run / "metrics.json").read_text())
        (root / run / "metrics.json").write_text(json.dumps({**metrics, "model": None}))  # the config names it
    rows = group_runs(find_runs([root]))
    assert [(row.label, row.fields()["model"], len(row.runs)) for row in rows] == [("lraspp", "lraspp", 2),
                                                                                 ("fcn", "fcn", 1)]
    assert rows[0].first.get("model.net.name") == "lraspp" and rows[1].first.get("model.name") == "fcn"
    # Seeds and folds still make repeats: the ignored keys exist in today's configs.
    config = compose_app("train", [], tmp_path / "run")
    for key in IGNORED_KEYS:
        assert OmegaConf.select(config, key, default="absent", throw_on_resolution_failure=False) != "absent", key


def test_ranking_never_uses_the_split_that_chose_the_checkpoint(tmp_path):
    """Best val Dice is val Dice at the epoch that picked best.ckpt, on that same split: shown, never ranked by."""
    folds, slices = {"method": "folds", "leaky": False}, {"method": "slices", "leaky": True}
    with_test = tmp_path / "with_test"
    _write_run(with_test / "a", "unet", 1, 1, val_dice=0.90, test_dice=0.60, last_val_dice=0.85, split=folds)
    _write_run(with_test / "b", "lraspp", 1, 1, val_dice=0.80, test_dice=0.70, last_val_dice=0.75, split=slices)
    rows = group_runs(find_runs([with_test]))
    assert [row.first.get("model.name") for row in rows] == ["lraspp", "unet"]  # by test Dice
    _report([f"dirs={with_test}"], tmp_path / "run")
    markdown = (with_test / "report.md").read_text()
    assert "Ranked by test Dice: best.ckpt (chosen on validation) scored on the held-out test split" in markdown
    assert "val Dice at the epoch that chose best.ckpt" in markdown and "optimistic" in markdown
    assert "**Warning:** model=lraspp split slices, not patients" in markdown
    assert "| slices (leaky) |" in markdown and "| **0.7000** |" in markdown

    cross_validation = tmp_path / "cv"  # no test fold: the last epoch's validation Dice ranks
    _write_run(cross_validation / "a", "unet", 1, 1, val_dice=0.90, test_dice=None, last_val_dice=0.70, split=folds)
    _write_run(cross_validation / "b", "lraspp", 1, 1, val_dice=0.80, test_dice=None, last_val_dice=0.78, split=folds)
    rows = group_runs(find_runs([cross_validation]))
    assert [row.first.get("model.name") for row in rows] == ["lraspp", "unet"]
    _report([f"dirs={cross_validation}"], tmp_path / "run")
    assert {row["ranked_by"] for row in _read_csv(cross_validation / "report.csv")} == {"last_val_dice"}
    assert "Ranked by last val Dice: the final epoch" in (cross_validation / "report.md").read_text()


def _evaluation(role: str, dataset: str, split: str, tumor: tuple[int, float], empty: tuple[int, int | None],
                all_dice: float) -> dict:
    """One ``cross_dataset.evaluations`` row of a training run's metrics.json."""
    (n_tumor, dice), (n_empty, alarms) = tumor, empty
    return {"role": role, "dataset": dataset, "split": split, "chose_checkpoint": split == "val",
            "n_images": n_tumor + n_empty, "all_slices_dice": all_dice,
            "tumor_slices": {"n": n_tumor, "dice": {"mean": dice, "std": 0.1, "median": dice}, "sensitivity": 1.0},
            "empty_slices": {"n": n_empty, "false_alarms": alarms,
                             "false_alarm_rate": None if not n_empty else alarms / n_empty}}


def test_cross_dataset_rows_side_by_side_with_mean_and_std_over_repeats(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, (dice, alarms, n_empty) in enumerate([(0.6, 30, 60), (0.8, 12, 40)], start=1):
        run = root / f"seed{seed}"
        _write_run(run, "unet", seed=seed, val_fold=1, val_dice=0.7, test_dice=0.7, net_layout=True)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["dataset"] = "brain_tumor"
        metrics["cross_dataset"] = {"trained_on": "brain_tumor", "evaluations": [
            _evaluation("in-domain", "brain_tumor", "test", (50, 0.7), (0, None), 0.7),
            _evaluation("cross-dataset", "lgg", "all", (30, dice), (n_empty, alarms), 0.3),
        ]}
        (run / "metrics.json").write_text(json.dumps(metrics))
    _report([f"dirs={root}"], tmp_path / "run")
    printed = capsys.readouterr().out
    assert "  unet: brain_tumor -> lgg all (cross-dataset): 0.7000 / 0.4000 / 0.3000\n" in printed
    table = _read_csv(root / "cross_dataset.csv")
    assert [(row["role"], row["dataset"], row["runs"]) for row in table] == [("in-domain", "brain_tumor", "2"),
                                                                              ("cross-dataset", "lgg", "2")]
    in_domain, lgg = table
    assert (in_domain["empty_slices"], in_domain["false_alarm_rate_mean"]) == ("0", "")  # no empty slices: no rate
    assert (lgg["tumor_slices"], lgg["empty_slices"]) == ("30", "40-60")
    assert float(lgg["tumor_dice_mean"]) == pytest.approx(0.7)
    assert float(lgg["tumor_dice_std"]) == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert float(lgg["false_alarm_rate_mean"]) == pytest.approx(0.4)  # 30/60 and 12/40
    markdown = (root / "report.md").read_text()
    assert "| unet | brain_tumor | lgg | all | cross-dataset | 30 / 40-60 | 0.7000 ± 0.1414 | 1.0000 ± 0.0000 | " \
           "0.4000 ± 0.1414 | 0.3000 ± 0.0000 |" in markdown
    assert "| unet | brain_tumor | brain_tumor | test | in-domain | 50 / 0 | 0.7000 ± 0.0000 | 1.0000 ± 0.0000 | – |" \
        in markdown
    assert "| 1.0 k | brain_tumor | – | 2 |" in markdown  # params, the training dataset, split, runs

    # A report of other runs into the same folder leaves no cross_dataset.csv of the earlier ones behind
    _write_run(tmp_path / "plain" / "run", "unet", seed=1, val_fold=1, val_dice=0.7, test_dice=0.7)
    capsys.readouterr()
    _report([f"dirs={tmp_path / 'plain'}", f"out={root}"], tmp_path / "run2")
    output = capsys.readouterr()
    assert not (root / "cross_dataset.csv").exists() and "cross_dataset.csv" not in output.out.splitlines()[-1]
    assert f"removed {root / 'cross_dataset.csv'}, an earlier report's" in output.err


def _add_slice_scores(run: Path, tumor: tuple[int, float, float], empty: tuple[int, float | None]) -> None:
    """Give a run's metrics.json the slice-level scores training writes (last validation epoch and test)."""
    (n_tumor, dice, sensitivity), (n_empty, rate) = tumor, empty
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(last_val_dice_tumor=dice, last_val_sensitivity=sensitivity, last_val_false_alarm_rate=rate,
                   val_slices={"tumor_slices": n_tumor, "empty_slices": n_empty},
                   test_slices={"tumor_slices": n_tumor, "empty_slices": n_empty})
    metrics["test"].update({"test/dice_tumor": dice - 0.1, "test/sensitivity": sensitivity})
    if rate is not None:
        metrics["test"]["test/false_alarm_rate"] = rate / 2
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_training_runs_show_slice_level_validation_scores(tmp_path):
    root = tmp_path / "runs"
    for seed, rate in ((1, 0.2), (2, 0.4)):  # LGG-like: validation split with empty slices
        _write_run(root / f"lgg{seed}", "unet", seed, seed, val_dice=0.8, test_dice=0.7, net_layout=True)
        _add_slice_scores(root / f"lgg{seed}", (30, 0.6, 0.9), (60 + seed, rate))
        metrics = json.loads((root / f"lgg{seed}" / "metrics.json").read_text())  # a slice decision calibrated
        metrics["test_with_decision"] = {"tumor_slices": {"n": 30, "dice": {"mean": 0.5 - seed / 10}, "sensitivity": 0.8},
                                         "empty_slices": {"n": 60 + seed, "false_alarm_rate": rate / 10}}
        (root / f"lgg{seed}" / "metrics.json").write_text(json.dumps(metrics))
    _write_run(root / "kaggle", "lraspp", 1, 1, val_dice=0.7, test_dice=0.6, net_layout=True)
    _add_slice_scores(root / "kaggle", (50, 0.65, 1.0), (0, None))  # every slice shows a tumor
    _write_run(root / "old", "fcn", 1, 1, val_dice=0.6, test_dice=0.5, net_layout=True)  # made before these scores
    _report([f"dirs={root}"], tmp_path / "run")
    table = {row["model"]: row for row in _read_csv(root / "report.csv")}
    lgg, kaggle, old = table["unet"], table["lraspp"], table["fcn"]
    assert (lgg["val_tumor_slices"], lgg["val_empty_slices"], lgg["test_empty_slices"]) == ("30", "61-62", "61-62")
    assert float(lgg["last_val_false_alarm_rate_mean"]) == pytest.approx(0.3)
    assert float(lgg["last_val_false_alarm_rate_std"]) == pytest.approx(statistics.stdev([0.2, 0.4]))
    assert float(lgg["test_false_alarm_rate_mean"]) == pytest.approx(0.15)
    assert float(lgg["last_val_dice_tumor_mean"]) == pytest.approx(0.6)
    assert float(lgg["test_dice_tumor_mean"]) == pytest.approx(0.5)
    assert float(lgg["test_decision_dice_tumor_mean"]) == pytest.approx(0.35)
    assert float(lgg["test_decision_dice_tumor_std"]) == pytest.approx(statistics.stdev([0.4, 0.3]))
    assert float(lgg["test_decision_sensitivity_mean"]) == pytest.approx(0.8)
    assert float(lgg["test_decision_false_alarm_rate_mean"]) == pytest.approx(0.03)
    assert kaggle["test_decision_false_alarm_rate_mean"] == kaggle["test_decision_dice_tumor_mean"] == ""
    assert (kaggle["val_empty_slices"], kaggle["last_val_false_alarm_rate_mean"]) == ("0", "")
    assert float(kaggle["last_val_sensitivity_mean"]) == 1.0 and kaggle["test_false_alarm_rate_mean"] == ""
    assert all(old[column] == "" for column in ("val_tumor_slices", "last_val_dice_tumor_mean", "test_sensitivity_mean"))
    markdown = (root / "report.md").read_text()
    assert "| val tumor-slice Dice | val sensitivity | val false-alarm rate | test Dice |" in markdown
    assert "| 0.6000 ± 0.0000 | 0.9000 ± 0.0000 | 0.3000 ± 0.1414 | **0.7000 ± 0.0000** |" in markdown
    assert "| 0.6500 | 1.0000 | n/a (no empty slices) | **0.6000** |" in markdown
    assert "| – | – | – | **0.5000** |" in markdown
    section = markdown.split("## Test split with the calibrated slice decision")[1].split("## Runs")[0]
    assert "| 2 of 2 | 30 / 61-62 | 0.5000 ± 0.0000 | 0.3500 ± 0.0707 | 0.9000 ± 0.0000 | 0.8000 ± 0.0000 " \
        "| 0.1500 ± 0.0707 | 0.0300 ± 0.0141 |" in section
    assert "lraspp" not in section and "fcn" not in section  # no decision on their test splits


def test_the_chart_fits_long_run_labels_and_its_legend():
    """A run's label is its overrides: long ones wrap, and the layout keeps them and the legend in the figure."""
    import warnings

    import cv2
    import numpy as np

    pytest.importorskip("matplotlib")
    from bts_lightning.visualize import BarSeries, score_bar_chart

    labels = [("data=lgg, data.root=/work/shared/data/lgg-sample/kaggle_3m, data.neighbours=1, data.image_size=64, "
               "experiment=presence, trainer.max_epochs=3"), "decision.target_false_alarm_rate=0.1"]
    series = [BarSeries("last val Dice", [0.2, 0.3], [0.0, 0.0], "#1f77b4"),
              BarSeries("test Dice", [0.1, 0.4], [0.05, 0.0], "#ff7f0e")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a layout cannot fit the labels
        png = score_bar_chart(labels, series, "Configurations", xlabel="Dice")
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape[1] == 9 * 120
    # Nothing is drawn on the left edge (no label runs off it) nor on the bottom edge (the legend sits above it).
    assert image[:, :3].min() > 200 and image[-3:, :].min() > 200


def test_a_run_without_validation_scores_is_unranked_not_a_reason_to_rank_by_best_val(tmp_path, capsys):
    """callbacks=none records no validation Dice: among cross-validation runs (no test split) it is listed last,
    unranked, and the others stay ranked by last val Dice; a copy of it is skipped like any other copy; a training run
    without metrics.json is noted, not silently left out: killed (a last.ckpt to resume from) or refused (none)."""
    root = tmp_path / "runs"
    _write_run(root / "cv" / "0", "unet", seed=1, val_fold=1, val_dice=0.9, test_dice=None, last_val_dice=0.5)
    _write_run(root / "cv" / "1", "lraspp", seed=1, val_fold=1, val_dice=0.6, test_dice=None, last_val_dice=0.55)
    _write_run(root / "nocallbacks", "fcn", seed=1, val_fold=1, val_dice=None, test_dice=0.7)
    shutil.copytree(root / "nocallbacks", root / "nocallbacks_copy")
    for name in ("killed", "refused"):  # only the killed one has a last.ckpt to resume from
        (root / name / ".hydra").mkdir(parents=True)
        (root / name / ".hydra" / "config.yaml").write_text("task_name: train\nseed: 1\n")
    (root / "killed" / "checkpoints").mkdir()
    (root / "killed" / "checkpoints" / "last.ckpt").write_bytes(b"weights")

    rows = group_runs(find_runs([root]))
    assert [row.label for row in rows] == ["model=lraspp", "model=unet", "model=fcn"]  # last val 0.55 > 0.5
    err = capsys.readouterr().err
    assert f"skipped {root / 'nocallbacks_copy'}: a copy of {root / 'nocallbacks'} (the same metrics.json)" in err
    assert f"1 training run(s) without metrics.json (killed, crashed or still running) are not in the report: " \
           f"{root / 'killed'}" in err
    assert "model=fcn: no last val Dice (e.g. trained with callbacks=none" in err
    assert f"1 training run(s) without metrics.json or a checkpoint (refused by a check, stopped before their first " \
           f"epoch ended, or still in it) are not in the report: {root / 'refused'}; each run's train.log says why" \
           in err and f"report: {root / 'killed'}; a killed run finishes with" in err  # each in its own note only
    report_app(compose_app("report", [f"dirs={root}"], tmp_path / "app"))
    printed = capsys.readouterr().out
    assert "Ranked by last val Dice" in printed and "  -. –  model=fcn  (1 run)" in printed
    table = _read_csv(root / "report.csv")
    assert [(row["rank"], row["ranked_by"]) for row in table] == [("1", "last_val_dice"), ("2", "last_val_dice"),
                                                                  ("", "last_val_dice")]
    markdown = (root / "report.md").read_text()
    assert "Unranked (–), listed last: model=fcn" in markdown and f"- (unranked) model=fcn: `{root / 'nocallbacks'}`" \
        in markdown and "the test Dice of" not in markdown  # metrics.json of old runs: no selection to tell
    metrics = json.loads((root / "nocallbacks" / "metrics.json").read_text())
    metrics["selection"] = {"chosen_on": None, "scored_on": "test"}
    (root / "nocallbacks" / "metrics.json").write_text(json.dumps(metrics))
    report_app(compose_app("report", [f"dirs={root}"], tmp_path / "app2"))
    assert "the test Dice of model=fcn scores the final weights" in (root / "report.md").read_text()

    shutil.rmtree(root / "cv")
    shutil.rmtree(root / "nocallbacks")
    shutil.rmtree(root / "nocallbacks_copy")
    with pytest.raises(BtsError, match="No runs found under .*when they finish; the unfinished ones are noted above"):
        find_runs([root])
