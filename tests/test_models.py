"""Tests for the model registry, builders and the offline pretrained-weights path."""

from __future__ import annotations

import io
import os
import re
from http.client import HTTPMessage
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.error import URLError

import pytest
import torch
import torch.hub
from torchvision.models import WeightsEnum
from torchvision.models import segmentation as tvseg

from bts_lightning.errors import ConfigError, WeightsUnavailableError
from bts_lightning.models import MODELS, available_models, backbone_of, build_model, check_input_size
from bts_lightning.segmentation_module import SegmentationModule

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are not evaluated at run time

REAL_DOWNLOAD = torch.hub.download_url_to_file


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty TORCH_HOME per test, and a download that always fails (no network use)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any earlier torch.hub.set_dir

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        raise URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _cache(checkpoints: Path, weights: WeightsEnum, state: dict) -> Path:
    path = checkpoints / os.path.basename(weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_registry_lists_models() -> None:
    assert {"attention_unet", "deeplabv3", "fcn", "lraspp", "segresnet", "swin_unetr", "unet", "unetpp"} <= set(
        available_models()
    )
    assert available_models() == sorted(MODELS)


@pytest.mark.parametrize("name", ["unet", "deeplabv3", "fcn", "lraspp"])
def test_output_shapes(name: str) -> None:
    model = build_model(name)
    expected = {"out", "aux"} if name in ("deeplabv3", "fcn") else {"out"}
    for size in [(64, 64), (64, 96)]:
        for training, keys in ((True, expected), (False, {"out"})):  # auxiliary heads: training only
            with torch.no_grad():
                out = model.train(training)(torch.randn(2, 1, *size))
            assert set(out) == keys
            for logits in out.values():
                assert logits.shape == (2, 2, *size)


@pytest.mark.parametrize("name", ["deeplabv3", "fcn"])
def test_auxiliary_head_is_not_computed_in_eval(name: str) -> None:
    model = build_model(name).eval()
    calls = []
    model.aux_classifier.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        out = model(x)["out"]
        reference = tvseg.DeepLabV3.forward(model, x) if name == "deeplabv3" else tvseg.FCN.forward(model, x)
    assert len(calls) == 1  # only torchvision's own forward ran it
    assert torch.equal(out, reference["out"])  # the same segmentation as torchvision's forward
    plain = getattr(tvseg, f"{name}_resnet50")(num_classes=2, weights=None, weights_backbone=None, aux_loss=True)
    assert set(model.state_dict()) == set(plain.state_dict())  # checkpoints of either load into the other


def test_unet_train_mode_kwargs_and_no_backbone() -> None:
    model = build_model("unet", num_classes=3, channels=(8, 16, 32), strides=(2, 2), dropout=0.1)
    out = model(torch.randn(2, 1, 32, 48))
    assert out["out"].shape == (2, 3, 32, 48)
    assert backbone_of(model) is None


def test_torchvision_backbone_exposed_and_in_channels() -> None:
    model = build_model("lraspp", in_channels=4).eval()
    assert backbone_of(model) is model.backbone
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 64))["out"].shape == (1, 2, 64, 64)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ConfigError, match="'segformer'.*attention_unet, deeplabv3, fcn, lraspp"):
        build_model("segformer")


def test_unknown_option_is_config_error() -> None:
    with pytest.raises(ConfigError, match="lraspp"):
        build_model("lraspp", channels=(8, 16))


@pytest.mark.parametrize("name", ["unet", "attention_unet", "unetpp", "swin_unetr", "segresnet"])
def test_models_without_pretrained_weights_reject_weights(name: str) -> None:
    with pytest.raises(ConfigError, match=r"exist only for deeplabv3, fcn, lraspp\b") as info:
        build_model(name, weights="DEFAULT")
    assert f"Model {name!r} has no pretrained weights" in str(info.value)
    listed = str(info.value).split("exist only for ")[1].split(". Use")[0].split(", ")
    assert name not in listed


def test_unetpp_deep_supervision_is_auxiliary_in_training_only() -> None:
    model = build_model("unetpp", features=(4, 4, 8, 8, 16, 4))
    out = model(torch.randn(2, 1, 32, 48))
    assert len(out["aux"]) == 3 and all(aux.shape == (2, 2, 32, 48) for aux in out["aux"])
    with torch.no_grad():
        assert set(model.eval()(torch.randn(2, 1, 32, 48))) == {"out"}
    plain = build_model("unetpp", features=(4, 4, 8, 8, 16, 4), deep_supervision=False)
    assert set(plain(torch.randn(1, 1, 32, 32))) == {"out"}
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "options", "multiple"),
    [("attention_unet", {"channels": (4, 8, 16), "strides": (2, 2)}, 4), ("swin_unetr", {"feature_size": 12}, 32),
     ("segresnet", {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}, 4)],
)
def test_input_size_rules(name: str, options: dict, multiple: int) -> None:
    model = build_model(name, **options)
    assert model.size_multiple == multiple
    check_input_size(model, 4 * multiple, "data.image_size")
    with pytest.raises(ConfigError, match=rf"data.image_size={5 * multiple + 2} is not a multiple of {multiple}"):
        check_input_size(model, 5 * multiple + 2, "data.image_size")
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, multiple, 2 * multiple))["out"].shape == (1, 2, multiple, 2 * multiple)


def test_monai_option_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.net.feature_size=16 must be a multiple of 12"):
        build_model("swin_unetr", feature_size=16)
    with pytest.raises(ConfigError, match=r"model.net.blocks_up=\[1\] needs one entry fewer"):
        build_model("segresnet", blocks_down=(1, 2, 2), blocks_up=(1,))


def test_auxiliary_outputs_share_the_auxiliary_weight() -> None:
    """A tensor ``aux`` adds ``aux_loss_weight`` times its loss; a list shares that weight evenly."""
    module = SegmentationModule(
        net={"_target_": "bts_lightning.models.build_model", "name": "unet", "channels": [4, 8], "strides": [2]},
        loss={"_target_": "torch.nn.L1Loss"}, optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        aux_loss_weight=0.5,
    )
    module.criterion = _MeanLogit()
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    out, aux = torch.full((1, 2, 4, 4), 1.0), [torch.full((1, 2, 4, 4), value) for value in (2.0, 4.0)]
    assert float(module.compute_loss({"out": out}, masks)) == 1.0
    assert float(module.compute_loss({"out": out, "aux": aux[0]}, masks)) == 1.0 + 0.5 * 2.0
    assert float(module.compute_loss({"out": out, "aux": aux}, masks)) == 1.0 + 0.25 * 2.0 + 0.25 * 4.0


class _MeanLogit(torch.nn.Module):
    """A stand-in loss: the mean logit, so each output's share of the total is visible."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits.mean()


def test_unknown_weights_name_lists_valid() -> None:
    with pytest.raises(ConfigError, match="COCO_WITH_VOC_LABELS_V1, DEFAULT"):
        build_model("lraspp", weights="IMAGENET1K_V2")


def test_lraspp_loads_cached_pretrained(offline_hub: Path) -> None:
    state = tvseg.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21
    ).state_dict()
    state["backbone.0.0.weight"] = torch.arange(16 * 3 * 9, dtype=torch.float32).view(16, 3, 3, 3)
    state["backbone.1.block.0.0.weight"].fill_(0.25)
    _cache(offline_hub, tvseg.LRASPP_MobileNet_V3_Large_Weights.DEFAULT, state)

    model = build_model("lraspp", weights="DEFAULT").eval()
    loaded = model.state_dict()
    assert loaded["backbone.0.0.weight"].shape == (16, 1, 3, 3)
    torch.testing.assert_close(
        loaded["backbone.0.0.weight"], state["backbone.0.0.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(
        loaded["backbone.1.block.0.0.weight"], state["backbone.1.block.0.0.weight"]
    )
    torch.testing.assert_close(
        loaded["classifier.cbr.0.weight"], state["classifier.cbr.0.weight"]
    )
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 96))["out"].shape == (1, 2, 64, 96)


def test_deeplabv3_loads_cached_pretrained(offline_hub: Path) -> None:
    state = tvseg.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()
    state["backbone.conv1.weight"].normal_()
    state["backbone.layer4.2.conv3.weight"].fill_(0.5)
    _cache(offline_hub, tvseg.DeepLabV3_ResNet50_Weights.DEFAULT, state)

    model = build_model("deeplabv3", weights="COCO_WITH_VOC_LABELS_V1").train()  # auxiliary head: training only
    loaded = model.state_dict()
    torch.testing.assert_close(
        loaded["backbone.conv1.weight"], state["backbone.conv1.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(
        loaded["backbone.layer4.2.conv3.weight"], state["backbone.layer4.2.conv3.weight"]
    )
    assert loaded["classifier.4.weight"].shape[0] == 2
    assert loaded["aux_classifier.4.weight"].shape[0] == 2
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 96))  # 2: training-mode batch norm after global pooling
    assert out["out"].shape == out["aux"].shape == (2, 2, 64, 96)


def test_missing_weights_offline_raises_with_path(offline_hub: Path) -> None:
    weights = tvseg.DeepLabV3_ResNet50_Weights.DEFAULT
    expected = offline_hub / os.path.basename(weights.url)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("deeplabv3", weights="DEFAULT")
    message = str(info.value)
    assert str(expected) in message
    assert weights.url in message
    assert "model.net.weights=null" in message
    assert list(offline_hub.iterdir()) == []


def test_corrupt_cached_file_is_weights_error(offline_hub: Path) -> None:
    path = _cache(offline_hub, tvseg.LRASPP_MobileNet_V3_Large_Weights.DEFAULT, {})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(path))):
        build_model("lraspp", weights="DEFAULT")


class _DroppedConnection(io.BytesIO):
    """HTTP response that sends some bytes, then fails."""

    def __enter__(self) -> Self:
        return self

    def info(self) -> HTTPMessage:
        return HTTPMessage()

    def read(self, size: int = -1) -> bytes:
        if self.tell() == 0:
            return super().read(4)
        raise ConnectionResetError("connection dropped")


def test_interrupted_download_leaves_no_partial_file(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", REAL_DOWNLOAD)
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: _DroppedConnection(b"partial data"))
    with pytest.raises(WeightsUnavailableError, match="ConnectionResetError"):
        build_model("lraspp", weights="DEFAULT")
    assert list(offline_hub.iterdir()) == []
