"""The benchmark harness (benchmarks/benchmark.py) runs end to end and reports every column.

These are crash tests on CPU (``--tiny``); the speeds they produce mean nothing.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import benchmark


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow  # the whole harness on two models (~8 s)
def test_tiny_run_reports_every_column_for_every_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    results = benchmark.main(["--tiny", "--out", str(out)])
    assert torch.get_num_threads() == threads  # --tiny runs on 1 thread and restores the setting

    assert results["errors"] == []
    rows = results["rows"]
    assert [(row["model"], row["precision"]) for row in rows] == [("unet", "32-true"), ("lraspp", "32-true")]
    for row in rows:
        for _, key, _ in benchmark.COLUMNS:
            assert key in row, key
            if key in ("model", "precision"):
                continue
            if key in benchmark.MEMORY_KEYS:
                assert row[key] is None  # CPU: no GPU memory to report
            else:
                assert _positive(row[key]), (row["model"], key, row[key])
        assert row["ratio"] == pytest.approx(row["lightning_ips"] / row["bare_ips"])
        per_model = results["per_model"][row["model"]]
        flops = per_model["flops"]
        assert flops["train_per_image"] > flops["forward_per_image"] > 0
        for name in ("bare", "lightning", "inference"):
            timing = per_model["32-true"][name]["images_per_s"]
            assert len(timing["repeats"]) == 1 and timing["median"] == timing["repeats"][0]
        assert "bts_lightning.inference" in per_model["32-true"]["inference"]["path"]

    meta = results["meta"]
    assert meta["tiny"] and meta["machine"]["device"] == "cpu" and meta["machine"]["gpu"] is None
    assert meta["machine"]["torch_num_threads"] == 1
    libraries = {"torch", "torchvision", "lightning", "monai", "albumentations", "cuda (torch build)", "cudnn"}
    assert libraries <= set(meta["versions"])
    assert results["matmul_bf16"]["tflops"]["median"] > 0
    assert results["data"]["num_workers"] >= 1 and results["data"]["images_per_s"]["median"] > 0
    assert results["targets"]["judged"] is False

    saved = json.loads(out.read_text())
    assert [row["model"] for row in saved["rows"]] == ["unet", "lraspp"]
    printed = capsys.readouterr().out
    assert "(2)/(1)" in printed and "| unet | 32-true |" in printed and "| lraspp | 32-true |" in printed


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_paths_of_bare_loop_and_inference(tmp_path, precision):
    """autocast (and GradScaler for fp16) in the bare loop; autocast around predict's path."""
    args = benchmark.parse_args(["--tiny", "--image-size", "32", "--steps", "1", "--warmup", "0"])
    cfg = benchmark.compose_config("unet", precision, tmp_path, args, tmp_path / "run")
    assert cfg.trainer.precision == precision and cfg.trainer.limit_val_batches == 0
    assert set(cfg.callbacks) <= set(benchmark.KEPT_CALLBACKS) and "logger" not in cfg
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)  # as run() does for --tiny
    try:
        bare = benchmark.bench_bare(cfg, precision, args)
        inference = benchmark.bench_inference(cfg, precision, args)
    finally:
        torch.set_num_threads(threads)
    assert _positive(bare["images_per_s"]["median"]) and bare["peak_memory_gb"] is None
    assert _positive(inference["images_per_s"]["median"]) and inference["autocast"] is not None


def test_grouped_conv_backward_flops_are_two_forwards():
    """torch's formula counts a depthwise conv's weight gradient ``groups`` times; ours does not."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = conv(x)
    mapping = {torch.ops.aten.convolution_backward: benchmark._conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as backward:
        y.sum().backward()
    assert backward.get_total_flops() == 2 * forward.get_total_flops() > 0


def test_targets_are_judged_from_the_rows():
    rows = [
        {"model": "unet", "precision": "bf16-mixed", "bare_ips": 1000.0, "ratio": 0.97,
         "bare_peak_gb": 3.0, "lightning_peak_gb": 3.5},
        {"model": "fcn", "precision": "bf16-mixed", "bare_ips": 400.0, "ratio": 0.90,
         "bare_peak_gb": 20.0, "lightning_peak_gb": 41.0},
        {"model": "fcn", "precision": "32-true", "bare_ips": 200.0, "ratio": 0.5,
         "bare_peak_gb": 30.0, "lightning_peak_gb": 30.0},
    ]
    targets = benchmark.judge_targets(rows, data_ips=2500.0, judged=True)
    assert targets["ratio_bf16_ge_0.95"] == {"unet": True, "fcn": False}
    assert targets["data_ge_2x_fastest_bare"] is True and targets["data_over_fastest_bare"] == 2.5
    assert targets["peak_memory_lt_40gb"] is False and targets["max_peak_memory_gb"] == 41.0
    assert benchmark.judge_targets(rows, 2500.0, judged=False)["judged"] is False


@pytest.mark.parametrize("gated", [False, True])
def test_bare_loop_loss_follows_the_module_rule_for_deep_supervision(tmp_path, gated):
    """The bare loop's loss equals SegmentationModule.compute_loss, also for UNet++'s list of auxiliary heads and
    for a presence-gated network (model.net.presence_gate: its raw outputs and FactoredLoss)."""
    from bts_lightning.train import build_module
    from tests.conftest import compose_train

    torch.manual_seed(0)
    overrides = ["model=unetpp", "model.net.features=[4,4,8,8,8,4]", f"model.net.presence_gate={str(gated).lower()}"]
    cfg = compose_train(overrides, tmp_path)
    module = build_module(cfg).train()
    outputs = module(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert isinstance(outputs["aux"], list) and len(outputs["aux"]) == 3
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 8:20, 8:20] = 1  # one tumor slice, one empty: the gated loss tells them apart
    expected = module.compute_loss(outputs, masks)
    criterion = benchmark.build_criterion(cfg, module.net)
    assert type(criterion) is type(module.criterion)
    actual = benchmark.training_loss(criterion, outputs, masks.unsqueeze(1).float(), module.aux_loss_weight)
    assert torch.allclose(actual, expected)


def test_mask_area_counts_half_covered_pixels_as_the_project_does(tmp_path):
    """A 3x3 block at 4 px: at 2 px each pixel is 1/4, 1/2, 1/2 and 1 tumor (exact area 9/4)."""
    from benchmarks.mask_area import mask_areas

    (tmp_path / "masks").mkdir()
    mask = np.zeros((4, 4), np.uint8)
    mask[1:4, 1:4] = 255
    cv2.imwrite(str(tmp_path / "masks" / "1.png"), mask)
    assert mask_areas(tmp_path, 2) == {"project": 3, "more_than_half": 1, "exact": 2.25}
