"""model.net.presence_gate: a slice-level "tumor present" output, learned apart from the segmentation, gating it."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from bts_lightning.checkpoint import DECISION_KEY, load_module
from bts_lightning.errors import ConfigError
from bts_lightning.export import export_model
from bts_lightning.inference import load_predictor
from bts_lightning.losses import FactoredLoss, OnTumorSlices, WeightedLossSum, uses_distance_maps
from bts_lightning.models import build_model
from bts_lightning.models.presence import PresenceGated, gate, presence_logits
from bts_lightning.preprocessing import standardize
from bts_lightning.train import build_module, train
from tests.conftest import compose_train
from tests.test_model_contract import HEAVY_MODELS, TOLERANCE, _images, _train_step

sigmoid = torch.sigmoid


def test_gate_keeps_the_segmentation_on_present_slices_and_empties_absent_ones():
    """Hand-made logits: q = min(softmax(segmentation)[tumor], sigmoid(max of the presence map)), as 2-class logits."""
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 1] = -2.0
    logits[:, 1, 1, 1] = 3.0  # one confident tumor pixel given a tumor, on both slices
    logits[0, 2] = -4.0
    logits[0, 2, 3, 0] = 2.5  # slice 0: presence logit 2.5 (the map's maximum, wherever it is)
    logits[1, 2] = -6.0  # slice 1: presence logit -6, everywhere
    gated = gate(logits)
    assert gated.shape == (2, 2, 4, 4) and gated.dtype == torch.float32
    q = gated.softmax(dim=1)[:, 1]
    assert torch.allclose(gated.exp().sum(dim=1), torch.ones(2, 4, 4), atol=1e-6)  # log-probabilities
    assert q[0, 1, 1].item() == pytest.approx(sigmoid(torch.tensor(2.5)).item(), rel=1e-5)  # capped by the presence
    assert q[0, 0, 0].item() == pytest.approx(sigmoid(torch.tensor(-2.0)).item(), rel=1e-5)  # the segmentation's own
    assert q[1, 1, 1].item() == pytest.approx(sigmoid(torch.tensor(-6.0)).item(), rel=1e-4)
    assert torch.equal(q[0] > 0.5, logits[0, 1] > logits[0, 0])  # a present slice keeps the segmentation's mask
    assert not (q[1] > 0.5).any()  # an absent one is empty
    assert torch.equal(presence_logits(logits), torch.tensor([2.5, -6.0]))


def test_gate_stays_finite_where_both_are_certain():
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 1] = 80.0
    logits[:, 2] = 80.0
    gated = gate(logits)
    assert torch.isfinite(gated).all() and gated.softmax(dim=1)[0, 1].min() > 0.999
    logits.requires_grad_(True)
    gate(logits)[:, 1].sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_gate_rejects_other_than_three_channels():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        gate(torch.zeros(1, 2, 4, 4))


class _SquaredError(nn.Module):
    """A stand-in segmentation loss that records what it was given."""

    def forward(self, input, target, distance=None):
        self.seen = (input.detach().clone(), target.clone(), None if distance is None else distance.clone())
        return ((input[:, 1] - input[:, 0] - target[:, 0]) ** 2).mean()


def test_factored_loss_segments_tumor_slices_and_scores_presence_on_every_slice():
    """Hand-made batch of a tumor slice and an empty one: the segmentation loss sees channels 0-1 of the tumor
    slice only (and its distance map), the presence term both slices' presence logits, weighted."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 1:3, 1:3] = 1
    distance = torch.randn(2, 1, 4, 4)
    segmentation = _SquaredError()
    loss = FactoredLoss(segmentation, presence_weight=0.5)(logits, target, distance)
    seen_input, seen_target, seen_distance = segmentation.seen
    assert torch.equal(seen_input, logits[:1, :2].detach()) and torch.equal(seen_target, target[:1])
    assert torch.equal(seen_distance, distance[:1])
    slice_logits = logits[:, 2].flatten(1).amax(dim=1)
    bce = -(F.logsigmoid(slice_logits[0]) + F.logsigmoid(-slice_logits[1])) / 2
    expected = ((logits[0, 1] - logits[0, 0] - target[0, 0]) ** 2).mean() + 0.5 * bce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[1, :2]) == 0  # the empty slice teaches the segmentation nothing
    assert torch.count_nonzero(logits.grad[:, 2].flatten(1), dim=1).tolist() == [1, 1]  # each slice's presence max


def test_factored_loss_on_an_empty_only_batch_is_the_presence_term_alone():
    logits = torch.zeros(2, 3, 4, 4, requires_grad=True)
    loss = FactoredLoss(_SquaredError(), presence_weight=2.0)(logits, torch.zeros(2, 1, 4, 4))
    assert loss.item() == pytest.approx(2.0 * math.log(2.0), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, :2]) == 0


def test_factored_loss_takes_distance_maps_only_when_its_segmentation_loss_does():
    """The train app has loader workers compute distance maps only for a loss that uses them, wrapped or not."""
    assert uses_distance_maps(FactoredLoss(_SquaredError())) and uses_distance_maps(OnTumorSlices(_SquaredError()))
    assert not uses_distance_maps(FactoredLoss(nn.MSELoss())) and not uses_distance_maps(OnTumorSlices(nn.MSELoss()))
    assert not uses_distance_maps(WeightedLossSum({"tumor": OnTumorSlices(nn.MSELoss())}))


def test_factored_loss_forwards_epoch_schedules_and_rejects_a_bad_weight():
    schedule = {"dice": {"start": 0.0, "step": 0.5, "max": 1.0}}
    terms = {"dice": _SquaredError(), "other": _SquaredError()}
    loss = FactoredLoss(WeightedLossSum(terms, schedule=schedule))
    assert loss.set_epoch(1) == {"dice": 0.5} and FactoredLoss(_SquaredError()).set_epoch(3) == {}
    with pytest.raises(ValueError, match="presence_loss_weight=-1"):
        FactoredLoss(_SquaredError(), presence_weight=-1)


def test_a_gated_module_trains_on_the_raw_outputs_and_scores_the_gated_ones(tmp_path):
    """model.net.presence_gate=true wraps whatever loss is configured; the loss of a batch equals FactoredLoss
    of the raw outputs, validation included; the weight is +model.presence_loss_weight."""
    overrides = ["model.net.presence_gate=true", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]",
                 "+model.presence_loss_weight=0.25"]
    module = build_module(compose_train(overrides, tmp_path / "run"))
    assert isinstance(module.criterion, FactoredLoss) and module.criterion.presence_weight == 0.25
    assert not isinstance(build_module(compose_train([], tmp_path / "plain")).criterion, FactoredLoss)
    images, masks = _images(2, 32, 32).float(), torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 8:16, 8:16] = 1
    outputs = module(images)
    assert set(outputs) == {"out", "factors"} and outputs["factors"].shape == (2, 3, 32, 32)
    expected = module.criterion(outputs["factors"], masks[:, None].float())
    assert module.compute_loss(outputs, masks).item() == pytest.approx(expected.item(), rel=1e-6)


def test_build_model_adds_the_presence_channel_and_keeps_the_networks_size_rules():
    torch.manual_seed(0)
    gated = build_model("unet", presence_gate=True, channels=[8, 16, 32], strides=[2, 2])
    assert isinstance(gated, PresenceGated) and gated.net.net.out_channels == 3
    assert gated.size_multiple == 4 and "stride" in gated.size_rule and gated.dynamic_size and gated.backbone is None
    assert not isinstance(build_model("unet", channels=[8, 16], strides=[2]), PresenceGated)
    with pytest.raises(ConfigError, match="presence_gate=true needs a binary model"):
        build_model("unet", num_classes=3, presence_gate=True)
    with pytest.raises(ConfigError, match="presence_gate='yes' must be true or false"):
        build_model("unet", presence_gate="yes")


def test_export_drops_torchvisions_auxiliary_head_through_the_gate():
    gated = build_model("lraspp", presence_gate=True)
    assert gated.aux_classifier is None  # LR-ASPP has none: reading it is harmless
    fcn = PresenceGated(nn.Module())
    fcn.net.aux_classifier = nn.Conv2d(1, 3, 1)
    fcn.aux_classifier = None
    assert fcn.net.aux_classifier is None


@pytest.mark.parametrize("model_name", [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY_MODELS else name
                                        for name in ("unet", "attention_unet", "lraspp", "segresnet", "deeplabv3",
                                                     "unetpp")])
def test_gated_models_train_round_trip_and_export(model_name, tmp_path):
    """The model contract with model.net.presence_gate=true: 2-class logits (aux included), gradients everywhere,
    a checkpoint that rebuilds the gate, and an ONNX file with the same probabilities."""
    torch.manual_seed(0)
    module = build_module(compose_train([f"model={model_name}", "model.net.presence_gate=true",
                                         "loss=dice_focal"], tmp_path / "run"))
    assert isinstance(module.net, PresenceGated)
    _train_step(module, _images(2, 64, 64))
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    loaded = load_module(checkpoint)
    images = _images(2, 64, 64, seed=1).float()
    expected = loaded.predict_probabilities(images)
    assert torch.allclose(expected, module.predict_probabilities(images), atol=1e-6)
    exported = load_predictor(export_model(loaded, tmp_path / "model.onnx", image_size=64), "cpu")
    actual = torch.as_tensor(exported(images))
    assert torch.allclose(actual, expected, atol=TOLERANCE, rtol=0), float((actual - expected).abs().max())


def test_a_gated_model_learns_to_leave_empty_slices_empty(tmp_path):
    """Training with empty slices: the presence logit of empty val slices ends below that of tumor slices, and the
    slice decision is calibrated and stored as for any model."""
    overrides = ["data=synthetic_empty", "data.synthetic.n=64", "data.synthetic.size=64", "data.batch_size=8",
                 f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "data.num_workers=0", "trainer.max_epochs=6",
                 "model.net.presence_gate=true",
                 "model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "decision.target_false_alarm_rate=0.25",
                 "callbacks.early_stopping=null"]
    torch.manual_seed(0)
    saved = train(compose_train(overrides, tmp_path / "run"))
    assert math.isfinite(saved["best_val_dice"])
    stored = torch.load(saved["best_checkpoint"], map_location="cpu", weights_only=True)[DECISION_KEY]
    assert stored["calibration"]["split"] == "val" and stored["calibration"]["false_alarm_rate"] <= 0.25
    module = load_module(saved["best_checkpoint"])
    assert isinstance(module.net, PresenceGated)
    datamodule = instantiate(compose_train(overrides, tmp_path / "run").data)
    datamodule.setup("validate")
    presence, has_tumor = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            raw = module.net.net(standardize(batch["image"]))["out"]
            presence.append(presence_logits(raw))
            has_tumor.append(batch["mask"].flatten(1).amax(dim=1) > 0)
    presence, has_tumor = torch.cat(presence), torch.cat(has_tumor)
    assert has_tumor.any() and (~has_tumor).any()
    assert presence[has_tumor].mean() > presence[~has_tumor].mean()
