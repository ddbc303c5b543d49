"""Compare training runs: ``python -m bts_lightning.report dirs=DIR [out=DIR]`` (or ``bts-report``).

A Hydra app (``conf/report.yaml``); several folders: ``dirs='[DIR,DIR]'``.

Finds every run (a directory with ``metrics.json`` and ``.hydra/config.yaml``) under the given
directories, groups runs that share a configuration (everything except the seeds, the validation
and test folds and where files live), and writes ``report.md``, ``report.csv`` and ``report.png``:
one row per configuration, mean ± sample std over its runs, ranked by the held-out test Dice when
every run has one (else by the last-epoch validation Dice): the best validation Dice is picked on
the split it is measured on, so it is shown but never ranks. Beside the all-slice Dice, the last validation
epoch's tumor-slice Dice, sensitivity and false-alarm rate (tumor slices and empty slices scored apart;
``n/a (no empty slices)`` when the validation split has none); the CSV also has the test split's, and for runs
that calibrated a slice decision (``decision.target_false_alarm_rate``) the test split's with it
(``test_decision_*``, from ``test_with_decision``). Runs of ``experiment=cross_dataset``
add a second table (and ``cross_dataset.csv``): per configuration, the in-domain and the
cross-dataset evaluation side by side, with tumor-slice Dice, false-alarm rate and all-slice Dice.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from bts_lightning.errors import BtsError, ConfigError, format_names
from bts_lightning.runtime import (
    as_path,
    atomic_path,
    file_sha256,
    hydra_app,
    make_directory,
    path_setting,
    write_bytes_atomic,
)
from bts_lightning.visualize import BarSeries, score_bar_chart

USAGE = "python -m bts_lightning.report dirs=RUNS_DIR [out=DIR]; several folders: dirs='[DIR,DIR]'"

# Config keys that do not make a different configuration: seeds, cross-validation folds, where
# files live and settings that do not change results. Runs differing only in these are repeats.
IGNORED_KEYS = (
    "seed",
    "data.seed",
    "data.val_fold",
    "data.test_fold",
    "task_name",
    "ckpt_path",
    "paths",
    "data.num_workers",
    "data.cache",
    "data.download",
    "logger",
    "callbacks.progress_bar",
)
# Hydra override prefixes never shown in configuration labels (beyond IGNORED_KEYS).
_IGNORED_OVERRIDE_PREFIXES = ("hydra.",)

REPORT_FILES = ("report.md", "report.csv", "report.png")
CROSS_FILE = "cross_dataset.csv"

CSV_COLUMNS = (
    "rank",
    "config",
    "model",
    "loss",
    "optimizer",
    "lr",
    "image_size",
    "precision",
    "num_params",
    "dataset",
    "runs",
    "epochs_mean",
    "epochs_std",
    "train_time_s_mean",
    "train_time_s_std",
    "best_val_dice_mean",
    "best_val_dice_std",
    "last_val_dice_mean",
    "last_val_dice_std",
    "val_tumor_slices",
    "val_empty_slices",
    "last_val_dice_tumor_mean",
    "last_val_dice_tumor_std",
    "last_val_sensitivity_mean",
    "last_val_sensitivity_std",
    "last_val_false_alarm_rate_mean",
    "last_val_false_alarm_rate_std",
    "split",
    "test_runs",
    "test_dice_mean",
    "test_dice_std",
    "test_iou_mean",
    "test_iou_std",
    "test_tumor_slices",
    "test_empty_slices",
    "test_dice_tumor_mean",
    "test_dice_tumor_std",
    "test_sensitivity_mean",
    "test_sensitivity_std",
    "test_false_alarm_rate_mean",
    "test_false_alarm_rate_std",
    "test_decision_dice_tumor_mean",
    "test_decision_dice_tumor_std",
    "test_decision_sensitivity_mean",
    "test_decision_sensitivity_std",
    "test_decision_false_alarm_rate_mean",
    "test_decision_false_alarm_rate_std",
    "ranked_by",
    "run_dirs",
)

# What each Dice column measures: which split chose the checkpoint, which split scored it.
DICE_COLUMNS = {
    "test/dice": "test Dice: best.ckpt (chosen on validation) scored on the held-out test split",
    "last_val_dice": "last val Dice: the final epoch on the validation split (not chosen by its score)",
    "best_val_dice": "best val Dice: val Dice at the epoch that chose best.ckpt (its monitor: val/dice, the maximum, "
    "by default), on that same validation split, so an optimistic score",
}
SHORT_NAMES = {"test/dice": "test Dice", "last_val_dice": "last val Dice", "best_val_dice": "best val Dice"}
# Slice-level scores of training runs (metrics.json of train): column stem -> (key, slice group it needs).
SLICE_GROUPS = {"dice_tumor": "tumor_slices", "sensitivity": "tumor_slices", "false_alarm_rate": "empty_slices"}
SLICE_NOTES = {"tumor_slices": "n/a (no tumor slices)", "empty_slices": "n/a (no empty slices)"}
# The same scores of the test split with the slice decision calibrated after training (train's test_with_decision,
# evaluate's layout): column stem -> keys into it.
DECISION_TEST = "test_with_decision"
DECISION_SCORES = {"dice_tumor": ("tumor_slices", "dice", "mean"), "sensitivity": ("tumor_slices", "sensitivity"),
                   "false_alarm_rate": ("empty_slices", "false_alarm_rate")}

# The cross-dataset table (experiment=cross_dataset): one row per configuration and evaluation.
CROSS_COLUMNS = (
    "config",
    "trained_on",
    "role",
    "dataset",
    "split",
    "chose_checkpoint",
    "runs",
    "tumor_slices",
    "empty_slices",
    "tumor_dice_mean",
    "tumor_dice_std",
    "sensitivity_mean",
    "sensitivity_std",
    "false_alarm_rate_mean",
    "false_alarm_rate_std",
    "all_slices_dice_mean",
    "all_slices_dice_std",
    "slice_decision",
)
# Where each score of an evaluation row (metrics.json ``cross_dataset.evaluations``) is.
CROSS_SCORES = {
    "tumor_dice": ("tumor_slices", "dice", "mean"),
    "sensitivity": ("tumor_slices", "sensitivity"),
    "false_alarm_rate": ("empty_slices", "false_alarm_rate"),
    "all_slices_dice": ("all_slices_dice",),
}


@dataclass
class Run:
    """One training run: its directory, ``metrics.json`` and (unresolved) Hydra config."""

    directory: Path
    metrics: dict[str, Any]
    config: DictConfig | None
    overrides: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """Config value at dotted ``key``, interpolations resolved where possible."""
        if self.config is None:
            return default
        try:
            value = OmegaConf.select(self.config, key, default=default, throw_on_resolution_failure=True)
        except InterpolationResolutionError:  # e.g. ${hydra:...} outside a Hydra app
            value = OmegaConf.select(self.config, key, default=default, throw_on_resolution_failure=False)
        if isinstance(value, DictConfig):
            return OmegaConf.to_container(value, resolve=False)
        return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value

    def model_name(self) -> str | None:
        """The network's name: ``model.net.name``, ``model.name`` in runs made before the module/network
        split of the model config, else metrics.json's ``model``."""
        return self.get("model.net.name") or self.get("model.name") or self.metrics.get("model")

    def holds_out_test_fold(self) -> bool | None:
        """Whether the run held out a test fold (``data.test_fold`` set); None without a config."""
        return None if self.config is None else self.get("data.test_fold") is not None

    def identity(self) -> str:
        """A canonical string of the configuration, without :data:`IGNORED_KEYS`, but with whether it held out a test
        fold (``data.test_fold`` null or not): that changes what it trained on and what it reports."""
        if self.config is None:
            return f"<no config> {self.directory}"
        config = OmegaConf.to_container(self.config, resolve=False)
        held_out = self.holds_out_test_fold()
        for key in IGNORED_KEYS:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node.get(parent) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
        return json.dumps({"config": config, "test_fold_held_out": held_out}, sort_keys=True, default=str)


@dataclass
class ConfigurationRow:
    """Runs of one configuration and their aggregated numbers."""

    runs: list[Run]
    label: str = ""

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self, metric: str) -> list[float]:
        """Finite values of ``metric`` over the runs (``test/...`` keys read the test dict; ``test_with_decision/NAME``
        the :data:`DECISION_SCORES` of NAME)."""
        found = []
        for run in self.runs:
            if metric.startswith(f"{DECISION_TEST}/"):
                value = run.metrics.get(DECISION_TEST)
                for key in DECISION_SCORES[metric.split("/", 1)[1]]:
                    value = value.get(key) if isinstance(value, dict) else None
            else:
                value = ((run.metrics.get("test") or {}) if metric.startswith("test/") else run.metrics).get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found.append(value)
        return found

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (None with fewer than two values)."""
        return _aggregate(self.values(metric))

    def dataset(self) -> str | None:
        """The training dataset's name(s): metrics.json's ``dataset``, else the config's ``data.name``."""
        names = {run.metrics.get("dataset") or run.get("data.name") for run in self.runs}
        return ", ".join(sorted(str(name) for name in names if name)) or None

    def split(self) -> str | None:
        """How the runs split their data (``folds``, ``patients``, ``slices (leaky)``), from metrics.json."""
        methods = set()
        for run in self.runs:
            split = run.metrics.get("split") or {}
            if split.get("method"):
                methods.add(split["method"] + (" (leaky)" if split.get("leaky") else ""))
        return ", ".join(sorted(methods)) or None

    def fields(self) -> dict[str, Any]:
        """The row as plain values (CSV columns except rank and ranked_by)."""
        run = self.first
        target = lambda key: (str(run.get(f"{key}._target_") or "").rsplit(".", 1)[-1] or None)
        loss = target("loss")
        if loss == "WeightedLossSum":  # name the terms, e.g. DiceLoss+FocalLoss
            loss = "+".join(target(f"loss.terms.{name}") or name for name in run.get("loss.terms", {}))
        row: dict[str, Any] = {
            "config": self.label,
            "model": run.model_name(),
            "loss": loss,
            "optimizer": target("optimizer"),
            "lr": run.get("optimizer.lr"),
            "image_size": run.get("data.image_size"),
            "precision": run.metrics.get("precision") or run.get("trainer.precision"),  # what ran, else what was set
            "num_params": run.metrics.get("num_params"),
            "dataset": self.dataset(),
            "runs": len(self.runs),
            "split": self.split(),
            "test_runs": len(self.values("test/dice")),
            "run_dirs": " ".join(str(r.directory) for r in self.runs),
        }
        sources = [run.metrics for run in self.runs]
        for split in ("val", "test"):
            for group in ("tumor_slices", "empty_slices"):
                row[f"{split}_{group}"] = _count(sources, (f"{split}_slices", group))
        for name in SLICE_GROUPS:
            row[f"last_val_{name}_mean"], row[f"last_val_{name}_std"] = self.mean_std(f"last_val_{name}")
            row[f"test_{name}_mean"], row[f"test_{name}_std"] = self.mean_std(f"test/{name}")
            row[f"test_decision_{name}_mean"], row[f"test_decision_{name}_std"] = self.mean_std(f"{DECISION_TEST}/{name}")
        for column, metric in (
            ("epochs", "epochs_trained"),
            ("train_time_s", "train_time_s"),
            ("best_val_dice", "best_val_dice"),
            ("last_val_dice", "last_val_dice"),
            ("test_dice", "test/dice"),
            ("test_iou", "test/iou"),
        ):
            row[f"{column}_mean"], row[f"{column}_std"] = self.mean_std(metric)
        return row


def _aggregate(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean (None without values) and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    mean = values[0] if len(values) == 1 else statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def find_runs(directories: Sequence[str | Path]) -> list[Run]:
    """Every run below ``directories`` (recursively), each once, in path order.

    Raises:
        ConfigError: a directory does not exist. BtsError: no ``metrics.json`` is found under any of them.
    """
    missing = [str(d) for d in directories if not Path(d).is_dir()]
    if missing:
        verb = "is not a folder" if len(missing) == 1 else "are not folders"
        raise ConfigError(f"dirs: {', '.join(missing)} {verb}; give the folders holding the training runs "
                          "to compare, e.g. dirs=logs/train or dirs='[logs/train/multiruns/DATE,runs_elsewhere]'.")
    seen: set[Path] = set()
    checkpoints: dict[str, Path] = {}  # best_checkpoint (else the metrics.json bytes) -> the run that had it first
    runs: list[Run] = []
    others, debug = 0, 0
    for directory in directories:
        for metrics_path in sorted(Path(directory).rglob("metrics.json")):
            if metrics_path.resolve() in seen:
                continue
            seen.add(metrics_path.resolve())
            run = _load_run(metrics_path)
            if run == "other":
                others += 1  # e.g. bts_lightning.evaluate runs, which also write metrics.json
            elif isinstance(run, Run) and run.get("trainer.fast_dev_run"):
                debug += 1  # one batch of each split, no best.ckpt: a smoke test, not a result
            elif isinstance(run, Run) and (first := checkpoints.get(_copy_key(run, metrics_path))):
                _warn(f"skipped {run.directory}: a copy of {first} (the same "
                      f"{'best_checkpoint' if run.metrics.get('best_checkpoint') else 'metrics.json'}); a copy is not "
                      "a repeat")
            elif run is not None:
                checkpoints[_copy_key(run, metrics_path)] = run.directory
                runs.append(run)
    unfinished = unfinished_runs(directories)
    resumable = [path for path in unfinished if (path / "checkpoints" / "last.ckpt").is_file()]
    if resumable:
        print(f"note: {len(resumable)} training run(s) without metrics.json (killed, crashed or still running) are "
              f"not in the report: {format_names([str(path) for path in resumable], 5)}; a killed run finishes with "
              "python -m bts_lightning.train <its overrides> hydra.run.dir=RUN ckpt_path=last", file=sys.stderr)
    if stopped := [path for path in unfinished if path not in resumable]:
        print(f"note: {len(stopped)} training run(s) without metrics.json or a checkpoint (refused by a check, stopped "
              f"before their first epoch ended, or still in it) are not in the report: "
              f"{format_names([str(path) for path in stopped], 5)}; each run's train.log says why; run it again",
              file=sys.stderr)
    if others:
        print(f"note: skipped {others} metrics.json not written by training (evaluate runs or others)", file=sys.stderr)
    if debug:
        print(f"note: skipped {debug} debug=fast_dev_run run(s): one batch per split, no best.ckpt, not a result",
              file=sys.stderr)
    if not runs:
        raise BtsError(
            f"No runs found under {', '.join(str(d) for d in directories)}: expected run directories "
            "with metrics.json and .hydra/config.yaml (written by python -m bts_lightning.train)"
            + (" when they finish; the unfinished ones are noted above." if unfinished else ".")
        )
    return runs


def _copy_key(run: Run, metrics_path: Path) -> str:
    """What a copy of ``run``'s folder shares with it: its ``best_checkpoint``, else (no checkpoint callback) the
    bytes of its ``metrics.json`` (two trainings never write the same: ``train_time_s``, histories)."""
    best = run.metrics.get("best_checkpoint")
    return f"checkpoint:{best}" if best else f"metrics:{file_sha256(metrics_path)}"


# A run's .hydra/config.yaml line naming the train app (evaluate, calibrate, ... runs have their own).
_TRAIN_TASK = re.compile(r"^task_name: train$", re.MULTILINE)


def unfinished_runs(directories: Sequence[str | Path]) -> list[Path]:
    """Training-run folders below ``directories`` (a ``.hydra/config.yaml`` of ``task_name: train``) without a
    ``metrics.json``: killed, crashed, refused or still running (those with ``checkpoints/last.ckpt`` can resume)."""
    found = set()
    for directory in directories:
        for config in Path(directory).rglob(".hydra/config.yaml"):
            run = config.parent.parent
            with suppress(OSError):
                if not (run / "metrics.json").exists() and _TRAIN_TASK.search(config.read_text()):
                    found.add(run)
    return sorted(found)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _load_run(metrics_path: Path) -> Run | str | None:
    """The run of ``metrics_path``; None when unreadable, ``"other"`` when not written by training."""
    directory = metrics_path.parent
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as error:
        _warn(f"skipped {metrics_path}: unreadable ({error})")
        return None
    if not isinstance(metrics, dict):
        _warn(f"skipped {metrics_path}: unreadable (not a JSON object)")
        return None
    if "best_val_dice" not in metrics:
        return "other"
    config_path = directory / ".hydra" / "config.yaml"
    config = overrides = None
    if config_path.is_file():
        try:
            config = OmegaConf.load(config_path)
        except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:  # unreadable, malformed YAML
            _warn(f"{config_path} is unreadable ({error}); run {directory} is reported on its own")
    else:
        _warn(f"{directory} has no .hydra/config.yaml; it is reported on its own")
    overrides_path = directory / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        try:
            overrides = [str(item) for item in OmegaConf.load(overrides_path)]
        except (OSError, yaml.YAMLError, OmegaConfBaseException):
            overrides = None
    run = Run(directory, metrics, config if isinstance(config, DictConfig) else None, overrides or [])
    return "other" if run.get("task_name", "train") != "train" else run


def ranking_metric(rows: Sequence[ConfigurationRow]) -> str:
    """What ranks the configurations: the held-out test Dice when every run has one, else
    :func:`validation_metric`. Rows without a value of it are listed last, unranked (:func:`unranked`)."""
    if all(len(row.values("test/dice")) == len(row.runs) for row in rows):
        return "test/dice"
    return validation_metric(rows)


def validation_metric(rows: Sequence[ConfigurationRow]) -> str:
    """The last-epoch validation Dice, unless some run has a best validation Dice but no last one (written before
    ``metrics.json`` recorded it): then the best, the only one they share (optimistic: chosen on that split)."""
    if all(len(row.values("last_val_dice")) >= len(row.values("best_val_dice")) for row in rows):
        return "last_val_dice"
    return "best_val_dice"


def unranked(rows: Sequence[ConfigurationRow]) -> list[ConfigurationRow]:
    """The rows with no value of :func:`ranking_metric` in any run (e.g. trained with ``callbacks=none``, which
    records no validation Dice, among runs without a test split)."""
    metric = ranking_metric(rows)
    return [row for row in rows if not row.values(metric)]


def group_runs(runs: Iterable[Run]) -> list[ConfigurationRow]:
    """One row per configuration, labelled, sorted by :func:`ranking_metric` (mean over runs, best first)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.identity(), []).append(run)
    rows = [ConfigurationRow(members) for members in groups.values()]
    _label(rows)
    metric = ranking_metric(rows)

    def sort_key(row: ConfigurationRow) -> tuple[float, str]:
        mean = row.mean_std(metric)[0]
        return (-mean if mean is not None else math.inf, row.label)

    rows = sorted(rows, key=sort_key)
    for row in unranked(rows):
        _warn(f"{row.label}: no {SHORT_NAMES[metric]} (e.g. trained with callbacks=none, which records no validation "
              "Dice), so it is listed last, unranked")
    return rows


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _shown_override(override: str) -> bool:
    key = _override_key(override)
    if key.startswith(_IGNORED_OVERRIDE_PREFIXES):
        return False
    return not any(key == ignored or key.startswith(f"{ignored}.") for ignored in IGNORED_KEYS)


def _label(rows: list[ConfigurationRow]) -> None:
    """Name each row by the command-line overrides that set it apart from the other rows."""
    override_sets = [[o for o in row.first.overrides if _shown_override(o)] for row in rows]
    common = set.intersection(*(set(s) for s in override_sets)) if len(rows) > 1 else set(override_sets[0])
    for row, overrides in zip(rows, override_sets):
        distinct = [o for o in overrides if o not in common]
        model = row.first.model_name() or "run"
        row.label = ", ".join(distinct) if distinct else str(model)
    if len({row.first.holds_out_test_fold() for row in rows}) > 1:  # another configuration (Run.identity): say which
        for row in rows:
            row.label += " (test fold held out)" if row.first.holds_out_test_fold() else " (no test fold)"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    numbered: dict[str, int] = {}
    for row in rows:
        if counts[row.label] > 1:  # same overrides, different configs (e.g. loose runs): number them
            numbered[row.label] = numbered.get(row.label, 0) + 1
            row.label = f"{row.label} #{numbered[row.label]}"


def _score(evaluation: dict[str, Any], path: Sequence[str]) -> float | None:
    """The finite number at ``path`` in an evaluation row, else None (e.g. no false-alarm rate without empty slices)."""
    value: Any = evaluation
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if finite else None


def _count(sources: Sequence[dict[str, Any]], path: Sequence[str]) -> int | str | None:
    """The slice count at ``path`` (e.g. ``("tumor_slices", "n")``): one number, or ``low-high`` across runs."""
    counts = sorted({n for source in sources if isinstance(n := _score(source, path), int)})
    if not counts:
        return None
    return counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def cross_dataset_rows(rows: Sequence[ConfigurationRow]) -> list[dict[str, Any]]:
    """The cross-dataset table (:data:`CROSS_COLUMNS`): per configuration (in ``rows``' order), one row per
    evaluation of its ``experiment=cross_dataset`` runs (metrics.json ``cross_dataset.evaluations``: in domain,
    then cross-dataset), each score's mean and sample std over the runs, and ``slice_decision``: the runs' distinct
    notes on where their slice decision was calibrated (``None`` without one); empty when no run has them."""
    table = []
    for row in rows:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        trained_on: set[str] = set()
        for run in row.runs:
            cross = run.metrics.get("cross_dataset")
            evaluations = cross.get("evaluations") if isinstance(cross, dict) else None
            for evaluation in evaluations if isinstance(evaluations, list) else []:
                if isinstance(evaluation, dict):
                    key = tuple(evaluation.get(k) for k in ("role", "dataset", "split", "chose_checkpoint"))
                    groups.setdefault(key, []).append(evaluation)
                    trained_on.add(str(cross.get("trained_on")))
        for (role, dataset, split, chose), evaluations in groups.items():
            entry = {"config": row.label, "trained_on": ", ".join(sorted(trained_on)), "role": role,
                     "dataset": dataset, "split": split, "chose_checkpoint": bool(chose), "runs": len(evaluations),
                     "tumor_slices": _count(evaluations, ("tumor_slices", "n")),
                     "empty_slices": _count(evaluations, ("empty_slices", "n"))}
            for name, path in CROSS_SCORES.items():
                scores = [score for e in evaluations if (score := _score(e, path)) is not None]
                entry[f"{name}_mean"], entry[f"{name}_std"] = _aggregate(scores)
            notes = sorted({str(note) for e in evaluations if (note := e.get("decision_note"))})
            entry["slice_decision"] = " / ".join(notes) or None
            table.append(entry)
    return table


# ---------------------------------------------------------------------------------------- writing


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_std(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _params(count: Any) -> str:
    if not isinstance(count, (int, float)):
        return "–"
    return f"{count / 1e6:.2f} M" if count >= 1e5 else f"{count / 1e3:.1f} k"


def _duration(seconds: float | None, std: float | None) -> str:
    if seconds is None:
        return "–"

    def one(value: float) -> str:
        if value < 120:
            return f"{value:.1f} s"
        if value < 7200:
            return f"{value / 60:.1f} min"
        return f"{value / 3600:.2f} h"

    return f"{one(seconds)} ± {one(std)}" if std is not None else one(seconds)


def _slice_score(fields: dict[str, Any], name: str) -> str:
    """The last validation epoch's ``name`` (:data:`SLICE_GROUPS`) as mean ± std; ``n/a (...)`` when the
    validation split of every run had no slice of the group it needs, ``–`` when unknown (older runs)."""
    mean = fields[f"last_val_{name}_mean"]
    if mean is None and fields[f"val_{SLICE_GROUPS[name]}"] == 0:
        return SLICE_NOTES[SLICE_GROUPS[name]]
    return _mean_std(mean, fields[f"last_val_{name}_std"])


def write_csv(rows: Sequence[ConfigurationRow], path: Path) -> None:
    """Full-precision numbers (a single run's values exactly as in its metrics.json); all or nothing."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        ranked_by, left_out = ranking_metric(rows), unranked(rows)
        for rank, row in enumerate(rows, start=1):
            values = {"rank": None if row in left_out else rank, **row.fields(), "ranked_by": ranked_by}
            writer.writerow({k: "" if values.get(k) is None else values[k] for k in CSV_COLUMNS})


def render_markdown(rows: Sequence[ConfigurationRow], directories: Sequence[str | Path], chart: str | None) -> str:
    """The report as Markdown: summary, table, chart and the run directories of each row."""
    n_runs = sum(len(row.runs) for row in rows)
    repeated = any(len(row.runs) > 1 for row in rows)
    lines = [
        "# Training runs compared",
        "",
        (f"{n_runs} run{'s' * (n_runs != 1)} in {len(rows)} configuration{'s' * (len(rows) != 1)}, "
         f"from {', '.join(f'`{d}`' for d in directories)}. Ranked by {DICE_COLUMNS[ranking_metric(rows)]} "
         "(mean over runs)."),
        "",
        "Which split chose and which split scored:",
        *(f"- {text}." for text in DICE_COLUMNS.values()),
        ("- val tumor-slice Dice, val sensitivity, val false-alarm rate: the last epoch on the validation split, "
         "Dice over slices with a tumor, share of them with any predicted tumor pixel, share of empty slices with one "
         "(n/a without such slices)."),
    ]
    leaky = [row.label for row in rows if "leaky" in (row.split() or "")]
    if leaky:
        warning = (f"**Warning:** {', '.join(leaky)} split slices, not patients (`data.split_by=slice`): one "
                   "patient's slices can be in training and validation/test, so their scores are optimistic.")
        lines += ["", warning]
    final = [row.label for row in rows if any("selection" in run.metrics and run.metrics.get("test")
                                              and (run.metrics["selection"] or {}).get("chosen_on") is None
                                              for run in row.runs)]
    if final:
        lines += ["", (f"**Note:** the test Dice of {', '.join(final)} scores the final weights: no checkpoint callback "
                      "chose a best epoch (`callbacks=none`).")]
    datasets = {row.dataset() for row in rows if row.dataset()}
    if len(datasets) > 1:
        lines += ["", (f"**Note:** these configurations were trained on different datasets ({', '.join(sorted(datasets))})"
                      ": the ranking puts their scores side by side, but compare within a dataset.")]
    if repeated:
        lines.append(
            "Runs that differ only in seed, `data.val_fold`/`data.test_fold` (not its presence) or paths are one "
            "configuration: "
            "numbers are mean ± sample standard deviation over them."
        )
    header = ["#", "configuration", "model", "loss", "optimizer", "lr", "image size", "precision", "params",
              "dataset", "split", "runs", "epochs", "training time", "best val Dice", "last val Dice", "val tumor-slice Dice", "val sensitivity",
              "val false-alarm rate", "test Dice"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    ranked_by, left_out = ranking_metric(rows), unranked(rows)
    for rank, row in enumerate(rows, start=1):
        f = row.fields()
        dice = {metric: _mean_std(f[f"{column}_mean"], f[f"{column}_std"])
                for metric, column in (("best_val_dice", "best_val_dice"), ("last_val_dice", "last_val_dice"),
                                       ("test/dice", "test_dice"))}
        dice[ranked_by] = f"**{dice[ranked_by]}**"
        test = dice["test/dice"]
        if f["test_runs"] and f["test_runs"] != f["runs"]:
            test += f" ({f['test_runs']} of {f['runs']})"
        cells = [
            "–" if row in left_out else str(rank),
            f["config"].replace("|", "\\|"),
            _number(f["model"]),
            _number(f["loss"]),
            _number(f["optimizer"]),
            _number(f["lr"]) if not isinstance(f["lr"], float) else f"{f['lr']:g}",
            _number(f["image_size"]),
            _number(f["precision"]),
            _params(f["num_params"]),
            _number(f["dataset"]),
            _number(f["split"]),
            str(f["runs"]),
            _mean_std(f["epochs_mean"], f["epochs_std"], 1) if f["epochs_std"] else _number(f["epochs_mean"], 0),
            _duration(f["train_time_s_mean"], f["train_time_s_std"]),
            dice["best_val_dice"],
            dice["last_val_dice"],
            *(_slice_score(f, name) for name in SLICE_GROUPS),
            test,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", (f"Unranked (–), listed last: {', '.join(row.label for row in left_out)}: no "
                       f"{SHORT_NAMES[ranked_by]} (e.g. trained with callbacks=none, which records no validation Dice).")]
    if chart:
        lines += ["", f"![Dice per configuration]({chart})"]
    lines += decision_test_markdown(rows)
    lines += cross_dataset_markdown(cross_dataset_rows(rows))
    lines += ["", "## Runs", ""]
    for rank, row in enumerate(rows, start=1):
        dirs = ", ".join(f"`{r.directory}`" for r in row.runs)
        lines.append(f"- (unranked) {row.label}: {dirs}" if row in left_out else f"{rank}. {row.label}: {dirs}")
    return "\n".join(lines) + "\n"


def decision_test_markdown(rows: Sequence[ConfigurationRow]) -> list[str]:
    """The ``Test split with the calibrated slice decision`` section of report.md: for each configuration whose
    runs scored their test split with the decision calibrated on val (train's ``test_with_decision``), the
    tumor-slice Dice, sensitivity and false-alarm rate against the same scores without it. No lines when no
    run has one."""
    table = []
    for rank, row in enumerate(rows, start=1):
        f = row.fields()
        with_decision = [f"test_decision_{name}_mean" for name in SLICE_GROUPS]
        if all(f[column] is None for column in with_decision):
            continue
        runs = len(row.values(f"{DECISION_TEST}/dice_tumor") or row.values(f"{DECISION_TEST}/false_alarm_rate"))
        cells = [str(rank), f["config"].replace("|", "\\|"), f"{runs} of {f['runs']}",
                 f"{_number(f['test_tumor_slices'])} / {_number(f['test_empty_slices'])}"]
        for name in SLICE_GROUPS:
            cells += [_mean_std(f[f"test_{name}_mean"], f[f"test_{name}_std"]),
                      _mean_std(f[f"test_decision_{name}_mean"], f[f"test_decision_{name}_std"])]
        table.append("| " + " | ".join(cells) + " |")
    if not table:
        return []
    header = ["#", "configuration", "runs", "test slices (tumor / empty)", "tumor-slice Dice", "with the decision",
              "sensitivity", "with the decision", "false-alarm rate", "with the decision"]
    return ["", "## Test split with the calibrated slice decision", "",
            ("The held-out test split of the runs trained with `decision.target_false_alarm_rate`: the network's own "
             "masks, then with the slice decision calibrated on the validation split after training "
             "(`metrics.json`'s `test_with_decision`), so neither is chosen on the split it scores."),
            "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|", *table]


def _slices(entry: dict[str, Any]) -> str:
    return f"{_number(entry['tumor_slices'])} / {_number(entry['empty_slices'])}"


def cross_dataset_markdown(table: Sequence[dict[str, Any]]) -> list[str]:
    """The ``In-domain and cross-dataset`` section of report.md (no lines for an empty table)."""
    if not table:
        return []
    intro = ("Runs of `experiment=cross_dataset`: the model scored in domain (its training data's test split, else "
             "val) and on every slice of a second dataset, by the evaluate app. **Tumor-slice Dice**: mean over slices "
             "whose truth has a tumor; **sensitivity**: share of them with any predicted tumor pixel; **false-alarm "
             "rate**: share of empty-truth slices with any predicted tumor pixel (– without empty slices); **all-slice "
             "Dice**: mean over every slice, an empty slice left empty scoring 1. Mean ± sample std over a "
             "configuration's runs. **Slice decision**: where the model's calibrated decision (applied to these "
             "scores) was chosen, as evaluate says it; – without one.")
    header = ["configuration", "trained on", "evaluated on", "split", "role", "slices (tumor / empty)",
              "tumor-slice Dice", "sensitivity", "false-alarm rate", "all-slice Dice", "slice decision"]
    lines = ["", "## In-domain and cross-dataset", "", intro, "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * len(header)) + "|"]
    for entry in table:
        split = f"{entry['split']} (chose the checkpoint: optimistic)" if entry["chose_checkpoint"] else entry["split"]
        scores = [_mean_std(entry[f"{name}_mean"], entry[f"{name}_std"]) for name in CROSS_SCORES]
        cells = [str(entry["config"]).replace("|", "\\|"), _number(entry["trained_on"]), _number(entry["dataset"]),
                 _number(split), _number(entry["role"]), _slices(entry), *scores,
                 _number(entry["slice_decision"]).replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_cross_csv(table: Sequence[dict[str, Any]], path: Path) -> None:
    """The cross-dataset table with full-precision numbers (:data:`CROSS_COLUMNS`); all or nothing."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CROSS_COLUMNS)
        writer.writeheader()
        for entry in table:
            writer.writerow({k: "" if entry.get(k) is None else entry[k] for k in CROSS_COLUMNS})


def _bars(rows: Sequence[ConfigurationRow], metric: str, name: str, color: str) -> BarSeries:
    """``metric``'s mean (NaN where missing) and std (0 for a single run) per row, as a chart series."""
    means, stds = [], []
    for row in rows:
        mean, std = row.mean_std(metric)
        means.append(math.nan if mean is None else mean)
        stds.append(0.0 if std is None else std)
    return BarSeries(name, means, stds, color)


def plot(rows: Sequence[ConfigurationRow], path: Path) -> bool:
    """Write ``path``: bars of validation Dice (:func:`validation_metric`) and test Dice
    (mean, std error bars) per configuration, in ranking order (:func:`~bts_lightning.visualize.score_bar_chart`).

    Rendered in memory, then written all or nothing. Returns False (after a warning) when
    matplotlib is not installed.
    """
    val_metric = validation_metric(rows)
    series = [_bars(rows, val_metric, SHORT_NAMES[val_metric], "#1f77b4")]
    test = _bars(rows, "test/dice", "test Dice (best checkpoint)", "#ff7f0e")
    if any(not math.isnan(mean) for mean in test.means):
        series.append(test)
    labels = [f"{row.label}  (n={len(row.runs)})" if len(row.runs) > 1 else row.label for row in rows]
    spread_note = " (mean ± std over runs)" if any(len(row.runs) > 1 for row in rows) else ""
    title = f"Configurations by {SHORT_NAMES[ranking_metric(rows)]}{spread_note}"
    try:
        image = score_bar_chart(labels, series, title, xlabel="Dice (tumor, mean over images)")
    except ImportError:
        _warn(f"matplotlib is not installed, so {path.name} was not written (pip install matplotlib)")
        return False
    write_bytes_atomic(path, image)
    return True


def report(directories: Sequence[str | Path], out: str | Path | None = None) -> list[ConfigurationRow]:
    """Find, group and write ``report.md``, ``report.csv``, ``report.png`` (and ``cross_dataset.csv`` when runs
    of ``experiment=cross_dataset`` are among them); returns the rows.

    Each file is replaced all or nothing; an unwritable ``out`` or a full disk raises
    :class:`~bts_lightning.errors.OutputError`. A ``cross_dataset.csv`` or ``report.png`` of an earlier report in
    ``out`` that this one does not write (no cross-dataset run now; matplotlib missing) is removed: it would describe
    other runs than the new ``report.md``.
    """
    rows = group_runs(find_runs(directories))
    out_dir = Path(out) if out is not None else Path(directories[0])
    make_directory(out_dir, "out")
    write_csv(rows, out_dir / "report.csv")
    cross = cross_dataset_rows(rows)
    if cross:
        write_cross_csv(cross, out_dir / CROSS_FILE)
    chart = "report.png" if plot(rows, out_dir / "report.png") else None
    write_bytes_atomic(out_dir / "report.md", render_markdown(rows, directories, chart).encode())
    for name, written in ((CROSS_FILE, bool(cross)), ("report.png", chart is not None)):
        if not written and (out_dir / name).is_file():
            (out_dir / name).unlink()
            _warn(f"removed {out_dir / name}, an earlier report's, which this report does not replace")
    return rows


def _directories(cfg: DictConfig) -> list[Path]:
    """``cfg.dirs`` as folders: one path or a list of them (ConfigError naming the setting otherwise)."""
    value = cfg.get("dirs")
    items = list(value) if OmegaConf.is_list(value) else [value]
    if not [item for item in items if item not in (None, "")]:
        raise ConfigError(f"dirs is required: {USAGE}")
    return [as_path("dirs", item) for item in items]


def report_app(cfg: DictConfig) -> list[ConfigurationRow]:
    """The ``bts-report`` app (``conf/report.yaml``): write the report of the runs under ``cfg.dirs`` to
    ``cfg.out`` (default: the first of them), print the ranking and the files written; returns the rows."""
    directories = _directories(cfg)
    out_dir = path_setting(cfg, "out") or directories[0]
    rows = report(directories, out_dir)
    ranked_by, left_out = ranking_metric(rows), unranked(rows)
    print(f"Ranked by {SHORT_NAMES[ranked_by]}")
    for rank, row in enumerate(rows, start=1):
        mean, std = row.mean_std(ranked_by)
        place = "  -" if row in left_out else f"{rank:>3}"
        print(f"{place}. {_mean_std(mean, std)}  {row.label}  ({len(row.runs)} run{'s' * (len(row.runs) != 1)})")
    cross = cross_dataset_rows(rows)
    if cross:
        print("In-domain and cross-dataset: tumor-slice Dice / false-alarm rate / all-slice Dice")
        for entry in cross:
            scores = " / ".join(_number(entry[f"{name}_mean"]) for name in ("tumor_dice", "false_alarm_rate",
                                                                              "all_slices_dice"))
            print(f"  {entry['config']}: {entry['trained_on']} -> {entry['dataset']} {entry['split']} "
                  f"({entry['role']}): {scores}")
    written = [name for name in (*REPORT_FILES, CROSS_FILE) if (out_dir / name).is_file()]  # stale ones are removed
    print(f"Wrote {', '.join(str(out_dir / name) for name in written)}")
    return rows


main = hydra_app("report", report_app)

if __name__ == "__main__":
    main()
