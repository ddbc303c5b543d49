"""benchmarks/false_alarms_table.py tabulates train -> evaluate -> calibrate -> evaluate runs as the script lays them out."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmarks import false_alarms_table
from bts_lightning.calibrate import calibrate
from bts_lightning.evaluate import evaluate
from bts_lightning.train import train
from tests.conftest import compose_app, compose_train

TINY = ["model.net.channels=[8,16,32,64]", "model.net.strides=[2,2,2]", "model.net.num_res_units=1"]


@pytest.mark.slow  # a short training run and three apps (~20 s)
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
