"""The README's model table: every registered architecture's size, cost, CPU speed and ONNX export.

``python -m benchmarks.model_table [--models a,b] [--image-size 256] [--batch-size 8] [--repeats 5]
[--threads N] [--out FILE.md]``

For each model of ``bts_lightning.models.available_models()``, built from its ``conf/model/<name>.yaml``
defaults (random weights; nothing is downloaded):

- ``source``: the library its network comes from (the first submodule class from MONAI,
  torchvision or segmentation_models_pytorch);
- ``params (M)``: trainable and frozen parameters of the network, auxiliary heads included;
- ``GFLOP/slice``: forward pass in eval mode (what inference runs, deep-supervision heads off)
  of one ``image_size`` x ``image_size`` 1-channel slice, counted by ``torch.utils.flop_counter``
  (convolutions and matmuls; one multiply-add = 2 FLOPs);
- ``CPU ms/slice``: ``predict``'s code path (``bts_lightning.inference.predict_probabilities`` over a
  ``ModulePredictor``: uint8 batch in, probabilities out), median over ``--repeats`` timed batches of
  ``--batch-size`` after one warm-up batch, with ``--threads`` torch threads;
- ``ONNX``: what ``bts_lightning.export.export_model`` writes (``dynamic`` H/W, or ``fixed NxN``), checked
  against PyTorch with onnxruntime; the error's first line when export fails.

A model whose optional dependency is missing (the ``smp`` extra) gets a row saying so. The table goes
to stdout (and ``--out``), progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCES = {"monai": "MONAI", "torchvision": "torchvision", "segmentation_models_pytorch": "segmentation_models_pytorch"}
COLUMNS = (("model", "model"), ("source", "source"), ("params (M)", "params_m"), ("GFLOP/slice", "gflop"),
           ("CPU ms/slice", "cpu_ms"), ("ONNX", "onnx"))
PARITY_TOLERANCE = 1e-3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def source_library(net: torch.nn.Module) -> str:
    """The library of the first submodule whose class comes from one of :data:`SOURCES`."""
    for module in net.modules():
        root = type(module).__module__.split(".")[0]
        if root in SOURCES:
            return SOURCES[root]
    return "bts_lightning"


def build(name: str, image_size: int) -> Any:
    """The ``SegmentationModule`` of ``conf/model/<name>.yaml``, in eval mode on CPU."""
    from hydra import compose, initialize_config_dir

    from bts_lightning.runtime import CONFIG_DIR
    from bts_lightning.train import build_module

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", f"data.image_size={image_size}"])
    torch.manual_seed(0)
    return build_module(cfg).eval()


def forward_gflop(module: Any, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randint(0, 256, (1, 1, image_size, image_size), dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(images)
    return counter.get_total_flops() / 1e9


def cpu_ms_per_slice(module: Any, image_size: int, batch_size: int, repeats: int) -> float:
    from bts_lightning.inference import ModulePredictor, predict_probabilities

    predictor = ModulePredictor(module, torch.device("cpu"))
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 1, image_size, image_size), dtype=np.uint8)
    predict_probabilities(predictor, batch, tta=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_probabilities(predictor, batch, tta=False)
        times.append((time.perf_counter() - start) * 1000 / batch_size)
    return statistics.median(times)


def onnx_export(module: Any, image_size: int, workdir: Path) -> str:
    """``dynamic`` or ``fixed NxN`` after a checked export, else ``no (<error>)``."""
    import onnx

    from bts_lightning.errors import first_line
    from bts_lightning.export import export_model
    from bts_lightning.inference import load_predictor

    try:
        path = export_model(module, workdir / "model.onnx", image_size=image_size)
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        exported = load_predictor(path, "cpu")
        images = torch.randint(0, 256, (2, 1, image_size, image_size), dtype=torch.uint8).float()
        gap = float((torch.as_tensor(exported(images)) - module.predict_probabilities(images)).abs().max())
    except Exception as exc:  # noqa: BLE001 - any export failure is a table entry, not a crash
        return f"no ({type(exc).__name__}: {first_line(str(exc))[:80]})"
    if gap > PARITY_TOLERANCE:
        return f"no (max |onnx - torch| = {gap:.2g})"
    if all(dim.dim_param for dim in dims[2:]):
        return "dynamic"
    return f"fixed {dims[2].dim_value}x{dims[3].dim_value}"


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from bts_lightning.errors import ConfigError, first_line

    log(f"[model_table] {name}")
    try:
        module = build(name, args.image_size)
    except ConfigError as exc:  # e.g. an optional extra that is not installed
        return {"model": name, "source": f"not built: {first_line(str(exc))}"}
    with tempfile.TemporaryDirectory() as workdir:
        onnx_status = onnx_export(module, args.image_size, Path(workdir))
    return {
        "model": name,
        "source": source_library(module.net),
        "params_m": sum(p.numel() for p in module.net.parameters()) / 1e6,
        "gflop": forward_gflop(module, args.image_size),
        "cpu_ms": cpu_ms_per_slice(module, args.image_size, args.batch_size, args.repeats),
        "onnx": onnx_status,
    }


def format_row(row: dict[str, Any]) -> list[str]:
    cells = []
    for _, key in COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append("n/a")
        elif isinstance(value, float):
            cells.append(f"{value:.2f}" if key != "cpu_ms" else f"{value:.0f}")
        else:
            cells.append(str(value))
    return cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for header, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_row(row)) + " |" for row in rows]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    return (f"{_dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; {args.image_size}x{args.image_size} "
            f"1-channel slices, batch {args.batch_size}, median of {args.repeats}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bts_lightning.models import available_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(available_models()), help="comma-separated registry names")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    args.models = [name for name in args.models.split(",") if name]
    unknown = sorted(set(args.models) - set(available_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; available: {', '.join(available_models())}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, args) for name in args.models]
    text = f"{markdown_table(rows)}\n\n{describe(args)}\n"
    print(text)
    if args.out:
        from bts_lightning.runtime import write_bytes_atomic

        write_bytes_atomic(args.out, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
