"""Would the cascade find more tumors with its neighbouring slices? ``python -m benchmarks.presence_context OUT [--out FILE]``.

For every fold pair of ``benchmarks/cascade_cv.sh OUT``: the cascade's presence probability ``P`` of every val
and test slice (:func:`bts_lightning.cascade.presence_scores`, flip-averaged as the cascade computes it), scored
three ways: the slice alone (what ``cascade.ckpt`` does); with volume context, the mean of ``P`` over the slice
and the slices just before and after it in the same scan (same folder, slice numbers one apart); and that mean with
one-slice gaps closed (:func:`gaps_closed`: a slice between two slices that pass passes too; added 2026-12-02).
Each way gets its own threshold, calibrated on the val fold's empty slices to the cascade's target false-alarm rate;
on the test fold the tumor-only model's mask (``tumor_only_test/per_image.csv``) is kept where the score is above it
and emptied elsewhere. Per pair and pooled over every test slice: tumor-slice Dice, the drop from the
tumor-only model, sensitivity and false-alarm rate. The slice-alone rows reproduce the cascade's own evaluation
(``benchmarks.cascade_cv_table``); the script checks that its threshold is the cascade's. The framework
now builds the second way (``python -m bts_lightning.cascade ... context=1``, :mod:`bts_lightning.scan_context`;
``benchmarks/cascade_cv.sh`` scores it), and its rows reproduce this script's; this script adds the count of the
tumor slices the slice-alone score misses.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir

from benchmarks.cascade_cv_table import pair_name, pair_rows, pooled_name, scores
from benchmarks.table_cli import table_main
from bts_lightning.data.neighbours import Position, slice_position
from bts_lightning.decision import calibrate
from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.scan_context import context_means

COLUMNS = ("fold pair (val / test)", "presence score", "threshold (val)", "test slices (tumor/empty)",
           "tumor-only tumor-slice Dice", "tumor-slice Dice", "Dice drop", "sensitivity", "false-alarm rate")
WAYS = ("slice alone", "mean with the neighbouring slices", "the mean, one-slice gaps closed")


def volume_mean(values: Sequence[float], positions: Sequence[Position]) -> list[float]:
    """Each value averaged with those of the slices numbered one below and one above it in the same scan
    (:func:`bts_lightning.scan_context.context_means`, the scan context of a cascade built with ``context=1``);
    a slice without neighbours keeps its value."""
    means = context_means(values, positions, 1)
    return [float(value) if mean is None else mean for value, mean in zip(values, means)]


def gaps_closed(values: Sequence[float], positions: Sequence[Position]) -> list[float]:
    """Each value raised to the smaller of its two neighbours' (the slices numbered one below and one above it in the
    same scan) when both are present: a threshold on the result keeps every slice between two kept slices, a
    one-slice gap closed (a tumor spans consecutive slices). A slice missing a neighbour keeps its value."""
    at = dict(zip(positions, values))
    closed = []
    for (scan, number), value in zip(positions, values):
        below, above = at.get((scan, number - 1)), at.get((scan, number + 1))
        closed.append(float(value) if below is None or above is None else max(float(value), min(below, above)))
    return closed


def gated(rows: Sequence[dict[str, Any]], kept: dict[str, bool]) -> list[dict[str, Any]]:
    """``rows`` (per-image rows of one model) with the mask emptied on every slice whose ``kept[stem]`` is False."""
    out = []
    for row in rows:
        if kept[row["stem"]]:
            out.append(row)
        else:
            empty_right = row["area_true"] == 0
            out.append({**row, "area_pred": 0.0, "dice": float(empty_right), "iou": float(empty_right)})
    return out


def presence_by_stem(cascade_ckpt: Path, split: str) -> tuple[dict[str, float], dict[str, bool], dict[str, tuple[str, int]]]:
    """Presence probability, tumor truth and slice position of every ``split`` slice, by stem."""
    from bts_lightning.cascade import presence_scores
    from bts_lightning.evaluate import load_split

    overrides = [f"ckpt_path={cascade_ckpt}", f"split={split}", "slice_decision=off"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("evaluate", overrides=overrides)
    loaded = load_split(cfg, overrides, split, "evaluate")
    joined = loaded.predictor.module.net.net  # PresenceGated(Cascade)
    values, tumor = presence_scores(joined, loaded.dataset)
    dataset = loaded.dataset
    stems = [dataset.stem(position) for position in range(len(dataset))]
    positions = [slice_position(dataset.pairs[index].image) for index in dataset.indices]
    if None in positions:
        raise ValueError(f"{cascade_ckpt}: a slice file name of the {split} split does not end with a slice number, "
                         "so its neighbours are unknown")
    return dict(zip(stems, values)), dict(zip(stems, tumor)), dict(zip(stems, positions))


def missed_slices(kept: dict[str, bool], truth: dict[str, bool], positions: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Tumor slices not ``kept``, counted by how many of their two neighbours have a tumor (``between``: both,
    ``end``: one, ``alone``: none), and how many are in a scan where some tumor slice is kept (``scan_found``)."""
    tumor_at = {positions[stem]: has_tumor for stem, has_tumor in truth.items()}
    found_scans = {positions[stem][0] for stem, has_tumor in truth.items() if has_tumor and kept[stem]}
    counts = {"missed": 0, "between": 0, "end": 0, "alone": 0, "scan_found": 0}
    for stem, has_tumor in truth.items():
        if not has_tumor or kept[stem]:
            continue
        scan, number = positions[stem]
        neighbours = sum(tumor_at.get((scan, number + step), False) for step in (-1, 1))
        counts["missed"] += 1
        counts[("alone", "end", "between")[neighbours]] += 1
        counts["scan_found"] += scan in found_scans
    return counts


def pair_scores(run: Path) -> dict[str, Any]:
    """Both ways' thresholds and gated test rows of fold pair ``run`` (see the module doc)."""
    record = json.loads((run / "cascade" / "cascade.json").read_text())
    target = record["decision"]["target_false_alarm_rate"]
    ckpt = run / "cascade" / "checkpoints" / "cascade.ckpt"
    tumor_only, _ = pair_rows(run)
    result: dict[str, Any] = {"tumor_only": tumor_only}
    split_scores = {split: presence_by_stem(ckpt, split) for split in ("val", "test")}
    for way in WAYS:
        by_split = {}
        for split, (values, _, positions) in split_scores.items():
            stems = list(values)
            raw = [values[stem] for stem in stems]
            at = [positions[stem] for stem in stems]
            final = raw if way == WAYS[0] else volume_mean(raw, at)
            final = gaps_closed(final, at) if way == WAYS[2] else final
            by_split[split] = dict(zip(stems, final))
        val_truth = split_scores["val"][1]
        threshold = calibrate([score for stem, score in by_split["val"].items() if not val_truth[stem]], target)
        if way == WAYS[0] and not np.isclose(threshold, record["presence_threshold"], rtol=0, atol=1e-6):
            raise ValueError(f"{run}: the slice-alone threshold {threshold} is not the cascade's "
                             f"{record['presence_threshold']}; were the checkpoints changed since?")
        kept = {stem: score > threshold for stem, score in by_split["test"].items()}
        result[way] = (threshold, gated(tumor_only, kept))
        if way == WAYS[0]:
            _, truth, positions = split_scores["test"]
            result["missed"] = missed_slices(kept, truth, positions)
    return result


def table(out: Path) -> str:
    """The Markdown table of both ways for every fold pair under ``out`` and pooled, then a line counting the
    tumor slices the slice-alone score misses (:func:`missed_slices`)."""
    runs = sorted(path for path in out.glob("val*_test*") if (path / "cascade" / "cascade.json").is_file())
    if not runs:
        raise ValueError(f"{out} has no val<V>_test<T>/cascade/cascade.json: run benchmarks/cascade_cv.sh first")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    pooled: dict[str, list[dict[str, Any]]] = {"tumor_only": [], **{way: [] for way in WAYS}}
    missed: Counter[str] = Counter()

    def line(name: str, way: str, threshold: str, base_rows: list, rows: list) -> str:
        n_tumor, n_empty, base, _, _ = scores(base_rows)
        _, _, dice, sensitivity, false_alarms = scores(rows)
        return "| " + " | ".join([name, way, threshold, f"{n_tumor}/{n_empty}", f"{base:.3f}", f"{dice:.3f}",
                                  f"{base - dice:.3f}", f"{sensitivity:.3f}", f"{false_alarms:.3f}"]) + " |"

    for run in runs:
        result = pair_scores(run)
        pooled["tumor_only"].extend(result["tumor_only"])
        missed.update(result["missed"])
        for way in WAYS:
            threshold, rows = result[way]
            pooled[way].extend(rows)
            lines.append(line(pair_name(run), way, f"{threshold:.3f}", result["tumor_only"], rows))
    for way in WAYS:
        lines.append(line(pooled_name(len(runs)), way, "(each pair its own)", pooled["tumor_only"],
                          pooled[way]))
    lines.append(f"\nTumor slices the slice-alone score misses: {missed['missed']} ({missed['between']} between two "
                 f"tumor slices, {missed['end']} at an end of a tumor, {missed['alone']} with no tumor neighbour); "
                 f"{missed['scan_found']} of them in a scan where a tumor slice is found.")
    return "\n".join(lines) + "\n"


def main() -> None:
    table_main(table, __doc__, "benchmarks/cascade_cv.sh")


if __name__ == "__main__":
    main()
