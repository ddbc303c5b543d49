"""benchmarks/false_alarms_table.py tabulates train -> evaluate -> calibrate -> evaluate runs as the script lays them out."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmarks import false_alarms_table
from bts_lightning.calibrate import calibrate
from bts_lightning.cascade import cascade
from bts_lightning.evaluate import evaluate
from bts_lightning.train import train
from tests.conftest import compose_app, compose_train

TINY = ["model.net.channels=[8,16,32,64]", "model.net.strides=[2,2,2]", "model.net.num_res_units=1"]


@pytest.mark.slow  # two short training runs and six apps (~50 s)
def test_one_configuration_becomes_one_row(tmp_path):
    run = tmp_path / "out" / "synthetic_tumor_only"
    data = ["data=synthetic_empty", "data.synthetic.n=60", "data.synthetic.size=48", "data.num_workers=0",
            f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose_train([*data, *TINY, "trainer=cpu", "trainer.max_epochs=2", "data.empty_fraction=0", "logger=csv"],
                        run / "train")
    train(cfg)
    (run / "train" / ".hydra").mkdir()
    OmegaConf.save(cfg, run / "train" / ".hydra" / "config.yaml")  # as the app leaves it
    ckpt = run / "train" / "checkpoints" / "best.ckpt"
    evaluate(compose_app("evaluate", [f"ckpt_path={ckpt}", "split=test"], run / "test_raw"), overrides=[])
    calibrate(compose_app("calibrate", [f"ckpt_path={ckpt}", "split=val"], run / "calibrate"), overrides=[])
    evaluate(compose_app("evaluate", [f"ckpt_path={ckpt}", "split=test"], run / "test_decision"), overrides=[])

    header, rule, line = false_alarms_table.table(tmp_path / "out").splitlines()
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert header.startswith("| run |") and len(cells) == len(false_alarms_table.COLUMNS) and rule.count("---") == len(cells)
    assert cells[:3] == ["synthetic_tumor_only", "tumor slices only", "0"]
    tumor, empty = map(int, cells[3].split("/"))
    assert tumor > 0 and empty > 0
    assert all(0 <= float(value) <= 1 for value in cells[4:10])
    assert float(cells[9]) <= float(cells[6])  # the decision only removes masks: never more false alarms

    # A cascade of that run's segmentation and another run's presence, as the script joins them.
    presence = tmp_path / "out" / "synthetic_slice_term" / "train"
    train(compose_train([*data, *TINY, "trainer=cpu", "trainer.max_epochs=2", "loss=dice_ce_slice", "logger=csv"],
                        presence))
    joined = tmp_path / "out" / "synthetic_cascade"
    cascade(compose_app("cascade", [f"segmentation={ckpt}", f"presence={presence / 'checkpoints' / 'best.ckpt'}",
                                    "target_false_alarm_rate=0.25"], joined / "cascade"), overrides=[])
    ckpt = joined / "cascade" / "checkpoints" / "cascade.ckpt"
    evaluate(compose_app("evaluate", [f"ckpt_path={ckpt}", "split=test", "slice_decision=off"], joined / "test_raw"),
             overrides=[])
    evaluate(compose_app("evaluate", [f"ckpt_path={ckpt}", "split=test"], joined / "test_decision"), overrides=[])
    rows = false_alarms_table.table(tmp_path / "out").splitlines()[2:]
    assert len(rows) == 2  # the presence run has no test scores of its own: not a row
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    joined_runs = "cascade: segmentation of synthetic_tumor_only, presence of synthetic_slice_term"
    assert cells[:3] == ["synthetic_cascade", joined_runs, "n/a"]
    assert all(0 <= float(value) <= 1 for value in cells[4:10])


def test_training_input_names_the_slice_presence_term(tmp_path):
    config = tmp_path / "config.yaml"
    cfg = compose_train(["data=synthetic_empty", "loss=dice_ce_slice"], tmp_path / "run")
    OmegaConf.save(cfg, config)
    assert false_alarms_table.training_input(config) == (
        "all slices (empty ones included) + slice-presence loss (weight 0.2)", "as the data comes")
    cfg = compose_train(["data=synthetic_empty", "loss=dice_ce_slice", "loss.terms.slice.pos_weight=3",
                         "data.empty_fraction=0.25"], tmp_path / "run")
    OmegaConf.save(cfg, config)
    assert false_alarms_table.training_input(config) == (
        "all slices (empty ones included) + slice-presence loss (weight 0.2, pos_weight 3)", "0.25")
    cfg = compose_train(["data=synthetic_empty", "loss=dice_ce_slice_tumor"], tmp_path / "run")
    OmegaConf.save(cfg, config)
    described = "all slices (empty ones included) + slice-presence loss (weight 0.2) + Dice+CE on tumor slices only"
    assert false_alarms_table.training_input(config) == (described, "as the data comes")
    cfg = compose_train(["data=synthetic_empty", "loss=dice_ce", "model.net.presence_gate=true"], tmp_path / "run")
    OmegaConf.save(cfg, config)
    assert false_alarms_table.training_input(config) == (
        "all slices (empty ones included) + presence gate (weight 1)", "as the data comes")
    cfg = compose_train(["data=synthetic_empty", "model.net.presence_gate=true", "+model.presence_loss_weight=0.2"],
                        tmp_path / "run")
    OmegaConf.save(cfg, config)
    assert false_alarms_table.training_input(config)[0].endswith("+ presence gate (weight 0.2)")


def test_a_raw_score_with_the_decision_applied_is_refused(tmp_path):
    """A checkpoint calibrated in training applies its decision unless evaluate runs with slice_decision=off."""
    run = tmp_path / "out" / "lgg_slice_term"
    for name in ("test_raw", "test_decision"):
        (run / name).mkdir(parents=True)
        (run / name / "metrics.json").write_text('{"decision_note": "slice decision calibrated on the val split"}')
    with pytest.raises(ValueError, match="test_raw/metrics.json was scored with the slice decision.*slice_decision=off"):
        false_alarms_table.table(tmp_path / "out")
