"""Compare training runs: ``python -m bts_lightning.report dirs=DIR [out=DIR]`` (or ``bts-report``).

A Hydra app (``conf/report.yaml``); several folders: ``dirs='[DIR,DIR]'``.

Finds every run (a directory with ``metrics.json`` and ``.hydra/config.yaml``) under the given
directories, groups runs that share a configuration (everything except the seeds, the validation
and test folds and where files live), and writes ``report.md``, ``report.csv`` and ``report.png``:
one row per configuration, mean ± sample std over its runs, ranked by the held-out test Dice when
every run has one (else by the last-epoch validation Dice): the best validation Dice is picked on
the split it is measured on, so it is shown but never ranks.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from bts_lightning.errors import BtsError, ConfigError
from bts_lightning.runtime import as_path, atomic_path, hydra_app, make_directory, path_setting, write_bytes_atomic
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
    "runs",
    "epochs_mean",
    "epochs_std",
    "train_time_s_mean",
    "train_time_s_std",
    "best_val_dice_mean",
    "best_val_dice_std",
    "last_val_dice_mean",
    "last_val_dice_std",
    "split",
    "test_runs",
    "test_dice_mean",
    "test_dice_std",
    "test_iou_mean",
    "test_iou_std",
    "ranked_by",
    "run_dirs",
)

# What each Dice column measures: which split chose the checkpoint, which split scored it.
DICE_COLUMNS = {
    "test/dice": "test Dice: best.ckpt (chosen on validation) scored on the held-out test split",
    "last_val_dice": "last val Dice: the final epoch on the validation split (not chosen by its score)",
    "best_val_dice": "best val Dice: the maximum over epochs on the validation split that also chose best.ckpt, "
    "so an optimistic score",
}
SHORT_NAMES = {"test/dice": "test Dice", "last_val_dice": "last val Dice", "best_val_dice": "best val Dice"}


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

    def identity(self) -> str:
        """A canonical string of the configuration, without :data:`IGNORED_KEYS`."""
        if self.config is None:
            return f"<no config> {self.directory}"
        config = OmegaConf.to_container(self.config, resolve=False)
        for key in IGNORED_KEYS:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node.get(parent) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
        return json.dumps(config, sort_keys=True, default=str)


@dataclass
class ConfigurationRow:
    """Runs of one configuration and their aggregated numbers."""

    runs: list[Run]
    label: str = ""

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self, metric: str) -> list[float]:
        """Finite values of ``metric`` over the runs (``test/...`` keys read the test dict)."""
        found = []
        for run in self.runs:
            source = (run.metrics.get("test") or {}) if metric.startswith("test/") else run.metrics
            value = source.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found.append(value)
        return found

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (None with fewer than two values)."""
        values = self.values(metric)
        if not values:
            return None, None
        mean = values[0] if len(values) == 1 else statistics.fmean(values)
        return mean, statistics.stdev(values) if len(values) > 1 else None

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
            "precision": run.get("trainer.precision"),
            "num_params": run.metrics.get("num_params"),
            "runs": len(self.runs),
            "split": self.split(),
            "test_runs": len(self.values("test/dice")),
            "run_dirs": " ".join(str(r.directory) for r in self.runs),
        }
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


def find_runs(directories: Sequence[str | Path]) -> list[Run]:
    """Every run below ``directories`` (recursively), each once, in path order.

    Raises:
        BtsError: a directory does not exist, or no ``metrics.json`` is found under any of them.
    """
    missing = [str(d) for d in directories if not Path(d).is_dir()]
    if missing:
        raise BtsError(f"Not a directory: {', '.join(missing)}.")
    seen: set[Path] = set()
    runs: list[Run] = []
    others = 0
    for directory in directories:
        for metrics_path in sorted(Path(directory).rglob("metrics.json")):
            if metrics_path.resolve() in seen:
                continue
            seen.add(metrics_path.resolve())
            run = _load_run(metrics_path)
            if run == "other":
                others += 1  # e.g. bts_lightning.evaluate runs, which also write metrics.json
            elif run is not None:
                runs.append(run)
    if others:
        print(f"note: skipped {others} metrics.json not written by training (evaluate runs or others)", file=sys.stderr)
    if not runs:
        raise BtsError(
            f"No runs found under {', '.join(str(d) for d in directories)}: expected run directories "
            "with metrics.json and .hydra/config.yaml (written by python -m bts_lightning.train)."
        )
    return runs


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


def ranking_metric(rows: Sequence[ConfigurationRow], metrics: Sequence[str] = ("test/dice", "last_val_dice")) -> str:
    """What ranks the configurations: the held-out test Dice when every run has one, else the
    last-epoch validation Dice (when every run has it), else the best validation Dice.

    ``metrics``: the candidates, in order of preference, before the best validation Dice.
    """
    for metric in metrics:
        if all(len(row.values(metric)) == len(row.runs) for row in rows):
            return metric
    return "best_val_dice"


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

    return sorted(rows, key=sort_key)


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
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    numbered: dict[str, int] = {}
    for row in rows:
        if counts[row.label] > 1:  # same overrides, different configs (e.g. loose runs): number them
            numbered[row.label] = numbered.get(row.label, 0) + 1
            row.label = f"{row.label} #{numbered[row.label]}"


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


def write_csv(rows: Sequence[ConfigurationRow], path: Path) -> None:
    """Full-precision numbers (a single run's values exactly as in its metrics.json); all or nothing."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        ranked_by = ranking_metric(rows)
        for rank, row in enumerate(rows, start=1):
            values = {"rank": rank, **row.fields(), "ranked_by": ranked_by}
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
    ]
    leaky = [row.label for row in rows if "leaky" in (row.split() or "")]
    if leaky:
        warning = (f"**Warning:** {', '.join(leaky)} split slices, not patients (`data.split_by=slice`): one "
                   "patient's slices can be in training and validation/test, so their scores are optimistic.")
        lines += ["", warning]
    if repeated:
        lines.append(
            "Runs that differ only in seed, `data.val_fold`/`data.test_fold` or paths are one configuration: "
            "numbers are mean ± sample standard deviation over them."
        )
    header = ["#", "configuration", "model", "loss", "optimizer", "lr", "image size", "precision", "params",
              "split", "runs", "epochs", "training time", "best val Dice", "last val Dice", "test Dice"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    ranked_by = ranking_metric(rows)
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
            str(rank),
            f["config"].replace("|", "\\|"),
            _number(f["model"]),
            _number(f["loss"]),
            _number(f["optimizer"]),
            _number(f["lr"]) if not isinstance(f["lr"], float) else f"{f['lr']:g}",
            _number(f["image_size"]),
            _number(f["precision"]),
            _params(f["num_params"]),
            _number(f["split"]),
            str(f["runs"]),
            _mean_std(f["epochs_mean"], f["epochs_std"], 1) if f["epochs_std"] else _number(f["epochs_mean"], 0),
            _duration(f["train_time_s_mean"], f["train_time_s_std"]),
            dice["best_val_dice"],
            dice["last_val_dice"],
            test,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if chart:
        lines += ["", f"![Dice per configuration]({chart})"]
    lines += ["", "## Runs", ""]
    for rank, row in enumerate(rows, start=1):
        dirs = ", ".join(f"`{r.directory}`" for r in row.runs)
        lines.append(f"{rank}. {row.label}: {dirs}")
    return "\n".join(lines) + "\n"


def _bars(rows: Sequence[ConfigurationRow], metric: str, name: str, color: str) -> BarSeries:
    """``metric``'s mean (NaN where missing) and std (0 for a single run) per row, as a chart series."""
    means, stds = [], []
    for row in rows:
        mean, std = row.mean_std(metric)
        means.append(math.nan if mean is None else mean)
        stds.append(0.0 if std is None else std)
    return BarSeries(name, means, stds, color)


def plot(rows: Sequence[ConfigurationRow], path: Path) -> bool:
    """Write ``path``: bars of validation Dice (last epoch when every run has it, else best) and test Dice
    (mean, std error bars) per configuration, in ranking order (:func:`~bts_lightning.visualize.score_bar_chart`).

    Rendered in memory, then written all or nothing. Returns False (after a warning) when
    matplotlib is not installed.
    """
    val_metric = ranking_metric(rows, ("last_val_dice",))
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
    """Find, group and write ``report.md``, ``report.csv`` and ``report.png``; returns the rows.

    Each file is replaced all or nothing; an unwritable ``out`` or a full disk raises
    :class:`~bts_lightning.errors.OutputError`.
    """
    rows = group_runs(find_runs(directories))
    out_dir = Path(out) if out is not None else Path(directories[0])
    make_directory(out_dir, "out")
    write_csv(rows, out_dir / "report.csv")
    chart = "report.png" if plot(rows, out_dir / "report.png") else None
    write_bytes_atomic(out_dir / "report.md", render_markdown(rows, directories, chart).encode())
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
    ranked_by = ranking_metric(rows)
    print(f"Ranked by {SHORT_NAMES[ranked_by]}")
    for rank, row in enumerate(rows, start=1):
        mean, std = row.mean_std(ranked_by)
        print(f"{rank:>3}. {_mean_std(mean, std)}  {row.label}  ({len(row.runs)} run{'s' * (len(row.runs) != 1)})")
    written = [name for name in REPORT_FILES if (out_dir / name).is_file()]
    print(f"Wrote {', '.join(str(out_dir / name) for name in written)}")
    return rows


main = hydra_app("report", report_app)

if __name__ == "__main__":
    main()
