"""End-to-end training through the Hydra app, in-process and as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bts_lightning.train import train
from tests.conftest import REAL_DATA, REPO_ROOT, compose_train

SMALL_SYNTHETIC = ["data=synthetic", "data.synthetic.n=40", "data.synthetic.size=64", "data.batch_size=8"]


def run_module(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_short_run_writes_checkpoints_tensorboard_and_metrics(tmp_path):
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "trainer.max_epochs=2"]
    cfg = compose_train([*overrides, "data.num_workers=0"], tmp_path / "run")
    metrics = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["model"] == "unet" and saved["epochs_trained"] == 2 and saved["best_epoch"] in (0, 1)
    assert 0.0 <= saved["best_val_dice"] <= 1.0
    assert saved["best_val_dice"] == max(row["val/dice"] for row in saved["val_history"])
    assert set(saved["test"]) == {"test/dice", "test/iou", "test/loss"}
    assert metrics["best_val_dice"] == saved["best_val_dice"]
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == saved["best_epoch"]
    assert checkpoint["hyper_parameters"]["model"]["name"] == "unet"
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss_epoch", "val/dice", "val/iou", "val/loss"} <= set(events.Tags()["scalars"])
    assert any(tag.startswith("lr-") for tag in events.Tags()["scalars"])
    assert "val/examples" in events.Tags()["images"]


def test_multirun_trains_all_four_architectures(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module(
        ["bts_lightning.train", "-m", "model=unet,deeplabv3,fcn,lraspp", "data=synthetic", "debug=fast_dev_run",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        assert (job / ".hydra" / "config.yaml").is_file()
        models[json.loads((job / "metrics.json").read_text())["model"]] = job
    assert sorted(models) == ["deeplabv3", "fcn", "lraspp", "unet"]


def test_bad_input_exits_with_one_clear_line(tmp_path):
    result = run_module(["bts_lightning.train", f"data.root={tmp_path / 'missing'}", "debug=fast_dev_run"], cwd=tmp_path)
    assert result.returncode == 2
    assert "error: Dataset root" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_pretrained_backbone_is_frozen_for_the_first_epochs(tmp_path, monkeypatch):
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

    from bts_lightning.models.weights import cached_path

    cached = cached_path(LRASPP_MobileNet_V3_Large_Weights.DEFAULT)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict(), cached)
    overrides = [*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0",
                 "model=lraspp", "model.weights=DEFAULT", "model.freeze_backbone_epochs=1", "debug=limit", "test=false"]
    first_conv = {}
    for epochs in (1, 2):
        cfg = compose_train([*overrides, f"trainer.max_epochs={epochs}"], tmp_path / f"run{epochs}")
        train(cfg)
        best = torch.load(tmp_path / f"run{epochs}" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        first_conv[epochs] = best["state_dict"]["net.backbone.0.0.weight"]
    saved = torch.load(cached, map_location="cpu")["backbone.0.0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(first_conv[1], saved), "backbone changed while frozen"
    assert not torch.equal(first_conv[2], saved), "backbone never unfroze"


@pytest.mark.skipif(not (REAL_DATA / "images").is_dir(), reason="real data not present")
def test_real_data_deeplabv3_mixed_precision_with_limits(tmp_path):
    result = run_module(
        ["bts_lightning.train", "model=deeplabv3", "trainer.precision=bf16-mixed", "model.weights=null",
         f"data.root={REAL_DATA}", "debug=limit", "data.image_size=64", "data.batch_size=2",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model"] == "deeplabv3" and saved["best_val_dice"] is not None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_readme_demo_reaches_dice_0_7_within_5_minutes(tmp_path):
    """The README's offline demo, exactly as written (plus where to put its files)."""
    result = run_module(
        ["bts_lightning.train", "data=synthetic", "trainer=cpu", f"paths.data_dir={tmp_path / 'data'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["best_val_dice"] >= 0.7
    assert saved["train_time_s"] < 300


def test_checkpoint_records_the_training_image_size(tmp_path):
    from bts_lightning.checkpoint import training_image_size

    cfg = compose_train([*SMALL_SYNTHETIC, f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "debug=limit",
                         "trainer.max_epochs=1", "data.num_workers=0", "data.image_size=48", "test=false"], tmp_path / "run")
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    copied = tmp_path / "elsewhere.ckpt"  # away from its run directory and .hydra/config.yaml
    copied.write_bytes(checkpoint.read_bytes())
    assert training_image_size(copied) == 48
