"""benchmarks/presence_context.py: the volume mean, gap closing, gating and missed-slice counts on hand-made
cases."""

from __future__ import annotations

import pytest

from benchmarks.cascade_cv_table import scores
from benchmarks.presence_context import gaps_closed, gated, missed_slices, volume_mean


def test_the_volume_mean_averages_only_neighbours_of_the_same_scan():
    positions = [("a", 1), ("a", 2), ("a", 3), ("a", 5), ("b", 4)]
    values = [0.9, 0.3, 0.6, 0.8, 0.2]
    averaged = volume_mean(values, positions)
    # a1: (0.9 + 0.3) / 2; a2: (0.3 + 0.9 + 0.6) / 3; a3: (0.6 + 0.3) / 2 (a4 is missing);
    # a5 has no neighbour present; b4 is another scan's slice, not a5's neighbour.
    assert averaged == pytest.approx([0.6, 0.6, 0.45, 0.8, 0.2])


def test_gating_empties_the_mask_of_slices_not_kept():
    rows = [{"stem": "t1", "dice": 0.8, "iou": 0.7, "area_true": 50.0, "area_pred": 40.0},
            {"stem": "t2", "dice": 0.6, "iou": 0.4, "area_true": 20.0, "area_pred": 30.0},
            {"stem": "e1", "dice": 0.0, "iou": 0.0, "area_true": 0.0, "area_pred": 9.0},
            {"stem": "e2", "dice": 0.0, "iou": 0.0, "area_true": 0.0, "area_pred": 3.0}]
    out = gated(rows, {"t1": True, "t2": False, "e1": False, "e2": True})
    assert [row["area_pred"] for row in out] == [40.0, 0.0, 0.0, 3.0]
    assert [row["dice"] for row in out] == [0.8, 0.0, 1.0, 0.0]  # an emptied empty slice is right
    assert scores(out) == (2, 2, pytest.approx(0.4), 0.5, 0.5)
    assert rows[1]["area_pred"] == 30.0  # the input rows are left as they were


def test_missed_tumor_slices_are_counted_by_their_neighbours():
    positions = {"a1": ("a", 1), "a2": ("a", 2), "a3": ("a", 3), "a4": ("a", 4), "b1": ("b", 1), "b5": ("b", 5)}
    truth = {"a1": True, "a2": True, "a3": True, "a4": False, "b1": True, "b5": False}
    kept = {"a1": False, "a2": False, "a3": True, "a4": False, "b1": False, "b5": True}
    assert missed_slices(kept, truth, positions) == {"missed": 3, "between": 1, "end": 1, "alone": 1, "scan_found": 2}


def test_a_slice_between_two_higher_neighbours_of_its_scan_is_raised_to_the_lower_of_them():
    positions = [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 6), ("b", 5)]
    values = [0.9, 0.2, 0.7, 0.8, 0.1, 0.95]
    # a2 lies between 0.9 and 0.7: raised to 0.7; a3 between 0.2 and 0.8 keeps its own 0.7 (higher than 0.2);
    # a1, a4, a6 miss a neighbour (a0, a5, a5/a7); b5 is another scan's slice, no neighbour of a4 or a6.
    assert gaps_closed(values, positions) == pytest.approx([0.9, 0.7, 0.7, 0.8, 0.1, 0.95])
    closed = [value > 0.5 for value in gaps_closed(values, positions)]
    assert closed == [True, True, True, True, False, True]  # a threshold keeps the gap a2 with its neighbours
