"""The contract every registered model passes (in the style of segmentation_models_pytorch's per-model tests).

A model added to the registry (``bts_lightning.models.register_model``) with its ``conf/model/<name>.yaml``
is picked up here automatically: it must train (forward and backward at two input sizes, the loss
reaching every trainable parameter), survive a checkpoint round trip, and export to ONNX and
TorchScript files whose probabilities match PyTorch's.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from bts_lightning.checkpoint import load_module
from bts_lightning.export import export_model
from bts_lightning.inference import load_predictor
from bts_lightning.models import available_models
from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import build_module
from tests.conftest import compose_train

SIZES = ((64, 64), (64, 96))  # square and not: every model takes both (U-Net: multiples of 16)
TOLERANCE = 1e-4


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 1, height, width), generator=generator, dtype=torch.uint8)


# ResNet-50 networks: their contract (exports above all) takes ~15 s per model on 2 CPU cores, so it
# runs in the full suite only; the quick tier checks the other registered models.
HEAVY_MODELS = {"deeplabv3", "fcn"}


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
    return build_module(compose_train([f"model={model_name}"], tmp_path_factory.mktemp(model_name)))


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
        module.train()
        for height, width in SIZES:
            module.zero_grad()
            images = _images(2, height, width)
            masks = torch.zeros(2, height, width, dtype=torch.uint8)
            masks[:, height // 4 : height // 2, width // 4 : width // 2] = 1
            outputs = module(images)
            assert "out" in outputs and set(outputs) <= {"out", "aux"}
            for logits in outputs.values():
                assert logits.shape == (2, 2, height, width) and logits.dtype == torch.float32
            loss = module.compute_loss(outputs, masks)
            assert loss.ndim == 0 and torch.isfinite(loss)
            loss.backward()
            missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"no gradient reaches {missing[:5]}"
        module.eval()

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
        loaded = load_module(checkpoint)
        exported = load_predictor(export_model(loaded, tmp_path / f"model{suffix}", image_size=SIZES[0][0]), "cpu")
        for seed, (height, width) in enumerate(SIZES):
            images = _images(2, height, width, seed).float()
            expected = loaded.predict_probabilities(images)
            actual = torch.as_tensor(exported(images))
            assert actual.shape == expected.shape
            assert torch.allclose(actual, expected, atol=TOLERANCE, rtol=0), float((actual - expected).abs().max())
