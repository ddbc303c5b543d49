"""Training, data and inference throughput of bts_lightning against a bare PyTorch ceiling.

``python -m benchmarks.benchmark [--models unet,deeplabv3,fcn,lraspp] [--image-size 256]
[--batch-size 32] [--precisions bf16-mixed,32-true] [--data-root DIR | --synthetic] [--steps N]
[--warmup N] [--repeats N] [--device cuda|cpu] [--tiny] [--out FILE.json]``

For every architecture and precision it measures:

1. ``bare``: a plain PyTorch loop (network from ``build_model``, the default loss
   ``conf/loss/dice_ce.yaml`` computed in float32 as ``SegmentationModule.compute_loss`` does,
   AdamW from ``conf/optimizer/adamw.yaml``, ``torch.autocast`` for bf16/fp16 and a GradScaler for
   fp16) over uint8 batches generated on the device beforehand and standardized each step with
   ``bts_lightning.preprocessing.standardize``: images/s, the ceiling;
2. ``lightning``: ``SegmentationModule`` trained by the Lightning ``Trainer`` built from
   ``conf/train.yaml`` (as ``bts_lightning.train`` builds it) on the real ``BrainTumorDataModule``
   (PNG files, default augmentation, default loader workers): images/s of train batches after
   warm-up, timed by a callback, and its ratio to (1);
3. ``data``: ``BrainTumorDataModule.train_dataloader()`` alone, no model: images/s;
4. peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each measurement);
5. ``inference``: images/s through ``predict``'s code path
   (``bts_lightning.inference.predict_probabilities`` over a ``ModulePredictor``: uint8 host batch
   in, float32 host probabilities out);
6. FLOPs per image (``FlopCounterMode``, forward and forward+backward of one training batch) and
   the FLOP/s achieved by (1), relative to a bf16 matmul measured in the same run.

Each timing is repeated ``--repeats`` times after ``--warmup`` untimed steps; the JSON keeps every
repeat and the tables show medians. ``--tiny`` runs the whole harness on CPU in seconds
(64 px, batch 2, synthetic data): a crash test, not a performance measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from bts_lightning.models import available_models

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "brain-tumor"
ALL_MODELS = tuple(available_models())  # every registered architecture (smp_*: needs the smp extra)

# Targets (see benchmarks/README.md); only judged for full-size runs on CUDA.
TARGET_RATIO = 0.95  # (2)/(1) at bf16-mixed, every architecture
TARGET_DATA_FACTOR = 2.0  # (3) >= 2x the fastest model's consumption in (1)
TARGET_PEAK_GB = 40.0  # peak memory at batch 32

# Markdown table: (column header, row key, format). The keys are also what tests check.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "s"),
    ("precision", "precision", "s"),
    ("(1) bare img/s", "bare_ips", ".1f"),
    ("(2) Lightning img/s", "lightning_ips", ".1f"),
    ("(2)/(1)", "ratio", ".3f"),
    ("(3) data img/s", "data_ips", ".1f"),
    ("(4) peak mem bare GB", "bare_peak_gb", ".2f"),
    ("(4) peak mem Lightning GB", "lightning_peak_gb", ".2f"),
    ("(5) inference img/s", "inference_ips", ".1f"),
    ("(6) fwd GFLOP/img", "fwd_gflop_per_image", ".3f"),
    ("(6) fwd+bwd GFLOP/img", "train_gflop_per_image", ".3f"),
    ("(6) achieved TFLOP/s of (1)", "achieved_tflops", ".4f"),
    ("(6) % of bf16 matmul peak", "pct_of_bf16_peak", ".2f"),
)
MEMORY_KEYS = ("bare_peak_gb", "lightning_peak_gb")

# Default-config callbacks that act during training steps; checkpoints, early stopping, LR monitor
# and validation images need validation, which the benchmark turns off.
KEPT_CALLBACKS = ("progress_bar", "backbone_freeze", "metric_history", "epoch_seed", "nonfinite_guard")


# --------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def summary(values: list[float]) -> dict[str, Any]:
    """Median and every repeat (the median is what tables show)."""
    return {"median": statistics.median(values) if values else None, "repeats": list(values)}


def precision_settings(precision: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is used) of a Lightning precision string."""
    name = str(precision)
    if name in ("32-true", "32"):
        return None, False
    if name in ("bf16-mixed", "bf16"):
        return torch.bfloat16, False
    if name in ("16-mixed", "16"):
        return torch.float16, True
    raise SystemExit(f"error: precision {name!r} is not supported here; use 32-true, bf16-mixed or 16-mixed.")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def library_versions() -> dict[str, Any]:
    import albumentations
    import lightning
    import monai
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "monai": monai.__version__,
        "albumentations": albumentations.__version__,
        "numpy": np.__version__,
        "cuda (torch build)": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    from bts_lightning.data.datamodule import default_num_workers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores_usable": cores,
        "default_num_workers": default_num_workers(),
        "platform": platform.platform(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch_num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = props.total_memory / 1e9
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


# --------------------------------------------------------------------------------------- configs


def compose_config(
    model: str, precision: str, data_root: Path, args: argparse.Namespace, output_dir: Path
) -> Any:
    """``conf/train.yaml`` composed as ``bts_lightning.train`` sees it, trimmed for timing."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from bts_lightning.runtime import CONFIG_DIR

    overrides = [
        f"model={model}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'gpu' if args.device.type == 'cuda' else 'cpu'}",
        f"data.root={data_root}",
        f"data.batch_size={args.batch_size}",
        f"data.image_size={args.image_size}",
        "data.download=false",
        "~logger",
        "scheduler=none",  # ReduceLROnPlateau needs val/dice, and validation is off; epoch-level anyway
        f"trainer.max_epochs={args.repeats}",
        "trainer.min_epochs=1",
        f"trainer.limit_train_batches={args.lightning_warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_checkpointing=false",
        "++trainer.enable_model_summary=false",
        "test=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.callbacks = {key: value for key, value in cfg.callbacks.items() if key in KEPT_CALLBACKS}
    return cfg


def prepare_data_root(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The dataset folder: ``--data-root``, or synthetic slices generated into ``workdir``."""
    if not args.synthetic:
        root = Path(args.data_root).expanduser().resolve()
        if not (root / "images").is_dir() or not (root / "masks").is_dir():
            raise SystemExit(
                f"error: {root} has no images/ and masks/; pass --data-root DIR (Kaggle layout) or --synthetic."
            )
        return root, {"kind": "folder", "root": str(root)}
    from bts_lightning.data.synthetic import generate_dataset

    # Enough training slices (4 of 5 folds train) for warm-up + timed batches in one epoch.
    needed = (max(args.warmup, args.lightning_warmup) + args.steps) * args.batch_size
    n = max(40, math.ceil(needed * 5 / 4 * 1.2) + 20)
    log(f"generating {n} synthetic {args.image_size}px slices in {workdir}")
    root = generate_dataset(workdir / "synthetic", n=n, size=args.image_size, seed=0)
    return root, {"kind": "synthetic", "root": str(root), "n": n, "size": args.image_size}


# ---------------------------------------------------------------------------------- measurements


def measure_matmul_peak(device: torch.device, n: int, iters: int, warmup: int, repeats: int) -> dict[str, Any]:
    """bf16 (n x n) @ (n x n) throughput in TFLOP/s (2 n^3 FLOPs per product)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=torch.bfloat16)
    for _ in range(max(1, warmup)):
        c = a @ b
    synchronize(device)
    values = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        synchronize(device)
        values.append(2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    del a, b, c
    return {"n": n, "iters_per_repeat": iters, "tflops": summary(values)}


def _conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any, _padding: Any,
                         _dilation: Any, transposed: bool, _output_padding: Any, _groups: Any, output_mask: Any,
                         out_shape: Any, **kwargs: Any) -> int:
    """``aten.convolution_backward`` FLOPs: input and weight gradients each cost one forward convolution.

    Replaces torch's formula, which counts the weight gradient of a grouped convolution ``groups``
    times over (65x the forward for a 64-channel depthwise conv; LR-ASPP's MobileNetV3 is full of them).
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def build_criterion(cfg: Any, net: torch.nn.Module) -> torch.nn.Module:
    """``SegmentationModule.configure_losses``'s rule: ``cfg.loss``, wrapped in ``FactoredLoss`` for a gated net."""
    from hydra.utils import instantiate

    from bts_lightning.losses import FactoredLoss
    from bts_lightning.models.presence import PresenceGated

    criterion = instantiate(cfg.loss)
    if isinstance(net, PresenceGated):
        criterion = FactoredLoss(criterion, float(cfg.model.get("presence_loss_weight", 1.0)))
    return criterion


def training_loss(criterion: Any, outputs: dict[str, Any], target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """``SegmentationModule.compute_loss``'s rule: the loss of ``out`` (of ``factors`` when present) plus
    ``aux_weight`` shared by the auxiliary heads."""
    aux = outputs.get("aux")
    heads = [] if aux is None else [aux] if isinstance(aux, torch.Tensor) else list(aux)
    loss = criterion(outputs.get("factors", outputs["out"]).float(), target)
    for head in heads:
        loss = loss + aux_weight / len(heads) * criterion(head.float(), target)
    return loss


def count_flops(cfg: Any, device: torch.device, batch_size: int, image_size: int) -> dict[str, Any]:
    """FLOPs per image of one training forward (train mode, aux head included) and forward+backward."""
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from bts_lightning.preprocessing import standardize

    net = instantiate(cfg.model.net).to(device).train()
    criterion = build_criterion(cfg, net)
    aux_weight = float(cfg.model.get("aux_loss_weight", 0.4))
    images = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8, device=device)
    target = (torch.rand(batch_size, 1, image_size, image_size, device=device) > 0.9).float()
    with FlopCounterMode(display=False) as forward_counter:
        outputs = net(standardize(images))
    loss = training_loss(criterion, outputs, target, aux_weight)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as backward_counter:
        loss.backward()
    forward = forward_counter.get_total_flops() / batch_size
    backward = backward_counter.get_total_flops() / batch_size
    del net, outputs, loss
    note = ("torch.utils.flop_counter (conv/matmul only) on the training graph, auxiliary heads included, "
            "loss not counted; grouped-conv backward corrected (see _conv_backward_flops)")
    return {"forward_per_image": forward, "backward_per_image": backward, "train_per_image": forward + backward,
            "counted_batch": batch_size, "note": note}


def bench_bare(cfg: Any, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """(1) The ceiling: plain PyTorch training steps over device-resident uint8 batches."""
    from hydra.utils import instantiate

    from bts_lightning.preprocessing import standardize

    device = args.device
    dtype, use_scaler = precision_settings(precision)
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model.net).to(device).train()
    criterion = build_criterion(cfg, net)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    aux_weight = float(cfg.model.get("aux_loss_weight", 0.4))
    shape = (args.batch_size, 1, args.image_size, args.image_size)
    batches = [
        (torch.randint(0, 256, shape, dtype=torch.uint8, device=device),
         (torch.rand(shape[0], *shape[2:], device=device) > 0.9).to(torch.uint8))
        for _ in range(4)
    ]

    def step(index: int) -> None:
        images, masks = batches[index % len(batches)]
        with autocast(device, dtype):
            outputs = net(standardize(images))
        target = masks.unsqueeze(1).float()
        with torch.autocast(device_type=device.type, enabled=False):  # float32 loss, as compute_loss
            loss = training_loss(criterion, outputs, target, aux_weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if args.sync_every_batch:
            synchronize(device)

    reset_memory(device)
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    values = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        synchronize(device)
        values.append(args.steps * args.batch_size / (time.perf_counter() - start))
    return {"images_per_s": summary(values), "peak_memory_gb": peak_memory_gb(device)}


class ThroughputTimer(Callback):
    """Lightning callback: images/s of the train batches after the first ``warmup`` of every epoch.

    The window runs from the end of batch ``warmup - 1`` to the end of the epoch's last batch, so
    it includes data loading, host-device copies, logging and every other callback. On CUDA the
    device is synchronized at both ends of the window (and after every batch with
    ``sync_every_batch``).
    """

    def __init__(self, warmup: int, device: torch.device, sync_every_batch: bool = False) -> None:
        self.warmup = max(1, warmup)
        self.device = device
        self.sync_every_batch = sync_every_batch
        self.windows: list[tuple[int, float]] = []
        self._start: float | None = None
        self._images = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._images = None, 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx == trainer.num_training_batches - 1
        if self.sync_every_batch or last or batch_idx == self.warmup - 1:
            synchronize(self.device)
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self._start, self._images = now, 0
        elif self._start is not None:
            self._images += len(batch["mask"])
        if last and self._start is not None and self._images:
            self.windows.append((self._images, now - self._start))
            self._start = None


def bench_lightning(cfg: Any, datamodule: Any, args: argparse.Namespace) -> dict[str, Any]:
    """(2) SegmentationModule through the Trainer, built like ``bts_lightning.train.train`` does."""
    import lightning as L
    from hydra.utils import instantiate

    from bts_lightning.train import build_module

    device = args.device
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    timer = ThroughputTimer(args.lightning_warmup, device, args.sync_every_batch)
    callbacks = [*(instantiate(c) for c in cfg.callbacks.values() if c), timer]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    reset_memory(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|limit_val_batches|val_dataloader).*")
        trainer.fit(module, datamodule=datamodule)
    peak = peak_memory_gb(device)
    datamodule.trainer = None  # the shared datamodule must not keep this run's trainer, model and workers alive
    values = [images / seconds for images, seconds in timer.windows]
    batches_per_epoch = int(trainer.num_training_batches)
    del trainer, module
    if not values:
        raise RuntimeError(
            f"no timed Lightning window: {batches_per_epoch} train batches per epoch, warm-up {args.lightning_warmup}; "
            "use more data or fewer --steps/--warmup"
        )
    return {"images_per_s": summary(values), "peak_memory_gb": peak,
            "timed_images_per_repeat": [images for images, _ in timer.windows],
            "batches_per_epoch": batches_per_epoch, "callbacks": [type(c).__name__ for c in callbacks]}


def bench_data(datamodule: Any, args: argparse.Namespace) -> dict[str, Any]:
    """(3) The train loader alone (default workers, augmentation, pinning as in training)."""
    loader = datamodule.train_dataloader()
    values = []
    for repeat in range(args.repeats):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(repeat)
        iterator = iter(loader)
        for _ in range(args.warmup):
            next(iterator)
        start = time.perf_counter()
        images = 0
        for _ in range(args.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            images += len(batch["mask"])
        seconds = time.perf_counter() - start
        if images:
            values.append(images / seconds)
        del iterator
    result = {"images_per_s": summary(values), "num_workers": loader.num_workers,
              "batches_per_epoch": len(loader), "pin_memory": loader.pin_memory}
    del loader
    if not values:
        raise RuntimeError("the train loader ran out during warm-up; use more data or fewer --warmup")
    return result


def inference_path() -> tuple[str, Callable[[Any, torch.device], Callable[[np.ndarray], torch.Tensor]]]:
    """``predict``'s code path when ``bts_lightning.inference`` provides it, else the module method."""
    try:
        from bts_lightning.inference import ModulePredictor, predict_probabilities
    except ImportError:
        def direct(module: Any, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
            module = module.to(device).eval()
            return lambda batch: module.predict_probabilities(torch.from_numpy(batch).to(device)).cpu()

        return "SegmentationModule.predict_probabilities (bts_lightning.inference not available)", direct

    def via_predict(module: Any, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
        predictor = ModulePredictor(module, device)
        return lambda batch: predict_probabilities(predictor, batch, tta=False)

    return "bts_lightning.inference.predict_probabilities(ModulePredictor) (as bts_lightning.predict)", via_predict


def bench_inference(cfg: Any, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """(5) Probabilities through predict's path: uint8 host batch in, float32 host probabilities out."""
    from hydra.utils import instantiate

    device = args.device
    dtype, _ = precision_settings(precision)
    path, make = inference_path()
    torch.manual_seed(cfg.seed)
    module = instantiate(cfg.model, _recursive_=False, scheduler=None)
    run = make(module, device)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=np.uint8)
    reset_memory(device)
    values = []
    with autocast(device, dtype):
        for _ in range(args.warmup):
            run(batch)
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                probabilities = run(batch)
            synchronize(device)
            values.append(args.steps * args.batch_size / (time.perf_counter() - start))
    expected = (args.batch_size, args.image_size, args.image_size)
    if tuple(probabilities.shape) != expected:
        raise RuntimeError(f"inference returned shape {tuple(probabilities.shape)}, expected {expected}")
    peak = peak_memory_gb(device)
    del module, run
    return {"images_per_s": summary(values), "peak_memory_gb": peak, "path": path,
            "autocast": str(dtype).replace("torch.", "") if dtype is not None else None}


# ------------------------------------------------------------------------------------ reporting


def format_value(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key), spec) for _, key, spec in COLUMNS) + " |")
    return "\n".join(lines)


def judge_targets(rows: list[dict[str, Any]], data_ips: float | None, judged: bool) -> dict[str, Any]:
    """Pass/fail of the README targets; only meaningful for full-size CUDA runs."""
    if not judged:
        return {"judged": False, "reason": "targets are judged only on CUDA at full size (not --tiny / CPU)"}
    ratios = {row["model"]: row["ratio"] for row in rows if row["precision"] == "bf16-mixed"}
    fastest = max((row["bare_ips"] for row in rows if row.get("bare_ips")), default=None)
    peaks = [row[key] for row in rows for key in MEMORY_KEYS if row.get(key) is not None]
    return {
        "judged": True,
        "ratio_bf16_ge_0.95": {model: (ratio is not None and ratio >= TARGET_RATIO) for model, ratio in ratios.items()},
        "data_ge_2x_fastest_bare": None if not (data_ips and fastest) else data_ips >= TARGET_DATA_FACTOR * fastest,
        "data_over_fastest_bare": None if not (data_ips and fastest) else data_ips / fastest,
        "peak_memory_lt_40gb": None if not peaks else max(peaks) < TARGET_PEAK_GB,
        "max_peak_memory_gb": max(peaks) if peaks else None,
    }


def versions_lines(meta: dict[str, Any]) -> list[str]:
    machine, versions = meta["machine"], meta["versions"]
    return [
        (f"device: {machine['device']} ({machine['gpu'] or machine['cpu']}), "
        f"{machine['cpu_cores_usable']} usable CPU cores, default loader workers {machine['default_num_workers']}"),
        "versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()),
    ]


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models",
                        help=f"comma-separated, from {','.join(ALL_MODELS)} (default all; --tiny: unet,lraspp)")
    parser.add_argument("--image-size", type=int, help="square input size in px (default 256; --tiny: 64)")
    parser.add_argument("--batch-size", type=int, help="batch size of every measurement (default 32; --tiny: 2)")
    parser.add_argument("--precisions", help="comma-separated Lightning precisions: 32-true, bf16-mixed, 16-mixed "
                        "(default bf16-mixed,32-true; --tiny: 32-true)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-root", help=f"Kaggle-layout dataset folder (default {DEFAULT_DATA_ROOT})")
    source.add_argument("--synthetic", action="store_true", default=None,
                        help="generate synthetic slices into a temporary folder instead (--tiny always does)")
    parser.add_argument("--steps", type=int, help="timed steps (batches) per repeat (default 40; --tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (default 10; --tiny: 1)")
    parser.add_argument("--repeats", type=int, help="timed repeats; medians are reported (default 5; --tiny: 1)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda when available (--tiny: cpu)")
    parser.add_argument("--matmul-size", type=int, help="n of the bf16 n x n matmul peak (default 8192 on cuda, "
                        "1024 on cpu; --tiny: 128)")
    parser.add_argument("--cpu-threads", type=int, help="torch intra-op threads of the main process (default: torch's "
                        "own; --tiny: 1, since on a busy 2-core machine 2 threads can be 100x slower than 1)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="set torch.backends.cudnn.benchmark=True (applies to every measurement alike)")
    parser.add_argument("--sync-every-batch", action="store_true",
                        help="synchronize the device after every training step in (1) and (2) (default: only at "
                        "the ends of each timed window)")
    parser.add_argument("--tiny", action="store_true", help="crash test of the harness on CPU in seconds")
    parser.add_argument("--out", help="write the full results as JSON here")
    args = parser.parse_args(argv)

    tiny = args.tiny
    defaults = {
        "models": "unet,lraspp" if tiny else ",".join(ALL_MODELS),
        "image_size": 64 if tiny else 256,
        "batch_size": 2 if tiny else 32,
        "precisions": "32-true" if tiny else "bf16-mixed,32-true",
        "steps": 2 if tiny else 40,
        "warmup": 1 if tiny else 10,
        "repeats": 1 if tiny else 5,
        "device": "cpu" if tiny else ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if tiny:
        if args.data_root is not None:
            parser.error("--tiny always uses synthetic data; drop --data-root")
        args.synthetic = True
    args.synthetic = bool(args.synthetic)
    if args.data_root is None and not args.synthetic:
        args.data_root = str(DEFAULT_DATA_ROOT)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(ALL_MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for precision in args.precisions:
        precision_settings(precision)
    for name in ("image_size", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here")
    args.device = torch.device(args.device)
    args.lightning_warmup = max(1, args.warmup)  # the Lightning window starts at the end of a batch
    if args.cpu_threads is None and tiny:
        args.cpu_threads = 1
    if args.cpu_threads is not None and args.cpu_threads < 1:
        parser.error("--cpu-threads must be >= 1")
    if args.matmul_size is None:
        args.matmul_size = 128 if tiny else (8192 if args.device.type == "cuda" else 1024)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON-ready results (``rows`` hold the table)."""
    threads = torch.get_num_threads()
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.benchmark " + " ".join(args.argv),
        "tiny": args.tiny,
        "machine": machine_info(device),
        "versions": library_versions(),
        "settings": {key: (str(value) if isinstance(value, torch.device) else value)
                     for key, value in vars(args).items() if key != "argv"},
    }
    for line in versions_lines(meta):
        log(line)
    errors: list[str] = []
    results: dict[str, Any] = {"meta": meta, "per_model": {}, "rows": [], "errors": errors}

    with tempfile.TemporaryDirectory(prefix="bts-benchmark-") as tmp:
        workdir = Path(tmp)
        data_root, meta["data"] = prepare_data_root(args, workdir)

        log(f"bf16 matmul peak, n={args.matmul_size}")
        matmul_iters = 20 if device.type == "cuda" else 3
        results["matmul_bf16"] = measure_matmul_peak(device, args.matmul_size, matmul_iters, 2, max(3, args.repeats))
        peak_tflops = results["matmul_bf16"]["tflops"]["median"]
        log(f"bf16 matmul: {peak_tflops:.3f} TFLOP/s (median)")

        from hydra.utils import instantiate

        base_cfg = compose_config(args.models[0], args.precisions[0], data_root, args, workdir / "runs")
        datamodule = instantiate(base_cfg.data)
        datamodule.setup("fit")
        meta["data"].update({"train_slices": len(datamodule.datasets["train"]),
                             "augmentations": [type(t).__name__ for t in datamodule.train_transform.transforms]
                             if datamodule.train_transform else []})

        log(f"data pipeline: {datamodule.num_workers} workers, batch {args.batch_size}")
        try:
            results["data"] = bench_data(datamodule, args)
            data_ips = results["data"]["images_per_s"]["median"]
            log(f"data pipeline: {data_ips:.1f} img/s")
        except Exception as error:  # noqa: BLE001 - record and carry on with the other measurements
            errors.append(f"data: {error!r}")
            results["data"], data_ips = {"error": repr(error)}, None

        for model in args.models:
            per_model: dict[str, Any] = {}
            results["per_model"][model] = per_model
            try:
                cfg = compose_config(model, args.precisions[0], data_root, args, workdir / "runs" / model)
                per_model["flops"] = count_flops(cfg, device, args.batch_size, args.image_size)
            except Exception as error:  # noqa: BLE001 - record and carry on
                errors.append(f"{model} flops: {error!r}")
                per_model["flops"] = {"error": repr(error)}
            reset_memory(device)
            flops = per_model["flops"]
            for precision in args.precisions:
                cfg = compose_config(model, precision, data_root, args, workdir / "runs" / f"{model}-{precision}")
                entry: dict[str, Any] = {}
                per_model[precision] = entry
                for name, measure in (("bare", partial(bench_bare, cfg, precision, args)),
                                      ("lightning", partial(bench_lightning, cfg, datamodule, args)),
                                      ("inference", partial(bench_inference, cfg, precision, args))):
                    log(f"{model} {precision}: {name}")
                    try:
                        entry[name] = measure()
                        log(f"{model} {precision}: {name} {entry[name]['images_per_s']['median']:.1f} img/s")
                    except Exception as error:  # noqa: BLE001 - record and carry on
                        errors.append(f"{model} {precision} {name}: {error!r}")
                        entry[name] = {"error": repr(error)}
                    reset_memory(device)

                def median(name: str, entry: dict[str, Any] = entry) -> float | None:
                    return (entry[name].get("images_per_s") or {}).get("median")

                bare, lightning_ips = median("bare"), median("lightning")
                train_flops = flops.get("train_per_image")
                achieved = bare * train_flops / 1e12 if bare and train_flops else None
                results["rows"].append({
                    "model": model,
                    "precision": precision,
                    "bare_ips": bare,
                    "lightning_ips": lightning_ips,
                    "ratio": lightning_ips / bare if bare and lightning_ips else None,
                    "data_ips": data_ips,
                    "bare_peak_gb": entry["bare"].get("peak_memory_gb"),
                    "lightning_peak_gb": entry["lightning"].get("peak_memory_gb"),
                    "inference_ips": median("inference"),
                    "fwd_gflop_per_image": flops["forward_per_image"] / 1e9 if "forward_per_image" in flops else None,
                    "train_gflop_per_image": train_flops / 1e9 if train_flops else None,
                    "achieved_tflops": achieved,
                    "pct_of_bf16_peak": 100 * achieved / peak_tflops if achieved and peak_tflops else None,
                    "repeats": args.repeats,
                })

    results["targets"] = judge_targets(results["rows"], data_ips, judged=device.type == "cuda" and not args.tiny)
    return results


def report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    settings = meta["settings"]
    peak = results["matmul_bf16"]["tflops"]
    lines = [
        "## bts_lightning benchmark" + (" (--tiny crash test, not a performance result)" if meta["tiny"] else ""),
        "",
        f"command: `{meta['command']}`  ",
        f"date: {meta['date']}  ",
        *(f"{line}  " for line in versions_lines(meta)),
        (f"data: {meta['data']['kind']} {meta['data']['root']} ({meta['data'].get('train_slices')} train slices), "
        f"image {settings['image_size']} px, batch {settings['batch_size']}, {settings['steps']} timed steps x "
        f"{settings['repeats']} repeat(s) after {settings['warmup']} warm-up; medians shown  "),
        (f"bf16 matmul peak (n={results['matmul_bf16']['n']}): {peak['median']:.3f} TFLOP/s median of "
        f"{[round(v, 3) for v in peak['repeats']]}  "),
        "",
        markdown_table(results["rows"]),
    ]
    targets = results["targets"]
    lines += ["", "targets: " + (json.dumps({k: v for k, v in targets.items() if k != "judged"}) if targets["judged"]
                                 else targets["reason"])]
    if results["errors"]:
        lines += ["", "errors:", *(f"- {error}" for error in results["errors"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    results = run(args)
    print(report(results), flush=True)
    if args.out:
        from bts_lightning.runtime import write_bytes_atomic  # creates the folder; all or nothing

        write_bytes_atomic(args.out, (json.dumps(results, indent=2, default=str) + "\n").encode())
        log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
