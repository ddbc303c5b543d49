"""Issue 13's results table from ``benchmarks/accuracy_run.sh``: collect on the machine that trained, tabulate here.

``python -m benchmarks.accuracy_table --collect OUT/runs --out OUT/accuracy.json`` (the script's last step) gathers
every model's training ``metrics.json``, its ``evaluate`` results for ``last.ckpt`` and ``best.ckpt`` on the
validation fold, the exact training command, and the machine (GPU name, torch / Lightning / CUDA versions, date)
into one JSON file, small enough to come back from a GPU lease. ``python -m benchmarks.accuracy_table
OUT/accuracy.json --out results/RESULTS.md`` writes the Markdown table with those facts and commands.

Which numbers are honest: ``last.ckpt`` is the final epoch, not chosen by any score, so its per-image Dice on the
validation fold is the result of the recipe; ``best.ckpt`` was chosen on that same fold by ``val/dice`` and its
numbers are marked as chosen there (optimistic).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any

from bts_lightning.runtime import write_bytes_atomic, write_json_atomic

COLUMNS = ("model", "params (M)", "epochs", "training time (s)", "last.ckpt per-image Dice mean / median",
           "last.ckpt IoU mean", "last.ckpt HD95 mean (px)", "best.ckpt Dice mean / median (chosen on this fold)",
           "best epoch")


def machine() -> dict[str, Any]:
    """Where the runs were made: GPU name, library versions, Python, date (UTC)."""
    import lightning
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(runs: Path, val_fold: int) -> dict[str, Any]:
    """Every model run under ``runs`` (``<model>/`` and ``<model>.command`` as the script writes them), all
    validated on fold ``val_fold``."""
    models = {}
    for command in sorted(runs.glob("*.command")):
        name, run = command.stem, runs / command.stem
        evaluations = {}
        for which in ("last", "best"):
            metrics = _read(run / f"evaluate_{which}" / "metrics.json")
            evaluations[which] = None if metrics is None else {
                key: metrics[key] for key in ("summary", "n_images", "split", "checkpoint", "image_size")}
        models[name] = {"command": command.read_text().strip(), "train": _read(run / "metrics.json"),
                        "evaluate": evaluations}
    if not models:
        raise ValueError(f"{runs} has no <model>.command: run benchmarks/accuracy_run.sh first")
    return {"machine": machine(), "val_fold": val_fold, "models": models}


def _pair(summary: dict[str, Any] | None, key: str) -> str:
    if summary is None:
        return "n/a"
    return f"{summary[key]['mean']:.3f} / {summary[key]['median']:.3f}"


def _mean(summary: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    return "n/a" if summary is None else f"{summary[key]['mean']:.{digits}f}"


def row(name: str, model: dict[str, Any]) -> list[str]:
    """One table row (see :data:`COLUMNS`); ``n/a`` where the run or an evaluation is missing."""
    train = model["train"] or {}
    last = (model["evaluate"].get("last") or {}).get("summary")
    best = (model["evaluate"].get("best") or {}).get("summary")
    params = train.get("num_params")
    time_s = train.get("train_time_s")
    return [name, "n/a" if params is None else f"{params / 1e6:.2f}", str(train.get("epochs_trained", "n/a")),
            "n/a" if time_s is None else f"{time_s:.0f}", _pair(last, "dice"), _mean(last, "iou"),
            _mean(last, "hd95", 1), _pair(best, "dice"), str(train.get("best_epoch", "n/a"))]


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: the machine, the table and every command."""
    facts = results["machine"]
    evaluated = next((scores for model in results["models"].values() for scores in model["evaluate"].values()
                      if scores), None)
    size = "" if evaluated is None else f" ({evaluated['n_images']} slices at {evaluated['image_size']} px)"
    measured = (f"Measured {facts['date']} on {facts['gpu'] or 'no GPU (CPU)'}; torch {facts['torch']} (CUDA "
                f"{facts['cuda']}), Lightning {facts['lightning']}, Python {facts['python']}. Written by "
                "`python -m benchmarks.accuracy_table accuracy.json --out results/RESULTS.md` from the output of "
                "`bash benchmarks/accuracy_run.sh`.")
    scored = (f"Per-image scores on validation fold {results['val_fold']}{size}: patients held out from training, "
              "which used the other three folds. `last.ckpt` (the final epoch) is the recipe's result; `best.ckpt` "
              "was chosen on this same fold by `val/dice`, so its numbers are optimistic.")
    lines = ["# Accuracy on the real data (issue 13)", "", measured, "", scored, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(name, model)) + " |" for name, model in results["models"].items()]
    lines += ["", "Commands:", "", "```bash"]
    lines += [model["command"] for model in results["models"].values()]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="accuracy.json (or, with --collect, the runs folder)")
    parser.add_argument("--collect", action="store_true", help="gather the runs folder into --out (JSON)")
    parser.add_argument("--val-fold", type=int, default=1, help="with --collect: the fold the runs validated on")
    parser.add_argument("--out", type=Path, help="the JSON (--collect) or Markdown file to write")
    args = parser.parse_args()
    if args.collect:
        results = collect(args.source, args.val_fold)
        if args.out:
            write_json_atomic(args.out, results)
        print(json.dumps(results["machine"]))
        return
    text = markdown(json.loads(args.source.read_text()))
    print(text, end="")
    if args.out:
        write_bytes_atomic(args.out, text.encode())


if __name__ == "__main__":
    main()
