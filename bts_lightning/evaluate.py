"""Hydra app: ``python -m bts_lightning.evaluate ckpt_path=PATH [data.root=DIR] [split=test|val|all]``.

Loads a checkpoint (or an exported model) without its training config, predicts every slice of
the chosen split (``all`` = every slice, training slices included) at ``data.image_size``, and
writes into the run directory (``logs/evaluate/runs/<time>/``). The data root and split settings
come from the checkpoint unless overridden, and the scored slices are checked against the trained
split (:mod:`bts_lightning.trained_split`); a data group naming another dataset (``data=lgg split=all``
for a model trained on ``brain_tumor``) is read with its own settings, its ``data.channels`` checked
against the model's input channels (the log says which channels feed it). ``data.image_size``
defaults to the size the model was trained at, from the model file's contract
(:class:`bts_lightning.inference.ModelContract`; exported files embed it), and an explicit one that
differs is warned about. Files written:

- ``per_image.csv``: dataset, stem, label, tumor_type, dice, iou, precision, recall, hd95, area_true, area_pred;
- ``metrics.json``: the dataset name, mean, std (population) and median of every column over all
  images, the same per tumor type when ``metadata.csv`` has labels (1 meningioma, 2 glioma, 3
  pituitary), tumor slices and empty slices apart (``tumor_slices``: Dice, IoU, slice-level
  sensitivity; ``empty_slices``: false-alarm rate; :func:`bts_lightning.metrics.summarize_by_truth`; on data in
  one folder per scan also ``empty_slices.by_distance_to_tumor``, the false alarms by how many slices away the scan's
  nearest tumor slice is, :func:`bts_lightning.metrics.empty_slices_by_distance`; else ``None``),
  counts of the empty cases, and the worst slices;
- ``worst_slices.png``: image | truth | prediction | overlay panels of the ``worst_k`` lowest-Dice
  slices (ties: larger HD95 first).

Metrics are per image, for the tumor class, on binary masks at the evaluation size, computed by
:func:`bts_lightning.metrics.image_metrics`: Dice and IoU through the same function as the training
metric (so they agree with training's ``val/dice``/``test/dice`` on the same masks); HD95 and areas
in pixels of that size.
The empty-case policy (both empty: ratios 1, HD95 0; a missed tumor or a false alarm: ratios 0,
HD95 = image diagonal; no image dropped, nothing NaN) is described in :mod:`bts_lightning.metrics`;
``metrics.json["cases"]`` counts each case.

A model with a calibrated slice decision (``python -m bts_lightning.calibrate``; :mod:`bts_lightning.decision`)
has it applied (``slice_decision=auto``; ``off`` to score the raw masks): slices it judges tumor-free
are scored with empty masks. ``metrics.json`` records it under ``inference.decision``, and
``decision_note`` says whether it was chosen on the scored split (optimistic) or that split is held out; on a
held-out split ``false_alarm_check`` (:func:`false_alarm_check`) says whether its false alarms are what the
calibration allows for empty slices like its own.
A cascade built with a scan context (:mod:`bts_lightning.scan_context`) decides instead from each slice's presence
averaged with its neighbours in the scan (``scan_context=auto``; ``off``: each slice alone), recorded under
``inference.scan_context``; data not in one folder per scan is refused.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from bts_lightning.data.dataset import SliceDataset
from bts_lightning.data.neighbours import SCAN_LAYOUTS, window_size
from bts_lightning.decision import SliceDecision, false_alarm_surprise, on_new_slices, on_new_slices_line
from bts_lightning.errors import BtsError, ConfigError
from bts_lightning.inference import (
    InferenceOptions,
    Predictor,
    check_input_size,
    contract_of,
    load_predictor,
    resolve_device,
)
from bts_lightning.metrics import (
    AREAS,
    METRICS,
    count_cases,
    empty_slices_by_distance,
    image_metrics,
    summarize,
    summarize_by_truth,
)
from bts_lightning.models.cascade import cascade_of
from bts_lightning.runtime import atomic_path, hydra_app, make_directory, number_setting, write_json_atomic
from bts_lightning.scan_context import (
    ScanContext,
    SegmentationPredictor,
    check_scan_layout,
    decision_or_context,
    presence_probabilities,
)
from bts_lightning.trained_split import (
    channel_mapping,
    check_scored_slices,
    data_config,
    describe_scored,
    explicit_data,
    override_keys,
    stored_split,
)
from bts_lightning.visualize import captioned, panel, panel_grid, write_png

log = logging.getLogger(__name__)

COLUMNS = ("dataset", "stem", "label", "tumor_type", *METRICS, *AREAS)
LABEL_NAMES = {"1": "meningioma", "2": "glioma", "3": "pituitary"}
SPLITS = ("test", "val", "all")
UNLABELLED = "unlabelled"


def tumor_type(label: str | int | None) -> str | None:
    """Name of a metadata label (1 meningioma, 2 glioma, 3 pituitary); other labels as given."""
    if label is None or str(label).strip() == "":
        return None
    text = str(label).strip()
    return LABEL_NAMES.get(text, text)


def summarize_by_type(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Per tumor type ``{"n": count, column: describe(...)}`` of the slices with a tumor (an empty slice shows no
    tumor of its patient's type); ``None`` when none of them has a label."""
    tumor_rows = [row for row in rows if row["area_true"] > 0]
    if all(row["tumor_type"] is None for row in tumor_rows):
        return None
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in tumor_rows:
        groups[row["tumor_type"] or UNLABELLED].append(row)
    return {name: {"n": len(group), **summarize(group)} for name, group in sorted(groups.items())}


def worst_positions(rows: list[dict[str, Any]], k: int) -> list[int]:
    """Row positions of the ``k`` lowest Dice scores (ties: larger HD95, then stem)."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["dice"], -rows[i]["hd95"], rows[i]["stem"]))
    return order[: max(k, 0)]


def select_split(datamodule: Any, split: str) -> SliceDataset:
    """The ``test``/``val`` dataset of a set-up datamodule, or every slice for ``all``."""
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}.")
    if split == "all":
        dataset = datamodule.make_dataset(range(len(datamodule.pairs)))
    else:
        dataset = datamodule.datasets[split]
    if len(dataset) == 0:
        sizes = ", ".join(f"{name} {len(d)}" for name, d in datamodule.datasets.items())
        raise ConfigError(
            f"The {split} split of {datamodule.root} is empty ({sizes}). Use split=val or split=all, or "
            "hold out test slices as in training (data.test_fold=K with metadata folds, else data.test_fraction=F)."
        )
    return dataset


def write_per_image_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``per_image.csv`` with full-precision floats (its means equal ``metrics.json``'s), all or nothing."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in COLUMNS})


def format_table(metrics: dict[str, Any]) -> str:
    """A short plain-text summary table."""
    lines = [
        (f"Evaluated {metrics['n_images']} slice(s) of {metrics['dataset']}, split {metrics['split']}, at "
         f"{metrics['image_size']} px ({metrics['checkpoint']})"),
        describe_scored(metrics["slices"]),
        f"Channels: {metrics['channels']}",
        f"{'metric':<16}{'mean':>10}   {'std':<10}{'median':>10}",
    ]
    for column in (*METRICS, *AREAS):
        stats = metrics["summary"][column]
        name = f"{column} (px)" if column in ("hd95", *AREAS) else column
        lines.append(f"{name:<16}{stats['mean']:>10.4f} ± {stats['std']:<10.4f}{stats['median']:>10.4f}")
    if metrics["by_label"]:
        lines.append("Dice by tumor type (slices with a tumor):")
        for name, group in metrics["by_label"].items():
            lines.append(f"  {name:<12} n={group['n']:<5} {group['dice']['mean']:.4f} ± {group['dice']['std']:.4f}")
    cases = metrics["cases"]
    lines.append(
        f"Empty cases: {cases['missed_tumor']} missed tumor(s), {cases['false_alarm']} false alarm(s), "
        f"{cases['both_empty']} correctly empty"
    )
    decision = metrics["inference"].get("decision")
    if decision is not None:
        lines.append(f"Slice decision: {SliceDecision.from_dict(decision).describe()}; {metrics['decision_note']}")
    context = metrics["inference"].get("scan_context")
    if context is not None:
        lines.append(f"Scan context: {ScanContext(**context).describe()}; {metrics['decision_note']}")
    check = metrics.get("false_alarm_check")
    return "\n".join([*lines, *by_truth_lines(metrics), *([false_alarm_check_line(check)] if check else [])])


def by_truth_lines(metrics: dict[str, Any]) -> list[str]:
    """Tumor slices, empty slices and all slices, one line each (``metrics.json``'s ``tumor_slices`` etc.)."""
    tumor, empty = metrics["tumor_slices"], metrics["empty_slices"]
    if tumor["n"]:
        tumor_line = (f"Tumor slices: {tumor['n']}, Dice {tumor['dice']['mean']:.4f} mean, {tumor['dice']['median']:.4f}"
                      f" median; IoU {tumor['iou']['mean']:.4f} mean, {tumor['iou']['median']:.4f} median; "
                      f"{tumor['detected']} detected (slice-level sensitivity {tumor['sensitivity']:.4f})")
    else:
        tumor_line = f"Tumor slices: 0 ({tumor['note']})"
    if empty["n"]:
        empty_line = (f"Empty slices: {empty['n']}, {empty['false_alarms']} false alarm(s) "
                      f"(false-alarm rate {empty['false_alarm_rate']:.4f})")
    else:
        empty_line = f"Empty slices: 0 ({empty['note']})"
    dice = metrics["summary"]["dice"]["mean"]
    all_line = f"All slices: {metrics['n_images']}, Dice {dice:.4f} mean (empty slices left empty score 1, false alarms 0)"
    by_distance = empty.get("by_distance_to_tumor")
    if not by_distance:
        return [tumor_line, empty_line, all_line]
    groups = ", ".join(f"{name}: {group['false_alarms']} of {group['n']}" for name, group in by_distance.items()
                       if group["n"])
    distance_line = f"False alarms on empty slices by slices to the scan's nearest tumor slice: {groups}"
    return [tumor_line, empty_line, distance_line, all_line]


@dataclass(frozen=True)
class SplitToScore:
    """A loaded model and the slices of one split to score with it (:func:`load_split`)."""

    ckpt_path: Path
    device: torch.device
    predictor: Predictor
    datamodule: Any
    dataset: SliceDataset
    channels: str  # which channels of the data feed the model, in words
    scored: dict[str, Any]  # which slices, checked against the trained split (metrics.json's "slices")


def model_neighbours(data: DictConfig, neighbours: int, keys: set[str]) -> DictConfig:
    """``data`` with the model's ``neighbours`` (the scan window its input stacks: a property of the model, not of
    the data); ``ConfigError`` when the command line (``keys``) set ``data.neighbours`` to another value."""
    given = data.get("neighbours", 0)
    if "data.neighbours" in keys and given != neighbours:
        raise ConfigError(f"data.neighbours={given}, but the model was trained with data.neighbours={neighbours} (its "
                          f"input stacks {window_size(neighbours)} slice(s) of a scan); leave data.neighbours out.")
    data = data.copy()
    with open_dict(data):
        data.neighbours = neighbours
    return data


def load_split(cfg: DictConfig, overrides: Sequence[str] | None, split: str, app: str) -> SplitToScore:
    """Load ``cfg.ckpt_path`` and the ``split`` slices of its data, as ``evaluate`` scores them.

    ``overrides``: the user's command-line overrides (see :func:`evaluate`); ``app`` names the app in
    the "required" message. Raises ``ConfigError`` for a missing ``ckpt_path``, an unknown or empty
    split, slices that are not the trained split, or channels the model does not take.
    """
    if not cfg.get("ckpt_path"):
        raise ConfigError(f"ckpt_path is required: python -m bts_lightning.{app} ckpt_path=RUN/checkpoints/best.ckpt")
    ckpt_path = Path(str(cfg.ckpt_path))
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}.")
    device = resolve_device(cfg.get("device", "auto"))
    predictor = load_predictor(ckpt_path, device)  # before the data: a bad checkpoint fails fast

    contract = contract_of(predictor)
    record, trained_at = stored_split(ckpt_path), contract.image_size
    if overrides is None:  # a config built in Python: its data settings are all deliberate
        keys, data = {"data"}, cfg.data
    else:
        keys = override_keys(overrides)
        data = data_config(cfg.data, record, keys, trained_at)
    datamodule = instantiate(model_neighbours(data, contract.neighbours, keys), augmentations=None)
    # What the model was trained on: the dataset its checkpoint's split record names; the channels its contract holds.
    trained = {"name": (record or {}).get("settings", {}).get("name"), "channels": contract.channels}
    channels = channel_mapping(contract.slice_channels, trained, datamodule.channels, datamodule.name)
    if contract.neighbours:
        channels += (f", with the {contract.neighbours} slice(s) before and after each in its scan (data.neighbours): "
                     f"{contract.in_channels} input channels")
    log.info("Channels: %s", channels)
    check_input_size(predictor, datamodule.image_size, "data.image_size")
    if contract.neighbours:
        datamodule.neighbours_fix = ("this model was trained with them (its input stacks each slice's scan neighbours), so "
                                     "score it on data in one folder per scan, or score a model trained with "
                                     "data.neighbours=0")
    try:
        datamodule.setup("test")
    except BtsError as error:
        if record is not None or explicit_data(keys):
            raise
        raise type(error)(f"{error} ({ckpt_path} records no training data, so the {app} config's default data "
                          f"({datamodule.name}) was used: name the data to score, e.g. data=lgg data.root=DIR "
                          "split=all.)") from None
    dataset = select_split(datamodule, split)
    if trained_at is not None and trained_at != datamodule.image_size:
        log.warning("The model was trained at %d px but data.image_size=%d; pass data.image_size=%d to match.",
                    trained_at, datamodule.image_size, trained_at)
    ids = [dataset.stem(position) for position in range(len(dataset))]
    scored = check_scored_slices(split, ids, record, explicit_data(keys), datamodule.split_record())
    return SplitToScore(ckpt_path, device, predictor, datamodule, dataset, channels, scored)


def split_note(scored: dict[str, Any]) -> str | None:
    """Why the scores of the scored slices are optimistic, when they are: among them are the trained network's
    validation slices (which chose its best.ckpt and drove early stopping and the scheduler) or its training slices.
    None when neither (e.g. its test split, another dataset) or no split record tells."""
    subsets = scored.get("in_trained_subsets") or {}
    reasons = [f"{subsets[name]} of the {scored.get('n')} scored slices are the training run's {what}"
               for name, what in (("val", ("validation slices, which chose its checkpoint (best.ckpt) and drove early "
                                          "stopping and the scheduler")), ("train", "training slices"))
               if subsets.get(name)]
    return f"{'; '.join(reasons)}: these scores are optimistic." if reasons else None


def decision_note(decision: SliceDecision | None, split: str, dataset: str, what: str = "slice decision",
                  subsets: Mapping[str, int] | None = None, same_files: bool = False) -> str | None:
    """What the slice decision's numbers mean on ``split`` of ``dataset``: chosen on it (optimistic), scored on
    training slices (optimistic), or held out.

    ``what``: the decision named (a cascade's scan context is calibrated where its slice decision is). ``subsets``:
    how many scored slices are in each subset of the checkpoint's split (``check_scored_slices``' record), when known.
    ``same_files``: whether the decision's calibration slices are among those scored (:func:`calibration_slices_scored`).
    """
    if decision is None:
        return None
    chosen_on, chosen_data = decision.calibration.get("split"), decision.calibration.get("dataset")
    if chosen_data != dataset:
        return f"{what} calibrated on the {chosen_on} split of {chosen_data}, not this dataset."
    if calibrated_here(decision, split, dataset, subsets, same_files):
        return (f"{what} calibrated on the {chosen_on} split scored here: its false-alarm rate was chosen "
                "on these slices (optimistic).")
    if subsets and subsets.get("train"):
        return (f"{what} calibrated on the {chosen_on} split, but {subsets['train']} of the slices scored here were "
                "training slices (optimistic).")
    return f"{what} calibrated on the {chosen_on} split; this {split} split is held out."


def calibration_slices_scored(decision: SliceDecision | None, datamodule: Any, split: str) -> bool:
    """Whether the slices ``decision`` was calibrated on (its ``slices_sha256``) are among the ``split`` slices of
    ``datamodule``: its calibration split read here holds the same files, and ``split`` is that split or ``all``
    (or the calibration was on ``all`` of them)."""
    calibration = {} if decision is None else decision.calibration
    chosen_on, digest = calibration.get("split"), calibration.get("slices_sha256")
    if digest is None or chosen_on not in SPLITS or not (split == chosen_on or "all" in (split, chosen_on)):
        return False
    try:
        return select_split(datamodule, chosen_on).files_digest() == digest
    except BtsError:  # that split is empty here
        return False


def calibrated_here(decision: SliceDecision, split: str, dataset: str,
                    subsets: Mapping[str, int] | None = None, same_files: bool = False) -> bool:
    """Whether ``decision`` was calibrated on slices scored here, of ``dataset``: when ``same_files`` (its calibration
    slices' files are among those scored, e.g. other data than the training run's); with ``subsets`` (how many scored
    slices are in each subset of the checkpoint's split), whether any is in its calibration split, whatever root or
    split settings they were read with; otherwise whether that split is ``split`` (``all``, on either side, holds every
    split's)."""
    calibration = decision.calibration
    chosen_on = calibration.get("split")
    if calibration.get("dataset") != dataset:
        return False
    if same_files:
        return True
    if subsets is not None and chosen_on in ("train", "val", "test"):
        return bool(subsets.get(chosen_on))
    if subsets is not None and chosen_on == "all":
        return any(count for name, count in subsets.items() if name != "none")
    return chosen_on == split or "all" in (split, chosen_on)


def false_alarm_check(decision: SliceDecision | None, empty_slices: dict[str, Any], split: str,
                      dataset: str, subsets: Mapping[str, int] | None = None,
                      same_files: bool = False) -> dict[str, Any] | None:
    """Are the false alarms on these held-out empty slices what ``decision``'s calibration allows for empty slices
    like its own? ``p_value``: the chance of this many or more were they alike
    (:func:`~bts_lightning.decision.false_alarm_surprise`), with the rate expected and its 95 % bound
    (:func:`~bts_lightning.decision.false_alarm_bound`); ``unlike_calibration`` when ``p_value < 0.05``. ``None``
    without a decision, an empty slice or a calibration count, or when the decision was calibrated on these slices.
    (A cascade's scan context is calibrated on the empty slices of its decision's split that have a neighbour: the
    count is that split's.)
    """
    if decision is None or not decision.calibration.get("n_empty") or not empty_slices["n"]:
        return None
    if calibrated_here(decision, split, dataset, subsets, same_files):
        return None
    calibration, target, target_on = decision.calibration, decision.target_false_alarm_rate, decision.target_on
    n_calibration = calibration["n_empty"]
    p_value = false_alarm_surprise(empty_slices["false_alarms"], empty_slices["n"], n_calibration, target, target_on)
    return {"calibration": f"{n_calibration} empty slices of the {calibration.get('split')} split of "
                           f"{calibration.get('dataset')}",
            **on_new_slices(n_calibration, target, target_on), "p_value": p_value,
            "unlike_calibration": p_value < 0.05}


def false_alarm_check_line(check: dict[str, Any]) -> str:
    """``check`` (:func:`false_alarm_check`) in words; with advice when the slices are unlike the calibration's."""
    line = (f"Slice decision calibrated on {check['calibration']}, so {on_new_slices_line(check)}; as many false "
            f"alarms as here or more: p = {check['p_value']:.3g}")
    if check["unlike_calibration"]:
        line += (". These empty slices are unlike the calibration ones (other patients, scanner, sequence or "
                 "channels): the decision's false-alarm target does not hold here; calibrate it on empty slices like "
                 "them (python -m bts_lightning.calibrate, or for a cascade python -m bts_lightning.cascade, on a val "
                 "split of such data).")
    return line


MaskPredictor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def _mask_predictor(predictor: Predictor, options: InferenceOptions, context: ScanContext | None,
                    dataset: SliceDataset, batch_size: int) -> MaskPredictor:
    """``masks(positions, images)``: the masks (N, H, W) of the slices at ``positions`` of ``dataset``.

    With a scan ``context``, the presence of every slice is decided first, all slices together; a slice then
    keeps the cascade's segmentation where its scan context says it has a tumor, and is empty elsewhere.
    """
    if context is None:
        return lambda positions, images: options.predict_masks(predictor, images)
    cascade = cascade_of(predictor)
    probabilities: list[float] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="presence", unit="batch", disable=None):
        positions = range(start, min(start + batch_size, len(dataset)))
        probabilities.extend(presence_probabilities(cascade, np.stack([dataset.load(i)[0] for i in positions])))
    present = context.present(probabilities, dataset.scan_positions())
    segmentation = SegmentationPredictor(predictor)

    def masks(positions: Sequence[int], images: np.ndarray) -> np.ndarray:
        predicted = options.predict_masks(segmentation, images)
        predicted[[not present[position] for position in positions]] = 0
        return predicted

    return masks


def evaluate(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Predict the split, score every image, and write the three output files; returns metrics.json.

    ``overrides`` are the user's command-line overrides (the app passes Hydra's): ``data`` settings
    not among them (root, split settings, image size) come from the checkpoint, and the scored
    slices are checked against its split (see :mod:`bts_lightning.trained_split`). ``None`` (calls
    from Python) uses ``cfg.data`` as given, warning when its split is not the trained one.
    """
    split = str(cfg.get("split", "test"))
    options = InferenceOptions.from_config(cfg)
    worst_k = int(number_setting(cfg, "worst_k", 8, whole=True, minimum=0))
    output_dir = Path(cfg.paths.output_dir)
    scoring = load_split(cfg, overrides, split, "evaluate")
    predictor, datamodule, dataset, ckpt_path = scoring.predictor, scoring.datamodule, scoring.dataset, scoring.ckpt_path
    options, context = decision_or_context(options, cfg, predictor)
    batch_size = int(number_setting(cfg, "data.batch_size", 16, whole=True, minimum=1))
    if context is not None:
        check_scan_layout(datamodule.found_layout, datamodule.root)

    started = time.perf_counter()
    masks_of = _mask_predictor(predictor, options, context, dataset, batch_size)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(dataset), desc=f"evaluate {split}", unit="slice", disable=None) as bar:
        for start in range(0, len(dataset), batch_size):
            positions = range(start, min(start + batch_size, len(dataset)))
            images, truths = zip(*(dataset.load(position) for position in positions))
            predictions = masks_of(positions, np.stack(images))
            for position, prediction, truth in zip(positions, predictions, truths):
                label = datamodule.label_of(dataset.indices[position])
                rows.append({"dataset": datamodule.name, "stem": dataset.stem(position), "label": label,
                             "tumor_type": tumor_type(label), **image_metrics(prediction, truth)})
            bar.update(len(positions))
    eval_time = time.perf_counter() - started

    worst = worst_positions(rows, worst_k)
    applied = options.decision if context is None else contract_of(predictor).slice_decision  # where it was calibrated
    joined = cascade_of(predictor)
    in_subsets = scoring.scored.get("in_trained_subsets")  # None for a model file without a split record
    same_files = calibration_slices_scored(applied, datamodule, split)
    by_truth = summarize_by_truth(rows)
    by_truth["empty_slices"]["by_distance_to_tumor"] = (
        empty_slices_by_distance(rows, dataset.scan_positions())
        if datamodule.found_layout in SCAN_LAYOUTS else None)
    metrics: dict[str, Any] = {
        "checkpoint": str(ckpt_path.resolve()),
        "dataset": datamodule.name,
        "data_root": str(datamodule.root),
        "channels": scoring.channels,
        "split": split,
        "slices": scoring.scored,
        "image_size": datamodule.image_size,
        "n_images": len(rows),
        "device": str(scoring.device),
        "inference": {**options.to_dict(), "scan_context": None if context is None else context.to_dict()},
        "cascade": None if joined is None else joined.record(),
        "split_note": split_note(scoring.scored),
        "decision_note": decision_note(applied, split, datamodule.name,
                                       "slice decision" if context is None else "scan context", in_subsets,
                                       same_files),
        "summary": summarize(rows),
        "by_label": summarize_by_type(rows),
        "cases": count_cases(rows),
        **by_truth,
        "false_alarm_check": false_alarm_check(applied, by_truth["empty_slices"], split, datamodule.name, in_subsets,
                                               same_files),
        "worst": [{"stem": rows[i]["stem"], "dice": rows[i]["dice"], "hd95": rows[i]["hd95"]} for i in worst],
        "eval_time_s": round(eval_time, 2),
    }
    make_directory(output_dir)
    write_per_image_csv(output_dir / "per_image.csv", rows)
    if worst:
        images, truths = zip(*(dataset.load(position) for position in worst))
        predictions = masks_of(worst, np.stack(images))
        panels = [
            captioned(panel(image[dataset.own_channel], truth, prediction), rows[i]["stem"],
                      f"Dice {rows[i]['dice']:.3f}  HD95 {rows[i]['hd95']:.1f}")
            for i, image, truth, prediction in zip(worst, images, truths, predictions)
        ]
        write_png(output_dir / "worst_slices.png", cv2.cvtColor(panel_grid(panels), cv2.COLOR_RGB2BGR))
    elif (output_dir / "worst_slices.png").is_file():  # an earlier evaluation's, in a reused run folder
        (output_dir / "worst_slices.png").unlink()
    write_json_atomic(output_dir / "metrics.json", metrics)
    print(format_table(metrics), flush=True)
    log.info("%s: %s", datamodule.name, "; ".join(by_truth_lines(metrics)))
    if metrics["split_note"]:
        log.warning(metrics["split_note"])
    check = metrics["false_alarm_check"]
    if check is not None and check["unlike_calibration"]:
        log.warning(false_alarm_check_line(check))
    log.info("Wrote metrics.json, per_image.csv%s to %s", " and worst_slices.png" if worst else "", output_dir)
    return metrics


# Entry point (``bts-evaluate``); returns the mean Dice, the value Hydra sweepers optimize.
main = hydra_app("evaluate", evaluate, result=lambda metrics: metrics["summary"]["dice"]["mean"], pass_overrides=True)


if __name__ == "__main__":
    main()
