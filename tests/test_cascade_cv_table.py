"""benchmarks/cascade_cv_table.py: per fold pair and pooled cascade scores from hand-made per-image CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import cascade_cv_table

HEADER = ["dataset", "stem", "label", "tumor_type", "dice", "iou", "precision", "recall", "hd95", "area_true",
          "area_pred"]


def write_scores(folder: Path, slices: list[tuple[str, float, int, int]]) -> None:
    """per_image.csv of (stem, dice, area_true, area_pred) rows, as evaluate writes it."""
    folder.mkdir(parents=True)
    with (folder / "per_image.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for stem, dice, area_true, area_pred in slices:
            writer.writerow(["lgg", stem, "", "", dice, dice, dice, dice, 0.0, area_true, area_pred])


def write_pair(out: Path, name: str, tumor_only: list, cascade: list, threshold: float = 0.6) -> None:
    write_scores(out / name / "tumor_only_test", tumor_only)
    write_scores(out / name / "cascade_test", cascade)
    (out / name / "cascade").mkdir()
    record = {"presence_threshold": threshold,
              "presence_on_split": {"false_alarm_rate": 0.05, "sensitivity": 0.9, "split": "val"}}
    (out / name / "cascade" / "cascade.json").write_text(json.dumps(record))


def cells_of(lines: list[str]) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def rows(out: Path) -> list[list[str]]:
    """The cells of the first table's rows (the per-pair and pooled scores)."""
    lines = cascade_cv_table.table(out).split("\n\n")[0].splitlines()
    assert lines[0].startswith("| fold pair") and lines[1].count("---") == len(cascade_cv_table.COLUMNS)
    return cells_of(lines[2:])


def test_each_pair_and_the_pool_of_every_test_slice(tmp_path):
    # Pair 1/2: the cascade empties one tumor slice (Dice 0.6 -> 0) and both false alarms.
    write_pair(tmp_path, "val1_test2",
               [("a1", 0.8, 50, 40), ("a2", 0.6, 20, 30), ("a3", 0.0, 0, 5), ("a4", 0.0, 0, 3)],
               [("a1", 0.8, 50, 40), ("a2", 0.0, 20, 0), ("a3", 1.0, 0, 0), ("a4", 1.0, 0, 0)])
    # Pair 3/4: the cascade keeps its tumor slice and its one false alarm.
    write_pair(tmp_path, "val3_test4", [("b1", 0.9, 70, 60), ("b2", 0.0, 0, 10)],
               [("b1", 0.9, 70, 60), ("b2", 0.0, 0, 10)], threshold=0.25)
    first, second, pooled = rows(tmp_path)
    assert first == ["1 / 2", "slice alone", "2/2", "0.700", "0.400", "0.300", "0.500", "0.000", "0.600",
                     "0.050 / 0.900"]
    assert second == ["3 / 4", "slice alone", "1/1", "0.900", "0.900", "0.000", "1.000", "1.000", "0.250",
                      "0.050 / 0.900"]
    # Pooled per image, not a mean of the two pairs: 3 tumor slices and 3 empty ones.
    assert pooled[:8] == ["pooled (2 test folds)", "slice alone", "3/3", "0.767", "0.567", "0.200", "0.667", "0.333"]


def test_a_scan_context_cascade_gets_its_own_rows_and_pool(tmp_path):
    tumor_only = [("a1", 0.8, 50, 40), ("a2", 0.6, 20, 30), ("a3", 0.0, 0, 5), ("a4", 0.0, 0, 3)]
    write_pair(tmp_path, "val1_test2", tumor_only,
               [("a1", 0.8, 50, 40), ("a2", 0.0, 20, 0), ("a3", 1.0, 0, 0), ("a4", 1.0, 0, 0)])
    write_pair(tmp_path, "val3_test4", [("b1", 0.9, 70, 60), ("b2", 0.0, 0, 10)],
               [("b1", 0.9, 70, 60), ("b2", 1.0, 0, 0)])
    # Only pair 1/2 has a scan-context cascade: it keeps the tumor slice a2 and one false alarm.
    write_scores(tmp_path / "val1_test2" / "cascade_context_test",
                 [("a1", 0.8, 50, 40), ("a2", 0.6, 20, 30), ("a3", 1.0, 0, 0), ("a4", 0.0, 0, 3)])
    (tmp_path / "val1_test2" / "cascade_context").mkdir()
    record = {"scan_context": {"context": 1, "threshold": 0.4, "false_alarm_rate": 0.04, "sensitivity": 0.95}}
    (tmp_path / "val1_test2" / "cascade_context" / "cascade.json").write_text(json.dumps(record))
    table = rows(tmp_path)
    assert [row[:2] for row in table] == [["1 / 2", "slice alone"], ["3 / 4", "slice alone"],
                                          ["1 / 2", "scan context (1 either side)"],
                                          ["pooled (2 test folds)", "slice alone"],
                                          ["pooled (1 test fold)", "scan context (1 either side)"]]
    assert table[2][2:] == ["2/2", "0.700", "0.700", "0.000", "1.000", "0.500", "0.400", "0.040 / 0.950"]
    assert table[4][2:8] == ["2/2", "0.700", "0.700", "0.000", "1.000", "0.500"]


def test_false_alarms_by_distance_to_the_nearest_tumor_slice_of_each_scan(tmp_path):
    # Scan P1 (test fold 2): tumor on slice 3; empty slices 1, 2, 4 and 9. Scan P2 (test fold 4): no tumor.
    tumor_only = [("s/P1/P1_1", 0.0, 0, 4), ("s/P1/P1_2", 0.0, 0, 4), ("s/P1/P1_3", 0.7, 30, 20),
                  ("s/P1/P1_4", 0.0, 0, 4), ("s/P1/P1_9", 0.0, 0, 4)]
    write_pair(tmp_path, "val1_test2", tumor_only,
               [("s/P1/P1_1", 1.0, 0, 0), ("s/P1/P1_2", 0.0, 0, 4), ("s/P1/P1_3", 0.7, 30, 20),
                ("s/P1/P1_4", 1.0, 0, 0), ("s/P1/P1_9", 1.0, 0, 0)])
    write_pair(tmp_path, "val3_test4", [("s/P2/P2_1", 0.0, 0, 4), ("s/P2/P2_2", 1.0, 0, 0), ("s/Q/Q_1", 0.9, 9, 9)],
               [("s/P2/P2_1", 0.0, 0, 4), ("s/P2/P2_2", 1.0, 0, 0), ("s/Q/Q_1", 0.9, 9, 9)])
    text = cascade_cv_table.table(tmp_path)
    assert "by slices to the nearest tumor slice of their scan" in text
    header, _rule, *lines = text.split("\n\n")[-1].strip().splitlines()
    assert cells_of([header])[0] == ["model", "test folds", "1", "2", "3-5", "6+", "no tumor slice in the scan"]
    assert cells_of(lines) == [["tumor-only model", "2", "2 / 2", "1 / 1", "0 / 0", "1 / 1", "1 / 2"],
                               ["cascade, slice alone", "2", "1 / 2", "0 / 1", "0 / 0", "0 / 1", "1 / 2"]]


def test_scores_of_different_slices_are_refused(tmp_path):
    write_pair(tmp_path, "val1_test2", [("a1", 0.8, 50, 40), ("a2", 0.0, 0, 3)],
               [("a1", 0.8, 50, 40), ("z9", 1.0, 0, 0)])
    with pytest.raises(ValueError, match="scored different slices"):
        cascade_cv_table.table(tmp_path)


def test_a_test_fold_counted_twice_is_refused(tmp_path):
    for name in ("val1_test2", "val3_test2"):
        write_pair(tmp_path, name, [("a1", 0.8, 50, 40), ("a2", 0.0, 0, 3)], [("a1", 0.8, 50, 40), ("a2", 1.0, 0, 0)])
    with pytest.raises(ValueError, match="test fold of two pairs"):
        cascade_cv_table.table(tmp_path)


def test_an_empty_folder_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run benchmarks/cascade_cv.sh first"):
        cascade_cv_table.table(tmp_path)
