"""Export to ONNX and TorchScript: parity with PyTorch for every architecture, CLI and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from bts_lightning.checkpoint import load_module
from bts_lightning.errors import BtsError, ConfigError
from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.export import export, export_model, load_exported, resolve_format
from bts_lightning.segmentation_module import SegmentationModule
from tests.conftest import REPO_ROOT

ARCHITECTURES = ["unet", "deeplabv3", "fcn", "lraspp"]
SIZE = 64
TOLERANCE = 1e-4


def _config(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / group / f"{name}.yaml"))


def _write_checkpoint(name: str, directory: Path) -> Path:
    """A randomly initialised module saved the way Lightning saves it (no training needed)."""
    torch.manual_seed(0)
    module = SegmentationModule(_config("model", name), _config("loss", "dice_ce"), _config("optimizer", "adamw"))
    path = directory / f"{name}.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": lightning.__version__},
        path,
    )
    return path


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, tmp_path_factory) -> tuple[SegmentationModule, Path]:
    """(module loaded from its checkpoint, checkpoint path) for each architecture."""
    directory = tmp_path_factory.mktemp(request.param)
    path = _write_checkpoint(request.param, directory)
    return load_module(path), path


def _images(batch: int, height: int = SIZE, width: int = SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, height, width, generator=generator) * 255  # uint8-like scale


def _assert_parity(module: SegmentationModule, exported, shapes) -> None:
    for seed, (batch, height, width) in enumerate(shapes):
        images = _images(batch, height, width, seed)
        expected = module.predict_probabilities(images)
        actual = exported(images)
        assert actual.shape == (batch, height, width) and actual.dtype == torch.float32
        assert torch.allclose(actual, expected, atol=TOLERANCE, rtol=0), (
            f"batch {batch} {height}x{width}: max difference {(actual - expected).abs().max():.3g}"
        )


def test_onnx_matches_pytorch_for_dynamic_batch_and_size(trained, tmp_path):
    module, _ = trained
    path = export_model(module, tmp_path / "model.onnx", image_size=SIZE)
    exported = load_exported(path)
    assert exported.format == "onnx" and "CPUExecutionProvider" in exported.providers
    _assert_parity(module, exported, [(1, SIZE, SIZE), (3, SIZE, SIZE), (2, 96, 128)])
    # Intensity scale does not matter: standardization is inside the graph.
    images = _images(2)
    assert torch.allclose(exported(images), exported(images / 255.0), atol=TOLERANCE)


def test_torchscript_matches_pytorch(trained, tmp_path):
    module, _ = trained
    path = export_model(module, tmp_path / "model.pt", image_size=SIZE)
    exported = load_exported(path)
    assert exported.format == "torchscript"
    _assert_parity(module, exported, [(1, SIZE, SIZE), (3, SIZE, SIZE)])


def test_export_leaves_the_module_unchanged(tmp_path):
    module = load_module(_write_checkpoint("fcn", tmp_path))
    export_model(module, tmp_path / "fcn.pt", image_size=SIZE)
    assert module.net.aux_classifier is not None and "aux" in module(_images(1))


def test_cli_exports_a_checkpoint(tmp_path):
    checkpoint = _write_checkpoint("unet", tmp_path)
    output = tmp_path / "out" / "unet.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "bts_lightning.export", f"ckpt_path={checkpoint}", "format=onnx", f"output={output}",
         f"image_size={SIZE}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in output.parent.iterdir()] == ["unet.onnx"]  # no temporary files left
    assert "max |difference| vs PyTorch" in (tmp_path / "run" / "export.log").read_text()
    _assert_parity(load_module(checkpoint), load_exported(output), [(1, SIZE, SIZE), (3, SIZE, SIZE)])


def _compose_export(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="export", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_default_output_goes_to_the_run_directory(tmp_path):
    checkpoint = _write_checkpoint("lraspp", tmp_path)
    summary = export(_compose_export([f"ckpt_path={checkpoint}", "format=torchscript", f"image_size={SIZE}"], tmp_path / "run"))
    assert summary["output"] == str(tmp_path / "run" / "model.pt") and summary["max_abs_difference"] <= TOLERANCE


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        export(_compose_export([], tmp_path))
    with pytest.raises(ConfigError, match="format='tflite'"):
        export(_compose_export(["ckpt_path=x.ckpt", "format=tflite"], tmp_path))
    with pytest.raises(BtsError, match="does not exist"):
        export(_compose_export([f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path))
    checkpoint = _write_checkpoint("unet", tmp_path)
    with pytest.raises(ConfigError, match="does not run on 50x50"):
        export(_compose_export([f"ckpt_path={checkpoint}", "image_size=50"], tmp_path))


def test_format_follows_the_output_suffix():
    assert resolve_format(None, "a/model.pt") == "torchscript"
    assert resolve_format(None, "model.ts") == "torchscript"
    assert resolve_format(None, "model.onnx") == "onnx"
    assert resolve_format(None, None) == "onnx"
    with pytest.raises(ConfigError, match="does not end in .onnx"):
        resolve_format("onnx", "model.pt")


def test_load_exported_errors(tmp_path, monkeypatch):
    with pytest.raises(BtsError, match="does not exist"):
        load_exported(tmp_path / "missing.onnx")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(BtsError, match="unknown format '.h5'"):
        load_exported(tmp_path / "model.h5")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(BtsError, match="could not be loaded by onnxruntime"):
        load_exported(tmp_path / "broken.onnx")
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(BtsError, match="could not be loaded as TorchScript"):
        load_exported(tmp_path / "broken.pt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BtsError, match=r'pip install -e "\.\[export\]"'):
        load_exported(tmp_path / "broken.onnx")
