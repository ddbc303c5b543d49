"""Tabulate ``benchmarks/cascade_cv.sh OUT``: ``python -m benchmarks.cascade_cv_table OUT [--out FILE]``.

One row per fold pair (a ``val<V>_test<T>`` folder of OUT) and a last row pooled over every test slice of them
(each patient is in one test fold, so the pooled row is the cross-validated per-image result): test slices
(tumor / empty), the tumor-only model's tumor-slice Dice, the cascade's tumor-slice Dice, the drop between them,
the cascade's slice sensitivity and false-alarm rate, and the presence threshold with what it reached on the val
fold. Scores come from the ``per_image.csv`` files of ``evaluate split=test`` (``tumor_only_test``,
``cascade_test``), pooled through :func:`bts_lightning.metrics.summarize_by_truth`. Pairs with a scan-context
cascade (``cascade_context``, ``cascade_context_test``: ``python -m bts_lightning.cascade ... context=K``) get a
second row for it, and a second pooled row over those pairs. When the slices are numbered within scan folders (the LGG
layout), a second table follows: the pooled false alarms on empty test slices by how many slices away the nearest
tumor slice of their scan is (:func:`bts_lightning.metrics.empty_slices_by_distance`), for the tumor-only model
and each cascade.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.table_cli import table_main
from bts_lightning.data.neighbours import slice_position
from bts_lightning.metrics import empty_slices_by_distance, summarize_by_truth

COLUMNS = ("fold pair (val / test)", "presence", "test slices (tumor/empty)", "tumor-only tumor-slice Dice",
           "cascade tumor-slice Dice", "Dice drop", "cascade sensitivity", "cascade false-alarm rate",
           "presence threshold", "val false-alarm rate / sensitivity at calibration")
# The cascades of a pair: run folder (its test scores in <folder>_test) and how it judges presence.
VARIANTS = (("cascade", "slice alone"), ("cascade_context", "scan context"))
NUMBERS = ("dice", "iou", "area_true", "area_pred")


def pair_name(run: Path) -> str:
    """``val1_test2`` -> ``1 / 2``: a fold pair's row name."""
    return run.name.replace("val", "").replace("_test", " / ")


def pooled_name(folds: int) -> str:
    """The pooled row's name: how many test folds it pools."""
    return f"pooled ({folds} test fold{'' if folds == 1 else 's'})"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """``evaluate``'s ``per_image.csv`` at ``path``, its score and area columns as numbers."""
    with path.open(newline="") as handle:
        return [{**row, **{key: float(row[key]) for key in NUMBERS}} for row in csv.DictReader(handle)]


def scores(rows: Sequence[dict[str, Any]]) -> tuple[int, int, float, float, float]:
    """(tumor slices, empty slices, tumor-slice Dice, sensitivity, false-alarm rate) of ``rows``."""
    groups = summarize_by_truth(rows)
    tumor, empty = groups["tumor_slices"], groups["empty_slices"]
    if not tumor["n"] or not empty["n"]:
        raise ValueError("the test slices need tumor slices and empty slices to score a cascade")
    return tumor["n"], empty["n"], tumor["dice"]["mean"], tumor["sensitivity"], empty["false_alarm_rate"]


def pair_rows(run: Path, variant: str = "cascade") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tumor-only and the ``variant`` cascade per-image rows of fold pair ``run``, checked to be the same slices."""
    tumor_only = read_rows(run / "tumor_only_test" / "per_image.csv")
    cascade = read_rows(run / f"{variant}_test" / "per_image.csv")
    if sorted(row["stem"] for row in tumor_only) != sorted(row["stem"] for row in cascade):
        raise ValueError(f"{run}: tumor_only_test and {variant}_test scored different slices; evaluate both on "
                         "split=test")
    return tumor_only, cascade


def calibration_cells(record: dict[str, Any] | None, variant: str) -> list[str]:
    """Threshold and what it reached on val, from the pair's ``cascade.json``; ``None``: the pooled row."""
    if record is None:
        return ["(each pair its own)"] * 2
    if variant == "cascade":
        threshold, on_val = record["presence_threshold"], record["presence_on_split"]
    else:
        on_val = record["scan_context"]
        threshold = on_val["threshold"]
    return [f"{threshold:.3f}", f"{on_val['false_alarm_rate']:.3f} / {on_val['sensitivity']:.3f}"]


def cells(name: str, presence: str, tumor_only: Sequence[dict[str, Any]], cascade: Sequence[dict[str, Any]],
          calibration: list[str]) -> list[str]:
    """One table row (see :data:`COLUMNS`); ``calibration``: its last two cells (:func:`calibration_cells`)."""
    n_tumor, n_empty, base, _, _ = scores(tumor_only)
    _, _, dice, sensitivity, false_alarms = scores(cascade)
    return [name, presence, f"{n_tumor}/{n_empty}", f"{base:.3f}", f"{dice:.3f}", f"{base - dice:.3f}",
            f"{sensitivity:.3f}", f"{false_alarms:.3f}", *calibration]


def presence_name(variant: str, record: dict[str, Any] | None) -> str:
    """How the variant judges presence, e.g. ``scan context (1 either side)``."""
    name = dict(VARIANTS)[variant]
    return f"{name} ({record['scan_context']['context']} either side)" if record and variant != "cascade" else name


def distance_table(pooled: Sequence[tuple[str, int, Sequence[dict[str, Any]]]]) -> list[str]:
    """Markdown lines of the false alarms by distance to the scan's nearest tumor slice, one row per (model, test
    folds, pooled rows) of ``pooled``; no lines when the slices' stems do not number them within scans."""
    grouped = [(name, folds, empty_slices_by_distance(rows, [slice_position(row["stem"]) for row in rows]))
               for name, folds, rows in pooled]
    if not grouped or any(groups is None for _, _, groups in grouped):
        return []
    names = list(grouped[0][2])
    lines = ["", "False alarms / empty test slices (pooled), by slices to the nearest tumor slice of their scan:", "",
             "| model | test folds | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 2)]
    for name, folds, groups in grouped:
        counts = [f"{groups[group]['false_alarms']} / {groups[group]['n']}" for group in names]
        lines.append(f"| {name} | {folds} | " + " | ".join(counts) + " |")
    return lines


def table(out: Path) -> str:
    """The Markdown table of every fold pair under ``out`` and their pooled rows (one per cascade variant), then
    :func:`distance_table` of the pooled rows."""
    runs = sorted(path for path in out.glob("val*_test*") if (path / "cascade_test" / "per_image.csv").is_file())
    if not runs:
        raise ValueError(f"{out} has no val<V>_test<T>/cascade_test/per_image.csv: run benchmarks/cascade_cv.sh first")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    pooled_rows = []
    by_model: list[tuple[str, int, Sequence[dict[str, Any]]]] = []
    for variant, _ in VARIANTS:
        pooled: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        scored = [run for run in runs if (run / f"{variant}_test" / "per_image.csv").is_file()]
        presence = dict(VARIANTS)[variant]
        for run in scored:
            tumor_only, cascade = pair_rows(run, variant)
            pooled[0].extend(tumor_only)
            pooled[1].extend(cascade)
            record = json.loads((run / variant / "cascade.json").read_text())
            presence = presence_name(variant, record)
            lines.append("| " + " | ".join(cells(pair_name(run), presence, tumor_only, cascade,
                                                 calibration_cells(record, variant))) + " |")
        if not scored:
            continue
        stems = [row["stem"] for row in pooled[0]]
        if len(stems) != len(set(stems)):
            raise ValueError(f"{out}: a slice is in the test fold of two pairs; pooling needs each test fold once")
        pooled_rows.append("| " + " | ".join(cells(pooled_name(len(scored)), presence, *pooled,
                                                   calibration_cells(None, variant))) + " |")
        if not by_model:
            by_model.append(("tumor-only model", len(scored), pooled[0]))
        by_model.append((f"cascade, {presence}", len(scored), pooled[1]))
    return "\n".join([*lines, *pooled_rows, *distance_table(by_model)]) + "\n"


def main() -> None:
    table_main(table, __doc__, "benchmarks/cascade_cv.sh")


if __name__ == "__main__":
    main()
