"""The contract every registered model passes (in the style of segmentation_models_pytorch's per-model tests).

A model added to the registry (``bts_lightning.models.register_model``) with its ``conf/model/<name>.yaml``
is picked up here automatically: it must train (forward and backward at two input sizes, with 1 and 3
input channels, the loss reaching every trainable parameter), survive a checkpoint round trip, and
export to ONNX and TorchScript files whose probabilities match PyTorch's (a fixed-size export, at its
size, and resized from other sizes).
"""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from torch.nn.functional import interpolate

from bts_lightning.checkpoint import load_module
from bts_lightning.export import export_model
from bts_lightning.inference import load_predictor
from bts_lightning.models import available_models
from bts_lightning.models.presence import PresenceGated
from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import build_module
from tests.conftest import compose_train

SIZES = ((64, 64), (64, 96))  # square and not: every model takes both (U-Net: multiples of 16)
TOLERANCE = 1e-4


def _images(batch: int, height: int, width: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, height, width), generator=generator, dtype=torch.uint8)


def _masks(batch: int, height: int, width: int) -> torch.Tensor:
    masks = torch.zeros(batch, height, width, dtype=torch.uint8)
    masks[:, height // 4 : height // 2, width // 4 : width // 2] = 1
    return masks


def _all_logits(outputs: dict) -> list[torch.Tensor]:
    """``out`` and every auxiliary output (``aux``: one tensor or a list of them)."""
    aux = outputs.get("aux", [])
    return [outputs["out"], *([aux] if isinstance(aux, torch.Tensor) else aux)]


def _train_step(module: SegmentationModule, images: torch.Tensor) -> None:
    """Forward and backward on ``images``: logits of the right shapes, the loss reaching every trainable parameter."""
    module.train()
    module.zero_grad()
    batch, _, height, width = images.shape
    outputs = module(images)
    assert "out" in outputs and set(outputs) <= {"out", "aux", "factors"}
    assert outputs["out"].shape == (batch, 2, height, width) and outputs["out"].dtype == torch.float32
    # A presence-gated network (model.net.presence_gate) also returns its raw outputs, with a presence channel.
    raw_channels = 3 if isinstance(module.net, PresenceGated) else 2
    assert ("factors" in outputs) == (raw_channels == 3)
    for logits in [*_all_logits(outputs)[1:], *([outputs["factors"]] if "factors" in outputs else [])]:
        assert logits.shape == (batch, raw_channels, height, width) and logits.dtype == torch.float32
    loss = module.compute_loss(outputs, _masks(batch, height, width))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"
    module.eval()


# Models whose contract (exports above all) takes over 15 s on 2 CPU cores run in the full suite only
# (ResNet-50 networks; UNet++ and SwinUNETR, ~17-45 s; smp models, ~45-70 s with resnet34); the quick tier
# checks the other registered models.
HEAVY_MODELS = {"deeplabv3", "fcn", "unetpp", "swin_unetr", "smp_unet", "smp_unetpp", "smp_deeplabv3plus"}
# Options the contract builds a model with on top of its conf/model/<name>.yaml. The smp wrapper, its heads
# and its export do not depend on the encoder, so the contract uses resnet18 (half of resnet34's layers and
# export time); tests/test_smp_models.py builds resnet34, efficientnet-b0 and a timm (tu-) encoder.
CONTRACT_OPTIONS = {name: ["model.net.encoder=resnet18"] for name in ("smp_unet", "smp_unetpp", "smp_deeplabv3plus")}


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=pytest.mark.slow) if name in HEAVY_MODELS else name
            for name in available_models()],
)
def model_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def module(model_name, tmp_path_factory) -> SegmentationModule:
    torch.manual_seed(0)
    overrides = [f"model={model_name}", *CONTRACT_OPTIONS.get(model_name, [])]
    return build_module(compose_train(overrides, tmp_path_factory.mktemp(model_name)))


@pytest.fixture(scope="module")
def checkpoint(module, model_name, tmp_path_factory) -> Path:
    """The module saved as Lightning saves it (state dict and plain hyperparameters)."""
    path = tmp_path_factory.mktemp(f"{model_name}-ckpt") / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


class TestModelContract:
    def test_has_a_config_named_after_it(self, model_name):
        config = Path(CONFIG_DIR) / "model" / f"{model_name}.yaml"
        assert config.is_file(), f"register {model_name!r} with conf/model/{model_name}.yaml"

    def test_forward_and_backward_at_two_sizes(self, module):
        for height, width in SIZES:
            _train_step(module, _images(2, height, width))

    def test_forward_and_backward_with_three_input_channels(self, model_name, tmp_path):
        torch.manual_seed(0)
        overrides = [f"model={model_name}", "model.net.in_channels=3", *CONTRACT_OPTIONS.get(model_name, [])]
        module = build_module(compose_train(overrides, tmp_path))
        _train_step(module, _images(2, *SIZES[0], channels=3))

    def test_probabilities_are_tumor_softmax_per_pixel(self, module):
        module.eval()
        probabilities = module.predict_probabilities(_images(3, *SIZES[1]))
        assert probabilities.shape == (3, *SIZES[1])
        assert float(probabilities.min()) >= 0.0 and float(probabilities.max()) <= 1.0

    def test_checkpoint_round_trip(self, module, checkpoint):
        loaded = load_module(checkpoint)
        assert not loaded.training and dict(loaded.hparams)["net"] == dict(module.hparams)["net"]
        module.eval()
        images = _images(2, *SIZES[0], seed=1)
        assert torch.allclose(loaded.predict_probabilities(images), module.predict_probabilities(images), atol=1e-6)

    @pytest.mark.parametrize("suffix", [".onnx", ".pt"])
    def test_export_matches_pytorch(self, module, checkpoint, suffix, tmp_path):
        """Same probabilities at every size; a fixed-size export (``fixed_size``) matches PyTorch on slices
        resized to its size, with the probabilities resized back."""
        loaded = load_module(checkpoint)
        size = SIZES[0][0]
        exported = load_predictor(export_model(loaded, tmp_path / f"model{suffix}", image_size=size), "cpu")
        fixed = not getattr(loaded.net, "dynamic_size", True)
        assert exported.contract.fixed_size == fixed and exported.contract.image_size == (size if fixed else None)
        for seed, (height, width) in enumerate(SIZES):
            images = _images(2, height, width, seed).float()
            if fixed and (height, width) != (size, size):
                resized = loaded.predict_probabilities(interpolate(images, size=(size, size), mode="bilinear"))
                expected = interpolate(resized[:, None], size=(height, width), mode="bilinear")[:, 0]
            else:
                expected = loaded.predict_probabilities(images)
            actual = torch.as_tensor(exported(images))
            assert actual.shape == expected.shape
            assert torch.allclose(actual, expected, atol=TOLERANCE, rtol=0), float((actual - expected).abs().max())
