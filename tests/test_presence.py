"""model.net.presence_gate: a slice-level "tumor present" output gating the segmentation of any binary model."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from bts_lightning.checkpoint import DECISION_KEY, load_module
from bts_lightning.errors import ConfigError
from bts_lightning.export import export_model
from bts_lightning.inference import load_predictor
from bts_lightning.models import build_model
from bts_lightning.models.presence import PresenceGated, gate
from bts_lightning.preprocessing import standardize
from bts_lightning.train import build_module, train
from tests.conftest import compose_train
from tests.test_model_contract import HEAVY_MODELS, TOLERANCE, _images, _train_step

sigmoid = torch.sigmoid


def test_gate_multiplies_the_slice_presence_by_the_tumor_probability_given_a_tumor():
    """Hand-made logits: q = sigmoid(max of the presence map) * softmax(segmentation)[tumor], as 2-class logits."""
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
    assert q[0, 1, 1].item() == pytest.approx((sigmoid(torch.tensor(2.5)) * sigmoid(torch.tensor(3.0))).item(), rel=1e-5)
    assert q[0, 0, 0].item() == pytest.approx((sigmoid(torch.tensor(2.5)) * sigmoid(torch.tensor(-2.0))).item(), rel=1e-5)
    assert q[1, 1, 1].item() == pytest.approx((sigmoid(torch.tensor(-6.0)) * sigmoid(torch.tensor(3.0))).item(), rel=1e-5)
    assert q[0, 1, 1] > 0.5 > q[1, 1, 1]  # the same tumor pixel, kept on a present slice, emptied on an absent one


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
                                         "loss=dice_ce_slice_tumor"], tmp_path / "run"))
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
                 "model.net.presence_gate=true", "loss=dice_ce_slice_tumor", "loss.weights.slice=1.0",
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
            presence.append(raw[:, 2].flatten(1).amax(dim=1))
            has_tumor.append(batch["mask"].flatten(1).amax(dim=1) > 0)
    presence, has_tumor = torch.cat(presence), torch.cat(has_tumor)
    assert has_tumor.any() and (~has_tumor).any()
    assert presence[has_tumor].mean() > presence[~has_tumor].mean()
