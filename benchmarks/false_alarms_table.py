"""Tabulate ``benchmarks/false_alarms.sh OUT``: ``python -m benchmarks.false_alarms_table OUT [--out FILE]``.

One row per configuration (a folder of OUT): how it was trained, then on the test fold (held out,
patient-wise) tumor-slice Dice, slice sensitivity and false-alarm rate on empty slices, without and
with the slice-level decision calibrated on the val fold (target 5 % false alarms). A cascade run
(``cascade/cascade.json`` instead of ``train/`` and ``calibrate/``) joins two runs' checkpoints; its presence
threshold, calibrated on the val fold, is part of the model, so it applies in both column groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.table_cli import table_main

COLUMNS = ("run", "training input", "empty share trained", "test slices (tumor/empty)",
           "tumor-slice Dice", "sensitivity", "false-alarm rate",
           "tumor-slice Dice (decision)", "sensitivity (decision)", "false-alarm rate (decision)",
           "val false-alarm rate / sensitivity at calibration")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def training_input(config: Path) -> tuple[str, str]:
    """(what the run trained on, the empty share it drew) from its ``.hydra/config.yaml``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    data = cfg.data
    crops = any("TumorFreeCrop" in str(t.get("_target_", "")) for t in data.get("extra_augmentations") or [])
    share = data.get("empty_fraction")
    parts = ["tumor slices only" if share == 0 else "all slices (empty ones included)"]
    if crops:
        parts.append("+ TumorFreeCrop p=0.5")
    if data.get("negatives"):
        parts.append(f"+ empty slices of {data.negatives.root}")
    terms = cfg.get("loss", {}).get("terms") or {}
    if "slice" in terms:
        pos_weight = terms.slice.get("pos_weight", 1.0)
        extra = f", pos_weight {pos_weight:g}" if pos_weight != 1.0 else ""
        parts.append(f"+ slice-presence loss (weight {cfg.loss.weights.get('slice', 1.0):g}{extra})")
    if "OnTumorSlices" in str(terms.get("dice_ce", {}).get("_target_", "")):
        parts.append("+ Dice+CE on tumor slices only")
    model = cfg.get("model", {})
    if model.get("net", {}).get("presence_gate"):
        parts.append(f"+ presence gate (weight {model.get('presence_loss_weight', 1.0):g})")
    return " ".join(parts), "as the data comes" if share is None else f"{share:g}"


def cascade_input(record: dict[str, Any]) -> str:
    """What a cascade (its ``cascade.json``) joins, by the run folders of its two checkpoints."""
    def run_of(checkpoint: str) -> str:
        return Path(checkpoint).parent.parent.parent.name  # RUN/train/checkpoints/best.ckpt -> RUN

    return f"cascade: segmentation of {run_of(record['segmentation'])}, presence of {run_of(record['presence'])}"


def row(run: Path) -> list[str]:
    raw, decided = _read(run / "test_raw" / "metrics.json"), _read(run / "test_decision" / "metrics.json")
    if raw.get("decision_note"):  # a checkpoint calibrated in training (decision.target_false_alarm_rate)
        raise ValueError(f"{run / 'test_raw' / 'metrics.json'} was scored with the slice decision; evaluate it "
                         "again with slice_decision=off")
    if (run / "cascade" / "cascade.json").is_file():
        record = _read(run / "cascade" / "cascade.json")
        calibration, trained, share = record["decision"]["calibration"], cascade_input(record), "n/a"
    else:
        calibration = _read(run / "calibrate" / "calibration.json")["decision"]["calibration"]
        trained, share = training_input(run / "train" / ".hydra" / "config.yaml")
    cells = [run.name, trained, share, f"{raw['tumor_slices']['n']}/{raw['empty_slices']['n']}"]
    for metrics in (raw, decided):
        dice = metrics["tumor_slices"]["dice"]
        cells += [_fmt(dice["mean"] if dice else None), _fmt(metrics["tumor_slices"]["sensitivity"]),
                  _fmt(metrics["empty_slices"]["false_alarm_rate"])]
    cells.append(f"{_fmt(calibration['false_alarm_rate'])} / {_fmt(calibration['sensitivity'])}")
    return cells


def table(out: Path) -> str:
    runs = sorted(path for path in out.iterdir() if (path / "test_decision" / "metrics.json").is_file())
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(run)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    table_main(table, __doc__, "benchmarks/false_alarms.sh")


if __name__ == "__main__":
    main()
