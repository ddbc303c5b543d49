"""Boundary-aware losses (loss=dice_boundary, loss=dice_hausdorff), epoch-scheduled loss weights, benchmarks/loss_cost."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from monai.losses import BoundaryLoss, DiceCELoss
from scipy import ndimage
from torch import nn

from benchmarks import loss_cost
from bts_lightning.distance_maps import signed_distance_map, signed_distance_maps
from bts_lightning.losses import (
    LinearRamp,
    OnTumorSlices,
    PrecomputedBoundaryLoss,
    SlicePresenceLoss,
    WeightedLossSum,
    uses_distance_maps,
)
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import build_module, train
from tests.conftest import compose_train

SIZE = 64


def disc(row: int, col: int, radius: int, size: int = SIZE) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((rows - row) ** 2 + (cols - col) ** 2) <= radius**2).long()


def logits_for(mask: torch.Tensor, confidence: float = 20.0) -> torch.Tensor:
    """2-class logits (N, 2, H, W) that predict ``mask`` (N, H, W) with the given margin."""
    tumor = mask.float() * 2 - 1
    return torch.stack([-tumor, tumor], dim=1) * confidence


def criterion(loss: str, epoch: int = 0) -> WeightedLossSum:
    module = instantiate(compose_train([f"loss={loss}"], Path(".")).loss)
    module.set_epoch(epoch)
    return module


TRUTH = disc(20, 20, 8)[None]
TARGET = TRUTH[:, None].float()
RIGHT = logits_for(TRUTH)
NEAR = logits_for(disc(22, 20, 8)[None])  # 2 px off
FAR = logits_for(disc(44, 44, 8)[None])  # a disc of the same size, far away
INVERTED = logits_for(1 - TRUTH)


def signed_distance(mask: torch.Tensor) -> torch.Tensor:
    """Kervadec's map, computed here independently: -(distance to background - 1) inside, distance to tumor outside."""
    inside = mask.numpy().astype(bool)
    sdf = np.where(inside, 1 - ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside))
    return torch.from_numpy(sdf).float()


def test_boundary_term_is_the_tumor_signed_distance_and_lowest_when_right():
    boundary = criterion("dice_boundary").terms["boundary"]
    values = {name: boundary(logits, TARGET).item() for name, logits in
              (("right", RIGHT), ("near", NEAR), ("far", FAR), ("inverted", INVERTED),
               ("empty", logits_for(torch.zeros_like(TRUTH))), ("grown", logits_for(disc(20, 20, 10)[None])),
               ("shrunk", logits_for(disc(20, 20, 6)[None])))}
    # The tumor channel only: the mean of (tumor probability x the tumor's signed distance map).
    minimum = signed_distance(TRUTH[0]).clamp(max=0).sum().item() / SIZE**2
    assert values["right"] == pytest.approx(minimum, rel=1e-4) and minimum < -0.05
    assert values["right"] == min(values.values())
    assert values["right"] < values["near"] < values["far"] < values["inverted"]
    assert values["far"] > 1.0 and values["inverted"] > 10.0


def test_hausdorff_term_is_zero_when_right_and_grows_with_the_distance_of_errors():
    hausdorff = criterion("dice_hausdorff").terms["hausdorff"]
    values = {name: hausdorff(logits, TARGET).item() for name, logits in
              (("right", RIGHT), ("near", NEAR), ("far", FAR), ("inverted", INVERTED))}
    assert values["right"] < 1e-6
    assert 0 < values["near"] < 1.0 < values["far"] < values["inverted"]
    assert values["far"] > 10.0


@pytest.mark.parametrize("loss, epoch", [("dice_boundary", 0), ("dice_boundary", 50), ("dice_hausdorff", 0)])
def test_full_losses_are_at_their_minimum_when_right_and_large_when_wrong(loss, epoch):
    combined = criterion(loss, epoch)
    right, near, far = (combined(logits, TARGET).item() for logits in (RIGHT, NEAR, FAR))
    lowest = sum(weight * term(RIGHT, TARGET).item() for term, weight in
                 ((term, combined.weights[name]) for name, term in combined.terms.items()))
    assert right == pytest.approx(lowest, abs=1e-6)
    assert right < near < far and far > right + 1.0
    if loss == "dice_hausdorff" or epoch == 0:
        assert right < 0.01  # Dice+CE ~0, Hausdorff 0, boundary weighted 0 at epoch 0
    else:
        assert right < 0  # the boundary term's minimum is negative


@pytest.mark.parametrize("loss", ["dice_boundary", "dice_hausdorff"])
def test_empty_masks_give_finite_losses_and_gradients(loss):
    combined = criterion(loss, epoch=50)
    logits = torch.randn(3, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.stack([torch.zeros_like(TRUTH[0]), torch.zeros_like(TRUTH[0]), TRUTH[0]])[:, None].float()
    for batch in (slice(0, 2), slice(0, 3)):  # only tumor-free slices, and mixed with one tumor
        logits.grad = None
        value = combined(logits[batch], target[batch])
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    if loss == "dice_boundary":  # no edge, no boundary term; Dice+CE still scores the slice
        assert combined.terms["boundary"](logits[:2], target[:2]).item() == 0.0


def test_boundary_schedule_rebalances_region_and_boundary_weights():
    combined = criterion("dice_boundary")
    assert combined.weights == {"dice_ce": 1.0, "boundary": 0.0}  # epoch 0 on construction
    assert combined.set_epoch(1) == pytest.approx({"dice_ce": 0.95, "boundary": 0.05})
    assert combined.weights == pytest.approx({"dice_ce": 0.95, "boundary": 0.05})
    assert combined.set_epoch(10) == pytest.approx({"dice_ce": 0.5, "boundary": 0.5})
    assert combined.set_epoch(50) == pytest.approx({"dice_ce": 0.1, "boundary": 0.9})  # capped
    for epoch in range(60):
        weights = combined.set_epoch(epoch)
        assert weights["dice_ce"] + weights["boundary"] == pytest.approx(1.0)
    assert combined.set_epoch(0) == {"dice_ce": 1.0, "boundary": 0.0}  # and back


def test_linear_ramp_bounds_and_schedule_errors():
    assert [LinearRamp(start=1.0, step=-0.5, min=0.2)(epoch) for epoch in range(3)] == [1.0, 0.5, 0.2]
    assert LinearRamp(start=0.0, step=0.3)(10) == pytest.approx(3.0)  # no bound: keeps growing
    with pytest.raises(ValueError, match="min=0.5 is above max=0.1"):
        LinearRamp(start=0.0, step=0.1, min=0.5, max=0.1)
    terms = {"a": nn.L1Loss(), "b": nn.MSELoss()}
    with pytest.raises(ValueError, match=r"schedule name unknown loss terms \['c'\]"):
        WeightedLossSum(terms, schedule={"c": {"start": 0.0, "step": 0.1}})
    with pytest.raises(ValueError, match=r"\['a'\] have both a fixed weight and a schedule"):
        WeightedLossSum(terms, weights={"a": 2.0}, schedule={"a": {"start": 0.0, "step": 0.1}})
    with pytest.raises(TypeError):
        WeightedLossSum(terms, schedule={"a": {"start": 0.0, "step": 0.1, "stop": 1.0}})


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (input - target).abs().mean()


def test_terms_weighted_zero_are_not_computed():
    counting = _Counting()
    combined = WeightedLossSum({"l1": nn.L1Loss(), "counted": counting}, schedule={"counted": {"start": 0, "step": 1}})
    x, y = torch.ones(2, 3), torch.zeros(2, 3)
    assert combined(x, y).item() == 1.0 and counting.calls == 0
    combined.set_epoch(2)
    assert combined(x, y).item() == 3.0 and counting.calls == 1


class _WeightRecorder(Callback):
    """The boundary weight seen by each epoch's training batches and by validation."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.val: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[trainer.current_epoch] = pl_module.criterion.weights["boundary"]

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val[trainer.current_epoch] = pl_module.criterion.weights["boundary"]


def _fit(module, tmp_path: Path, max_epochs: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, _WeightRecorder]:
    generator = torch.Generator().manual_seed(0)
    samples = [{"image": torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=generator),
                "mask": disc(16, 16, 6, size=32).to(torch.uint8)} for _ in range(2)]
    loader = torch.utils.data.DataLoader(samples, batch_size=2)
    recorder = _WeightRecorder()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv"),
                        callbacks=[recorder], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer, recorder


def test_module_sets_the_epoch_weights_logs_them_and_keeps_them_on_resume(tmp_path):
    def module():
        return build_module(compose_train(["loss=dice_boundary", "model.net.channels=[4,8]", "model.net.strides=[2]",
                                           "model.net.num_res_units=0"], tmp_path))

    trainer, recorder = _fit(module(), tmp_path, max_epochs=2)
    assert recorder.train == pytest.approx({0: 0.0, 1: 0.05}) and recorder.val == recorder.train
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("train/loss_weight/boundary")
    logged = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert logged == pytest.approx([0.0, 0.05])

    checkpoint = tmp_path / "after_2_epochs.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = module()
    assert resumed.criterion.weights["boundary"] == 0.0
    _, recorder = _fit(resumed, tmp_path, max_epochs=3, ckpt_path=checkpoint)
    assert recorder.train == pytest.approx({2: 0.1}) and recorder.val == recorder.train


@pytest.mark.parametrize("loss", ["dice_boundary", "dice_hausdorff", "dice_ce", "dice_ce_slice", "dice_ce_slice_tumor"])
def test_losses_train_end_to_end_on_synthetic_data(loss, tmp_path, monkeypatch):
    """The train app has the loader workers compute distance maps for loss=dice_boundary only."""
    from bts_lightning.data import dataset

    worker_maps, received = [], []
    monkeypatch.setattr(dataset, "signed_distance_map", lambda mask: worker_maps.append(1) or signed_distance_map(mask))
    forward = PrecomputedBoundaryLoss.forward

    def spy(self, input, target, distance=None):
        received.append(distance is not None and torch.equal(distance, signed_distance_maps(target)))
        return forward(self, input, target, distance)

    monkeypatch.setattr(PrecomputedBoundaryLoss, "forward", spy)
    overrides = ["data=synthetic", "data.synthetic.n=40", "data.synthetic.size=64", "data.batch_size=8",
                 f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0", "debug=fast_dev_run",
                 f"loss={loss}", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]"]
    if loss == "dice_boundary":  # weigh the boundary term from the first epoch on
        overrides += ["loss.schedule.dice_ce.start=0.5", "loss.schedule.boundary.start=0.5"]
    saved = train(compose_train(overrides, tmp_path / "run"))
    assert np.isfinite(saved["test"]["test/loss"])
    if loss == "dice_boundary":  # a train, a validation and a test batch, each with the maps of its masks
        assert received == [True] * 3 and len(worker_maps) == 3 * 8
    else:
        assert received == [] and worker_maps == []


def test_loss_cost_table_and_precomputed_maps_agree():
    rows = [{"loss": "dice", "loss_ms": 1.25, "step_ms": 100.0},
            {"loss": "dice_boundary", "loss_ms": 40.0, "maps_ms": 30.0, "loss_precomputed_ms": 10.0,
             "step_ms": 140.0, "step_precomputed_ms": 110.0, "saved_pct": 21.43}]
    lines = loss_cost.markdown_table(rows).splitlines()
    assert lines[0].startswith("| loss | (1) loss fwd+bwd ms |") and len(lines) == 4
    assert lines[2] == "| dice | 1.2 | n/a | n/a | 100.0 | n/a | n/a |"
    assert lines[3] == "| dice_boundary | 40.0 | 30.0 | 10.0 | 140.0 | 110.0 | 21.4 |"



def test_precomputed_maps_give_the_same_loss_without_computing_target_maps(monkeypatch):
    """benchmarks/loss_cost's stand-in for maps from loader workers: same value, fewer distance transforms."""
    calls = []
    edt = ndimage.distance_transform_edt
    monkeypatch.setattr(ndimage, "distance_transform_edt", lambda *args, **kwargs: calls.append(1) or edt(*args, **kwargs))
    logits, masks = loss_cost.make_batch(3, 48, torch.device("cpu"))
    target = masks.unsqueeze(1).float()
    # Per image: boundary 2 transforms (tumor and background of the mask); Hausdorff 2 of the mask
    # and 2 of the thresholded prediction (a noisy one: never empty). Precomputing leaves the prediction's.
    for loss, per_image, precomputed_per_image in (("dice_boundary", 2, 0), ("dice_hausdorff", 4, 2)):
        combined = criterion(loss, epoch=50)
        calls.clear()
        computed = combined(logits, target).item()
        assert len(calls) == 3 * per_image
        with loss_cost.precomputed_target_maps(combined, target) as extras:
            assert list(extras) == (["distance"] if loss == "dice_boundary" else [])
            calls.clear()
            assert combined(logits, target, **extras).item() == pytest.approx(computed, rel=1e-6)
            assert len(calls) == 3 * precomputed_per_image
        calls.clear()
        combined(logits, target)
        assert len(calls) == 3 * per_image  # the patch is gone after the block


def random_masks(seed: int = 0) -> list[np.ndarray]:
    """Blobs of every kind: one or many, touching the image's edges or not, a single pixel, empty, all tumor."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((20, 30), np.uint8), np.ones((20, 30), np.uint8), np.zeros((9, 9), np.uint8)]
    masks[2][4, 4] = 1
    for density in (0.005, 0.02, 0.2, 0.9):
        for _ in range(5):
            size = tuple(int(n) for n in rng.integers(5, 40, 2))
            masks.append(ndimage.binary_dilation(rng.random(size) < density, iterations=int(rng.integers(0, 4))))
    return [mask.astype(np.uint8) for mask in masks]


def test_signed_distance_map_is_monais_boundary_map():
    monai_loss = BoundaryLoss()
    for mask in random_masks():
        expected = monai_loss.compute_distance_map(torch.from_numpy(mask)[None, None].float())[0, 0]
        computed = signed_distance_map(mask)
        assert computed.dtype == np.float32 and torch.equal(torch.from_numpy(computed), expected)
        if 0 < mask.sum() < mask.size:
            assert computed.min() <= 0 < computed.max()
        else:  # no edge: no map
            assert not computed.any()
    masks = torch.from_numpy(np.stack([TRUTH[0].numpy(), 1 - TRUTH[0].numpy()])).reshape(1, 2, SIZE, SIZE)
    maps = signed_distance_maps(masks.float())
    assert maps.shape == (1, 2, SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.equal(maps[0, 1], torch.from_numpy(signed_distance_map(masks[0, 1].numpy())))


@pytest.mark.parametrize("include_background", [False, True])
def test_precomputed_boundary_maps_give_the_same_loss_and_are_used(include_background):
    options = {"include_background": include_background, "to_onehot_y": True, "softmax": True}
    loss, monai_loss = PrecomputedBoundaryLoss(**options), BoundaryLoss(**options)
    logits, masks = loss_cost.make_batch(3, SIZE, torch.device("cpu"))
    masks[0] = 0  # one slice without tumor
    target = masks[:, None].float()
    distance = torch.stack([torch.from_numpy(signed_distance_map(mask)) for mask in masks.numpy()])[:, None]
    computed = loss(logits, target)
    assert torch.equal(loss(logits, target, distance=distance), computed)
    assert torch.equal(computed, monai_loss(logits, target))
    # The given maps replace the tumor channel's: zero maps leave only the background channel's (if kept).
    zeroed = loss(logits, target, distance=torch.zeros_like(distance)).item()
    background = PrecomputedBoundaryLoss(**options, reduction="none")(logits, target)[:, 0].mean().item()
    assert zeroed == (pytest.approx(background / 2, rel=1e-6) if include_background else 0.0)
    with pytest.raises(ValueError, match="do not match the labels"):
        loss(logits, target, distance=distance[:, :, 1:])
    with pytest.raises(ValueError, match="the logits have 3 channels"):
        loss(torch.randn(3, 3, SIZE, SIZE), target, distance=distance)


def test_weighted_sum_passes_distance_maps_only_to_terms_that_take_them():
    combined = criterion("dice_boundary", epoch=50)
    target = TARGET.float()
    distance = signed_distance_maps(target)
    assert combined(NEAR, target, distance=distance).item() == pytest.approx(combined(NEAR, target).item(), rel=1e-6)
    # Zero maps zero the boundary term only; DiceCELoss never receives them (it would raise).
    dice_ce = combined.weights["dice_ce"] * combined.terms["dice_ce"](NEAR, target).item()
    assert combined(NEAR, target, distance=torch.zeros_like(distance)).item() == pytest.approx(dice_ce, rel=1e-6)
    assert uses_distance_maps(combined) and uses_distance_maps(PrecomputedBoundaryLoss())
    for other in ("dice_hausdorff", "dice_focal"):
        assert not uses_distance_maps(criterion(other))
    assert not uses_distance_maps(DiceCELoss()) and not uses_distance_maps(BoundaryLoss())


def test_module_passes_distance_maps_to_losses_that_take_them_for_every_output():
    def module(loss: str) -> SegmentationModule:
        return build_module(compose_train([f"loss={loss}", "model.net.channels=[4,8]", "model.net.strides=[2]",
                                           "model.net.num_res_units=0"], Path(".")))

    boundary, dice_ce = module("dice_boundary"), module("dice_ce")
    boundary.criterion.set_epoch(50)
    masks = TRUTH.to(torch.uint8)
    distance = torch.zeros(1, 1, SIZE, SIZE)  # wrong maps, to see that they are used
    outputs = {"out": NEAR, "aux": [FAR, RIGHT]}
    assert boundary.compute_loss(outputs, masks, distance) < boundary.compute_loss(outputs, masks) - 0.1
    zero_boundary = boundary.criterion.weights["dice_ce"] * sum(
        weight * boundary.criterion.terms["dice_ce"](logits, TARGET) for weight, logits in ((1, NEAR), (0.2, FAR),
                                                                                          (0.2, RIGHT)))
    assert boundary.compute_loss(outputs, masks, distance).item() == pytest.approx(zero_boundary.item(), rel=1e-5)
    assert dice_ce.compute_loss(outputs, masks, distance) == dice_ce.compute_loss(outputs, masks)  # ignored



def test_slice_presence_loss_is_the_cross_entropy_of_each_slices_strongest_tumor_pixel():
    """Hand-made logits: an empty slice pays softplus(its largest tumor log-odds), a tumor slice softplus(-it)."""
    loss = SlicePresenceLoss()
    logits = torch.zeros(2, 2, 8, 8)
    logits[:, 1] = -3.0  # tumor log-odds -3 everywhere ...
    logits[0, 1, 2, 5] = 1.5  # ... but one stray pixel at +1.5 on the empty slice
    logits[1, 1, 4:6, 4:6] = 4.0  # and a 2x2 tumor at +4 on the tumor slice
    target = torch.zeros(2, 1, 8, 8)
    target[1, 0, 4:6, 4:6] = 1
    softplus = nn.functional.softplus
    expected = (softplus(torch.tensor(1.5)) + softplus(torch.tensor(-4.0))) / 2
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    weighted = SlicePresenceLoss(pos_weight=3.0)(logits, target)
    assert weighted.item() == pytest.approx(((softplus(torch.tensor(1.5)) + 3 * softplus(torch.tensor(-4.0))) / 2).item())

    logits.requires_grad_(True)
    loss(logits[:1], target[:1]).backward()  # the empty slice: only its strongest pixel is pushed down
    moved = logits.grad[0, 1].nonzero().tolist()
    assert moved == [[2, 5]] and logits.grad[0, 1, 2, 5] > 0 and logits.grad[0, 0, 2, 5] < 0


def test_slice_presence_loss_rejects_single_channel_logits():
    with pytest.raises(ValueError, match="C >= 2"):
        SlicePresenceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="pos_weight"):
        SlicePresenceLoss(pos_weight=0)


def test_dice_ce_slice_config_adds_the_slice_term_to_dice_ce():
    """loss=dice_ce_slice is loss=dice_ce plus the slice term: equal where the slice term is ~0, larger on a false alarm."""
    combined = criterion("dice_ce_slice")
    dice_ce = instantiate(compose_train(["loss=dice_ce"], Path(".")).loss)
    assert set(combined.terms) == {"dice_ce", "slice"}
    assert combined(RIGHT, TARGET).item() == pytest.approx(dice_ce(RIGHT, TARGET).item(), abs=1e-6)
    empty = torch.zeros_like(TARGET)
    stray = logits_for(torch.zeros_like(TRUTH))
    stray[0, :, 5, 5] = torch.tensor([-2.0, 2.0])  # one confident stray tumor pixel on an empty slice
    extra = combined(stray, empty).item() - dice_ce(stray, empty).item()
    assert extra == pytest.approx(combined.weights["slice"] * nn.functional.softplus(torch.tensor(4.0)).item(), rel=1e-5)


def test_on_tumor_slices_scores_only_the_slices_with_a_tumor():
    """Hand-made batch: the wrapped Dice+CE of [empty, tumor] equals that of the tumor slice alone; empty-only is 0."""
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)
    wrapped = OnTumorSlices(dice_ce)
    tumor = disc(20, 30, 6).float()[None, None]
    target = torch.cat([torch.zeros_like(tumor), tumor])
    logits = logits_for(torch.stack([disc(40, 40, 5), disc(22, 30, 5)]), confidence=3.0).requires_grad_(True)
    assert wrapped(logits, target).item() == pytest.approx(dice_ce(logits[1:], tumor).item(), rel=1e-6)
    assert wrapped(logits, target).item() != pytest.approx(dice_ce(logits, target).item(), rel=1e-3)
    wrapped(logits, target).backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0  # the false alarm is not its business

    empty_only = wrapped(logits[:1], target[:1])
    assert empty_only.item() == 0 and empty_only.requires_grad


def test_dice_ce_slice_tumor_config_leaves_empty_slices_to_the_slice_term():
    """loss=dice_ce_slice_tumor: on an empty slice only the slice term pays; on tumor slices it is dice_ce_slice."""
    tumor_only = criterion("dice_ce_slice_tumor")
    everywhere = criterion("dice_ce_slice")
    assert tumor_only(RIGHT, TARGET).item() == pytest.approx(everywhere(RIGHT, TARGET).item(), abs=1e-6)
    empty = torch.zeros_like(TARGET)
    stray = logits_for(torch.zeros_like(TRUTH))
    stray[0, :, 5, 5] = torch.tensor([-2.0, 2.0])
    slice_only = tumor_only.weights["slice"] * nn.functional.softplus(torch.tensor(4.0)).item()
    assert tumor_only(stray, empty).item() == pytest.approx(slice_only, rel=1e-5)
    assert everywhere(stray, empty).item() > tumor_only(stray, empty).item()
