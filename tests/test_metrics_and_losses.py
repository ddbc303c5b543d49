"""Metric and loss values on hand-made masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from bts_lightning.metrics import MeanPerImageOverlap, image_metrics, overlap_metrics, per_image_overlap
from bts_lightning.train import build_module
from tests.conftest import compose_train


def square(top: int, left: int, side: int, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_per_image_dice_and_iou_by_hand():
    truth = square(0, 0, 4)  # 16 pixels
    prediction = square(0, 2, 4)  # 16 pixels, 8 shared
    assert per_image_overlap(prediction[None], truth[None], "dice").item() == pytest.approx(2 * 8 / 32)
    assert per_image_overlap(prediction[None], truth[None], "iou").item() == pytest.approx(8 / 24)


def test_empty_cases():
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    tumor = square(2, 2, 3)[None]
    assert per_image_overlap(empty, empty, "dice").item() == 1.0  # nothing there, nothing predicted
    assert per_image_overlap(tumor, empty, "dice").item() == 0.0  # false alarm
    assert per_image_overlap(empty, tumor, "iou").item() == 0.0  # missed tumor


def test_mean_is_over_images_not_pooled_pixels():
    big_truth, small_truth = square(0, 0, 8), square(0, 0, 1)
    preds = torch.stack([big_truth, torch.zeros_like(small_truth)])  # big one perfect, small one missed
    metric = MeanPerImageOverlap("dice")
    metric.update(preds[:1], torch.stack([big_truth]))
    metric.update(preds[1:], torch.stack([small_truth]))
    assert metric.compute().item() == pytest.approx(0.5)  # pooled pixels would give ~0.99
    collection = overlap_metrics("val/")
    collection.update(preds, torch.stack([big_truth, small_truth]))
    assert set(collection.compute()) == {"val/dice", "val/iou"}


def test_training_metric_and_evaluate_agree_per_image_and_on_the_mean():
    """val/dice, test/dice (MeanPerImageOverlap) and evaluate's per-image Dice are one definition."""
    generator = torch.Generator().manual_seed(0)
    truths = (torch.rand(12, 16, 16, generator=generator) > 0.6).long()
    preds = (torch.rand(12, 16, 16, generator=generator) > 0.5).long()
    truths[8:] = 0  # tumor-free slices: a false alarm (8, 9), correctly empty (10, 11)
    preds[10:] = 0
    preds[1] = 0  # a missed tumor
    preds[2] = truths[2]  # a perfect one
    rows = [image_metrics(p.numpy(), t.numpy()) for p, t in zip(preds, truths)]
    assert [row["dice"] for row in rows[8:]] == [0.0, 0.0, 1.0, 1.0] and rows[1]["dice"] == 0.0
    for kind in ("dice", "iou"):
        metric = MeanPerImageOverlap(kind)
        for start in range(0, 12, 5):  # batches of unequal size, as at an epoch's end
            metric.update(preds[start : start + 5], truths[start : start + 5])
        per_image = torch.tensor([row[kind] for row in rows])
        assert torch.equal(per_image, per_image_overlap(preds, truths, kind))
        assert metric.compute().item() == pytest.approx(per_image.double().mean().item(), abs=1e-6)


def logits_for(mask: torch.Tensor, confidence: float) -> torch.Tensor:
    """2-class logits (N, 2, H, W) that predict ``mask`` with the given margin."""
    tumor = mask.float() * 2 - 1
    return torch.stack([-tumor, tumor], dim=1) * confidence


@pytest.mark.parametrize("loss", ["dice", "dice_ce", "dice_focal", "focal", "tversky"])
def test_losses_are_near_zero_when_right_and_large_when_wrong(loss, tmp_path):
    criterion = instantiate(compose_train([f"loss={loss}"], tmp_path).loss)
    mask = square(2, 2, 4)[None]
    right = criterion(logits_for(mask, 20.0), mask[:, None].float()).item()
    wrong = criterion(logits_for(1 - mask, 20.0), mask[:, None].float()).item()
    assert right < 0.01 and wrong > 0.5


def test_loss_is_float32_and_finite_for_large_masks_with_half_logits(tmp_path):
    module = build_module(compose_train(["loss=dice", "model=lraspp"], tmp_path))
    masks = torch.ones(2, 512, 512, dtype=torch.uint8)  # 262k tumor pixels per image: fp16 sums overflow
    outputs = {"out": logits_for(masks, 3.0).half()}
    loss = module.compute_loss(outputs, masks)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() < 0.01


def test_auxiliary_head_adds_weighted_loss(tmp_path):
    module = build_module(compose_train(["loss=dice", "model=fcn"], tmp_path))
    mask = square(2, 2, 4)[None]
    main = {"out": logits_for(mask, 20.0)}
    with_aux = {**main, "aux": logits_for(1 - mask, 20.0)}
    difference = module.compute_loss(with_aux, mask) - module.compute_loss(main, mask)
    assert difference.item() == pytest.approx(0.4 * module.criterion(with_aux["aux"], mask[:, None].float()).item(), rel=1e-4)


def test_iou_stays_iou_when_the_first_batch_scores_only_zeros_and_ones():
    """torchmetrics' compute groups merged Dice and IoU when their states agreed after one update."""
    collection = overlap_metrics("val/")
    truth = square(0, 0, 4)[None]
    collection.update(torch.zeros_like(truth), truth)  # an untrained net: all background, Dice = IoU = 0
    collection.update(square(0, 2, 4)[None], truth)  # half overlap: Dice 0.5, IoU 1/3
    scores = collection.compute()
    assert scores["val/dice"].item() == pytest.approx(0.25)
    assert scores["val/iou"].item() == pytest.approx(1 / 6)


def test_dice_focal_punishes_a_confident_miss_that_the_softmax_makes():
    """MONAI's DiceFocalLoss scored a sigmoid of the tumor logit alone: ~0 focal term for this miss."""
    mask = square(2, 2, 4)[None]
    # Tumor pixels: logits (30, 20); elsewhere (0, -20). The softmax says background everywhere
    # (a complete miss), although the tumor logit alone is high exactly on the tumor.
    logits = torch.stack([mask * 30.0, mask * 40.0 - 20.0], dim=1)
    assert logits.softmax(dim=1).argmax(dim=1).sum() == 0
    target = mask[:, None].float()
    dice_focal = instantiate(compose_train(["loss=dice_focal"], Path(".")).loss)
    dice = instantiate(compose_train(["loss=dice"], Path(".")).loss)
    focal_term = (dice_focal(logits, target) - dice(logits, target)).item()
    assert focal_term > 1.0
