"""Export to ONNX and TorchScript: parity with PyTorch for every architecture, the embedded contract, CLI, errors."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bts_lightning.checkpoint import load_module
from bts_lightning.errors import BtsError, ConfigError, OutputError
from bts_lightning.export import export, export_model, probability_model, resolve_format
from bts_lightning.inference import (
    ONNX_CONTRACT_KEY,
    TORCHSCRIPT_CONTRACT_FILE,
    ExportedModel,
    ModelContract,
    load_predictor,
    predict_probabilities,
)
from bts_lightning.preprocessing import blank
from bts_lightning.runtime import CONFIG_DIR
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import build_module
from tests.conftest import REPO_ROOT, compose_train

# Parity of every registered architecture is in tests/test_model_contract.py; here, the format details.
ARCHITECTURES = ["unet", "lraspp"]
SIZE = 64
TOLERANCE = 1e-4


def _write_checkpoint(name: str, directory: Path) -> Path:
    """A randomly initialised module saved the way Lightning saves it (no training needed)."""
    torch.manual_seed(0)
    module = build_module(compose_train([f"model={name}", "loss=dice_ce", "optimizer=adamw"], directory))
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
    exported = load_predictor(path)
    assert exported.format == "onnx" and "CPUExecutionProvider" in exported.providers
    _assert_parity(module, exported, [(1, SIZE, SIZE), (3, SIZE, SIZE), (2, 96, 128)])
    # Intensity scale does not matter: standardization is inside the graph.
    images = _images(2)
    assert torch.allclose(exported(images), exported(images / 255.0), atol=TOLERANCE)


def test_blank_slices_get_an_empty_mask_in_every_format(trained, tmp_path):
    """A slice of one value (black scan ends) standardizes to zeros, on which checkpoint and ONNX runtime disagree:
    every format gives it probability 0; the image beside it in the batch is untouched."""
    module, path = trained
    images = torch.cat([torch.zeros(1, 1, SIZE, SIZE), torch.full((1, 1, SIZE, SIZE), 7.0), _images(1)])
    assert blank(images).tolist() == [True, True, False]
    assert blank(torch.stack([torch.zeros(SIZE, SIZE), torch.rand(SIZE, SIZE)])[None]).tolist() == [False]
    checkpoint = load_predictor(path)
    for predictor in (checkpoint, *(load_predictor(export_model(module, tmp_path / f"model{suffix}", image_size=SIZE))
                                    for suffix in (".onnx", ".pt"))):
        for tta in (False, True):
            probabilities = predict_probabilities(predictor, images, tta=tta)
            assert not probabilities[:2].any()
            assert torch.allclose(probabilities[2], predict_probabilities(checkpoint, images[2:], tta=tta)[0],
                                  atol=TOLERANCE)


def test_torchscript_matches_pytorch(trained, tmp_path):
    module, _ = trained
    path = export_model(module, tmp_path / "model.pt", image_size=SIZE)
    exported = load_predictor(path)
    assert exported.format == "torchscript"
    _assert_parity(module, exported, [(1, SIZE, SIZE), (3, SIZE, SIZE)])


def test_export_leaves_the_module_unchanged(tmp_path):
    module = load_module(_write_checkpoint("fcn", tmp_path))
    export_model(module, tmp_path / "fcn.pt", image_size=SIZE)
    assert module.net.aux_classifier is not None and "aux" in module.train()(_images(2))  # the head still trains


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_an_export_that_fails_its_check_leaves_the_previous_file(tmp_path, monkeypatch, suffix):
    import bts_lightning.export as export_module

    checkpoint = _write_checkpoint("unet", tmp_path)
    output = tmp_path / "out" / f"model{suffix}"
    cfg = _compose_export([f"ckpt_path={checkpoint}", f"output={output}", f"image_size={SIZE}"], tmp_path / "run")
    export(cfg)
    good = output.read_bytes()
    monkeypatch.setattr(export_module, "agreement", lambda *args, **kwargs: export_module.Agreement(0.5, 0.5, 0.0))
    with pytest.raises(BtsError, match=f"disagrees with PyTorch .*; {output} was not replaced"):
        export(cfg)
    assert output.read_bytes() == good and [p.name for p in output.parent.iterdir()] == [output.name]


def test_a_space_export_that_fails_leaves_the_previous_bundle_whole(tmp_path, monkeypatch):
    """Re-exporting another model into a Space folder replaces all its files or none: a failed check or a failure while
    the files are written (a full disk) must not leave the new model under the old card, or half the examples."""
    pytest.importorskip("gradio")
    import bts_lightning.export as export_module
    from bts_lightning import runtime

    first = _write_checkpoint("unet", tmp_path)
    bundle = tmp_path / "space"
    export(_compose_export([f"ckpt_path={first}", "format=space", f"output={bundle}", f"image_size={SIZE}"],
                           tmp_path / "run"))
    before = {path.relative_to(bundle): path.read_bytes() for path in sorted(bundle.rglob("*")) if path.is_file()}
    assert {"model.onnx", "README.md", "app.py"} <= {path.as_posix() for path in before}
    second = tmp_path / "other.ckpt"  # other weights: a partly replaced model.onnx would show
    checkpoint = torch.load(first, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {key: value + 0.01 if value.is_floating_point() else value
                                for key, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, second)
    cfg = _compose_export([f"ckpt_path={second}", "format=space", f"output={bundle}", f"image_size={SIZE}"],
                          tmp_path / "run")
    with monkeypatch.context() as patched:
        patched.setattr(export_module, "agreement", lambda *args, **kwargs: export_module.Agreement(0.5, 0.5, 0.0))
        with pytest.raises(BtsError, match=f"disagrees with PyTorch .*; {bundle} was not replaced"):
            export(cfg)
    assert {path.relative_to(bundle): path.read_bytes() for path in sorted(bundle.rglob("*")) if path.is_file()} == before

    real_fsync = runtime._fsync

    def full_disk_at_the_examples(path):
        if path.parent.name == "examples":  # staged after model.onnx, app.py and requirements.txt
            raise OSError(28, "No space left on device")
        real_fsync(path)

    with monkeypatch.context() as patched:
        patched.setattr(runtime, "_fsync", full_disk_at_the_examples)
        with pytest.raises(OutputError, match=r"Could not write .*examples.*: No space left on device"):
            export(cfg)
    assert {path.relative_to(bundle): path.read_bytes() for path in sorted(bundle.rglob("*")) if path.is_file()} == before
    export(cfg)
    assert (bundle / "model.onnx").read_bytes() != before[Path("model.onnx")]
    fresh = _compose_export([f"ckpt_path={second}", "format=space", f"output={tmp_path / 'new_space'}",
                             f"image_size={SIZE}"], tmp_path / "run")
    with monkeypatch.context() as patched:  # a failed first export leaves no folder behind
        patched.setattr(runtime, "_fsync", full_disk_at_the_examples)
        with pytest.raises(OutputError):
            export(fresh)
    assert not (tmp_path / "new_space").exists()


def test_an_output_that_is_a_folder_is_one_error_naming_it(tmp_path):
    checkpoint = _write_checkpoint("unet", tmp_path)
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    cfg = _compose_export([f"ckpt_path={checkpoint}", f"output={folder}", f"image_size={SIZE}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=f"output={folder} is a folder; name the file to write, e.g. "
                                          f"output={folder / 'model.onnx'}"):
        export(cfg)
    assert not any(folder.iterdir())


@pytest.mark.slow  # a subprocess (~10 s); export(cfg) runs in-process in the quick tier
def test_cli_exports_a_checkpoint(tmp_path):
    checkpoint = _write_checkpoint("unet", tmp_path)
    output = tmp_path / "out" / "unet.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "bts_lightning.export", f"ckpt_path={checkpoint}", "format=onnx", f"output={output}",
         f"image_size={SIZE}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in output.parent.iterdir()] == ["unet.onnx"]  # no temporary files left
    assert "max |difference| vs PyTorch" in (tmp_path / "run" / "export.log").read_text()
    _assert_parity(load_module(checkpoint), load_predictor(output), [(1, SIZE, SIZE), (3, SIZE, SIZE)])


def _compose_export(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="export", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_default_output_goes_to_the_run_directory(tmp_path):
    checkpoint = _write_checkpoint("lraspp", tmp_path)
    cfg = _compose_export([f"ckpt_path={checkpoint}", "format=torchscript", f"image_size={SIZE}"], tmp_path / "run")
    summary = export(cfg)
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
    for exporter in ("legacy", "dynamo"):  # an opset the exporter cannot write: one line, no file
        with pytest.raises(ConfigError, match=rf"^opset=99: the {exporter} ONNX exporter of this PyTorch writes "
                                              r"opsets up to \d+; use opset=17 \(the default\) to \d+\.$"):
            export(_compose_export([f"ckpt_path={checkpoint}", "opset=99", f"onnx_exporter={exporter}",
                                    f"output={tmp_path / 'x.onnx'}"], tmp_path))
    assert not (tmp_path / "x.onnx").exists()


def test_format_follows_the_output_suffix():
    assert resolve_format(None, "a/model.pt") == "torchscript"
    assert resolve_format(None, "model.ts") == "torchscript"
    assert resolve_format(None, "model.onnx") == "onnx"
    assert resolve_format(None, None) == "onnx"
    with pytest.raises(ConfigError, match="does not end in .onnx"):
        resolve_format("onnx", "model.pt")


def test_loading_exported_files_errors(tmp_path, monkeypatch):
    with pytest.raises(BtsError, match="missing.onnx does not exist"):
        load_predictor(tmp_path / "missing.onnx")
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported model file type '.h5'"):
        load_predictor(tmp_path / "model.h5")
    with pytest.raises(BtsError, match="unknown format '.h5'"):
        ExportedModel(tmp_path / "model.h5")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(BtsError, match="broken.onnx could not be loaded by onnxruntime"):
        load_predictor(tmp_path / "broken.onnx")
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(BtsError, match="broken.pt could not be loaded as TorchScript"):
        load_predictor(tmp_path / "broken.pt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BtsError, match=r"broken.onnx needs onnxruntime: pip install 'bts_lightning\[export\]'"):
        load_predictor(tmp_path / "broken.onnx")


def test_export_does_not_load_and_inference_does_not_import_export():
    """One inference boundary: bts_lightning.inference reads model files, bts_lightning.export only writes them."""
    tree = ast.parse((REPO_ROOT / "bts_lightning" / "inference.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("export" in name for name in imported), imported  # not even lazily, inside a function
    import bts_lightning.export as export_module

    assert not hasattr(export_module, "ExportedModel") and not hasattr(export_module, "load_exported")


# ---------------------------------------------------------------- the contract travels with the file


def _checkpoint_trained_at(name: str, directory: Path, image_size: int) -> Path:
    """A checkpoint whose data module was trained at ``image_size`` (as bts_lightning.train stores it)."""
    path = _write_checkpoint(name, directory)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {"image_size": image_size}
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_files_carry_the_contract(suffix, tmp_path):
    checkpoint = _checkpoint_trained_at("unet", tmp_path, 48)
    output = tmp_path / "elsewhere" / f"model{suffix}"
    summary = export(_compose_export([f"ckpt_path={checkpoint}", f"output={output}"], tmp_path / "run"))
    expected = ModelContract(image_size=48, in_channels=1, num_classes=2, model="unet")
    assert load_predictor(checkpoint, "cpu").contract == expected
    assert summary["contract"] == expected.to_dict() and summary["model"] == "unet"
    assert summary["max_abs_difference"] <= TOLERANCE  # verified at the training size (image_size=null)
    checkpoint.unlink()  # the file alone carries it
    assert load_predictor(output, "cpu").contract == expected
    # Stored where other tools can read it: ONNX metadata_props, a TorchScript extra file.
    if suffix == ".onnx":
        import onnx

        props = {entry.key: entry.value for entry in onnx.load(str(output)).metadata_props}
        stored = props[ONNX_CONTRACT_KEY]
    else:
        extra = {TORCHSCRIPT_CONTRACT_FILE: ""}
        torch.jit.load(str(output), _extra_files=extra)
        stored = extra[TORCHSCRIPT_CONTRACT_FILE]
    assert ModelContract.from_json(stored) == expected
    assert json.loads(stored)["normalization"].startswith("per-image z-score")


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_fixed_size_networks_export_at_one_size_and_resize_other_slices(suffix, tmp_path, caplog):
    """A network with ``dynamic_size = False`` (SwinUNETR) is exported at ``image_size`` only, which the contract
    records; its predictor resizes other slices to that size and the probabilities back."""
    module = load_module(_write_checkpoint("unet", tmp_path))
    module.net.dynamic_size = False
    with caplog.at_level(logging.WARNING, logger="bts_lightning.export"):
        path = export_model(module, tmp_path / f"model{suffix}", image_size=32, contract=ModelContract(image_size=48))
    assert "Exporting at image_size=32, but the model was trained at 48 px" in caplog.text
    predictor = load_predictor(path, "cpu")
    assert predictor.contract == ModelContract(image_size=32, fixed_size=True)
    if suffix == ".onnx":
        import onnx

        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [dim.dim_param or dim.dim_value for dim in dims] == ["batch", 1, 32, 32]
    _assert_parity(module, predictor, [(3, 32, 32)])
    images = _images(2, 48, 40)
    resized = module.predict_probabilities(torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear"))
    expected = torch.nn.functional.interpolate(resized[:, None], size=(48, 40), mode="bilinear")[:, 0]
    assert torch.allclose(predictor(images), expected, atol=TOLERANCE, rtol=0)


def test_old_exports_without_a_contract_still_load(tmp_path, caplog):
    import onnx

    module = load_module(_write_checkpoint("lraspp", tmp_path))
    onnx_path = export_model(module, tmp_path / "old.onnx", image_size=SIZE)
    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    onnx.save(proto, str(onnx_path))
    script_path = tmp_path / "old.pt"
    torch.jit.save(torch.jit.trace(probability_model(module), (_images(1),), check_trace=False), str(script_path))
    for path in (onnx_path, script_path):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bts_lightning.inference"):
            predictor = load_predictor(path, "cpu")
        assert predictor.contract == ModelContract() and predictor.contract.image_size is None
        assert f"{path} carries no bts_lightning contract" in caplog.text
        _assert_parity(module, predictor, [(2, SIZE, SIZE)])


def test_a_corrupt_contract_is_a_clear_error(tmp_path):
    module = load_module(_write_checkpoint("lraspp", tmp_path))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(probability_model(module), (_images(1),), check_trace=False), str(path),
                   _extra_files={TORCHSCRIPT_CONTRACT_FILE: "{not json"})
    with pytest.raises(BtsError, match="model.pt has an unreadable bts_lightning contract"):
        load_predictor(path, "cpu")


def test_contract_json_round_trip_and_checks():
    contract = ModelContract(image_size=256, in_channels=1, num_classes=2, model="deeplabv3")
    assert ModelContract.from_json(contract.to_json()) == contract
    assert ModelContract.from_json(b'{"image_size": 96, "future_key": 1}') == ModelContract(image_size=96)
    with pytest.raises(ValueError, match="newer than this bts_lightning reads"):
        ModelContract.from_json(json.dumps({**contract.to_dict(), "format_version": 99}))
    assert not ModelContract.from_json(b'{"image_size": 96}').fixed_size  # contracts from before fixed_size
    for bad in ('[1, 2]', '{"image_size": -3}', '{"image_size": true}', '{"tumor_class": 2}', '{"fixed_size": true}'):
        with pytest.raises(ValueError):
            ModelContract.from_json(bad)
