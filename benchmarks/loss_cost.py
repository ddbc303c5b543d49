"""What the distance-map losses cost per training step, and what precomputing their target maps saves.

``python -m benchmarks.loss_cost [--losses dice,dice_ce,dice_boundary,dice_hausdorff] [--model unet]
[--batch-size 16] [--image-size 256] [--repeats 5] [--warmup 1] [--no-step] [--device cuda|cpu]
[--threads N] [--out FILE.json]``

``loss=dice_boundary`` and ``loss=dice_hausdorff`` need distance maps, computed with scipy on the CPU
(the masks copied to the host first). In training the loader workers compute dice_boundary's
(``data.distance_maps``); without them, and for dice_hausdorff always, the loss computes them for every
batch. For each loss (composed from ``conf/loss/<name>.yaml`` as training composes it) this measures,
median over ``--repeats`` after ``--warmup`` untimed runs:

1. ``loss``: the loss forward + backward on fixed (N, 2, H, W) float32 logits, computing its maps;
2. ``maps``: the target distance maps alone (BoundaryLoss: the signed map of each mask, what the loader
   workers compute; HausdorffDTLoss: the distance field of each mask, what they could compute);
3. ``loss, maps precomputed``: (1) with those maps passed in as the batch's ``distance``
   (PrecomputedBoundaryLoss), or looked up instead of computed (HausdorffDTLoss, which still computes
   the prediction's fields);
4. ``step``: one training step of the ``--model`` network (``SegmentationModule.compute_loss``,
   backward, AdamW from ``conf/optimizer/adamw.yaml``), with and without precomputed maps.

Masks are discs of radius 6-22 px at random places (the real slices' tumors: radius ~7-22 px, none
empty); logits are those discs shifted 3 px plus unit Gaussian noise (a half-trained prediction).
The losses' values with and without precomputed maps are checked to agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from monai.losses import BoundaryLoss, HausdorffDTLoss
from monai.networks import one_hot
from torch import nn

from bts_lightning.distance_maps import signed_distance_maps
from bts_lightning.losses import uses_distance_maps
from bts_lightning.runtime import write_bytes_atomic

ALL_LOSSES = ("dice", "dice_ce", "dice_boundary", "dice_hausdorff")

# Markdown table: (column header, row key, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "s"),
    ("(1) loss fwd+bwd ms", "loss_ms", ".1f"),
    ("(2) target maps ms", "maps_ms", ".1f"),
    ("(3) loss, maps precomputed ms", "loss_precomputed_ms", ".1f"),
    ("(4) train step ms", "step_ms", ".1f"),
    ("(4) train step, maps precomputed ms", "step_precomputed_ms", ".1f"),
    ("step time saved by precomputing %", "saved_pct", ".1f"),
)


def log(message: str) -> None:
    print(f"[loss_cost] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(run: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Milliseconds per call of ``run``: median and every repeat."""
    for _ in range(warmup):
        run()
    values = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        values.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(values), "repeats": values}


def make_batch(batch_size: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 2, H, W) float32, masks (N, H, W) uint8): disc masks and a noisy prediction 3 px off."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks, shifted = [], []
    for _ in range(batch_size):
        radius = float(torch.empty(1).uniform_(6, 22, generator=generator)) * size / 256
        row, col = (float(v) for v in torch.empty(2).uniform_(0.25 * size, 0.75 * size, generator=generator))
        masks.append((rows - row) ** 2 + (cols - col) ** 2 <= radius**2)
        shifted.append((rows - row - 3) ** 2 + (cols - col) ** 2 <= radius**2)
    tumor = torch.stack(shifted).float() * 8 - 4 + torch.randn(batch_size, size, size, generator=generator)
    logits = torch.stack([-tumor, tumor], dim=1)
    return logits.to(device), torch.stack(masks).to(torch.uint8).to(device)


@contextlib.contextmanager
def precomputed_target_maps(criterion: nn.Module, target: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the loss given the yielded arguments computes no distance map of the labels ``target``.

    ``target``: 2-class labels (N, 1, H, W). The maps are computed on entry, as loader workers would:
    the signed maps of a loss that takes them, yielded as ``{"distance": maps}`` (what
    ``data.distance_maps`` adds to batches; ``{}`` for other losses), and HausdorffDTLoss's target
    fields, which it then looks up in a table (it still computes the prediction's own fields).
    """
    extras = {"distance": signed_distance_maps(target)} if uses_distance_maps(criterion) else {}
    patched = []
    for term in criterion.modules():
        if not isinstance(term, HausdorffDTLoss):
            continue
        channels = one_hot(target, num_classes=2)
        channels = channels if term.include_background else channels[:, 1:]
        # Called per channel, for the prediction and for the target.
        fields = {index: term.distance_field(channels[:, [index]]) for index in range(channels.shape[1])}
        compute = term.distance_field

        def distance_field(img: torch.Tensor, fields=fields, channels=channels, compute=compute) -> torch.Tensor:
            for index, field in fields.items():
                if torch.equal(img, channels[:, [index]]):
                    return field
            return compute(img)

        term.distance_field = distance_field
        patched.append(term)
    try:
        yield extras
    finally:
        for term in patched:
            vars(term).pop("distance_field", None)


def target_maps(criterion: nn.Module, target: torch.Tensor) -> None:
    """Compute the target distance maps the loss terms take precomputed (what (2) times)."""
    with precomputed_target_maps(criterion, target):
        pass


def compose(loss: str, model: str) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bts_lightning.runtime import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"loss={loss}", f"model={model}", "~logger"])


def measure(loss: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every timing of one loss (see the module docstring); ``row`` holds the table's values."""
    from hydra.utils import instantiate

    device = args.device
    cfg = compose(loss, args.model)
    criterion = instantiate(cfg.loss)
    if hasattr(criterion, "set_epoch"):
        criterion.set_epoch(args.epoch)
    logits, masks = make_batch(args.batch_size, args.image_size, device)
    target = masks.unsqueeze(1).float()
    logits.requires_grad_(True)
    has_maps = any(isinstance(term, (BoundaryLoss, HausdorffDTLoss)) for term in criterion.modules())

    def loss_step(extras: dict[str, torch.Tensor] | None = None) -> float:
        logits.grad = None
        value = criterion(logits, target, **(extras or {}))
        value.backward()
        return value.item()

    result: dict[str, Any] = {"loss": timed_ms(loss_step, device, args.warmup, args.repeats)}
    if has_maps:
        result["maps"] = timed_ms(lambda: target_maps(criterion, target), device, args.warmup, args.repeats)
        computed = loss_step()
        with precomputed_target_maps(criterion, target) as extras:
            looked_up = loss_step(extras)
            result["loss_precomputed"] = timed_ms(lambda: loss_step(extras), device, args.warmup, args.repeats)
        if abs(looked_up - computed) > 1e-5 * max(1.0, abs(computed)):
            raise RuntimeError(f"{loss}: precomputed maps changed the loss ({looked_up} != {computed})")
        result["loss_values"] = {"computed": computed, "precomputed": looked_up}
    if args.step:
        from bts_lightning.train import build_module

        torch.manual_seed(0)
        module = build_module(cfg).to(device).train()
        module.criterion = criterion
        optimizer = instantiate(cfg.optimizer)(params=module.parameters())
        images = torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8,
                               device=device)

        def train_step(distance: torch.Tensor | None = None) -> None:
            optimizer.zero_grad(set_to_none=True)
            module.compute_loss(module(images), masks, distance).backward()
            optimizer.step()

        result["step"] = timed_ms(train_step, device, args.warmup, args.repeats)
        if has_maps:
            with precomputed_target_maps(criterion, target) as extras:
                result["step_precomputed"] = timed_ms(lambda: train_step(extras.get("distance")), device,
                                                      args.warmup, args.repeats)

    def median(key: str) -> float | None:
        return result[key]["median"] if key in result else None

    step, step_precomputed = median("step"), median("step_precomputed")
    result["row"] = {
        "loss": loss, "loss_ms": median("loss"), "maps_ms": median("maps"),
        "loss_precomputed_ms": median("loss_precomputed"), "step_ms": step, "step_precomputed_ms": step_precomputed,
        "saved_pct": 100 * (step - step_precomputed) / step if step and step_precomputed else None,
    }
    return result


def format_value(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else format(value, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(format_value(row.get(key), spec) for _, key, spec in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default=",".join(ALL_LOSSES), help="comma-separated conf/loss names "
                        f"(default {','.join(ALL_LOSSES)})")
    parser.add_argument("--model", default="unet", help="conf/model name of the training step (default unet)")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--image-size", type=int, default=256, help="square size in px (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    parser.add_argument("--epoch", type=int, default=50,
                        help="epoch of scheduled loss weights (default 50: dice_boundary's boundary term at its cap)")
    parser.add_argument("--no-step", dest="step", action="store_false", help="time the losses only, no training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default cuda when available)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", help="also write every repeat and setting to this JSON file")
    args = parser.parse_args(argv)
    args.losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    args.device = torch.device(args.device)
    if min(args.batch_size, args.image_size, args.repeats) < 1 or args.warmup < 0 or args.epoch < 0:
        parser.error("--batch-size, --image-size and --repeats must be >= 1; --warmup and --epoch >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results: dict[str, Any] = {"command": "python -m benchmarks.loss_cost " + " ".join(argv), "per_loss": {},
                                   "settings": {key: str(value) for key, value in vars(args).items()},
                                   "torch_threads": torch.get_num_threads()}
        for loss in args.losses:
            log(f"{loss}")
            results["per_loss"][loss] = measure(loss, args)
    finally:
        torch.set_num_threads(threads)
    results["rows"] = [entry["row"] for entry in results["per_loss"].values()]
    print(f"command: `{results['command']}`  \ndevice: {args.device}, torch threads {results['torch_threads']}, "
          f"batch {args.batch_size} x {args.image_size} px, model {args.model if args.step else 'none'}, "
          f"loss weights of epoch {args.epoch}; medians of {args.repeats} repeat(s) after {args.warmup} warm-up\n",
          flush=True)
    print(markdown_table(results["rows"]), flush=True)
    if args.out:
        write_bytes_atomic(args.out, (json.dumps(results, indent=2, default=str) + "\n").encode())
        log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
