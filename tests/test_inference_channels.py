"""Multi-channel models at the inference boundary: the contract's channels, export, predict on 3-channel TIFFs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import lightning
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from bts_lightning import predict as predict_app
from bts_lightning.checkpoint import DATAMODULE_STATE_KEY, CheckpointError, load_module
from bts_lightning.data.channels import describe_channels, parse_channels
from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.dataset import resize_image
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.export import export, export_model
from bts_lightning.inference import ModelContract, ModulePredictor, load_predictor, predict_probabilities
from bts_lightning.train import build_module, train
from tests.conftest import compose_app, compose_train
from tests.fixtures_checkpoint import TINY_MODEL
from tests.test_layouts import write_suffix_dataset

SIZE = 32  # training size of the checkpoints here (the tiny U-Net takes multiples of 8)
TOLERANCE = 1e-4


def _data(root: Path, channels: str) -> list[str]:
    return ["data=lgg", f"data.root={root}", f"data.channels={channels}", f"data.image_size={SIZE}",
            "data.num_workers=0", "data.num_folds=2", "data.batch_size=4"]


def _save_checkpoint(root: Path, channels: str, path: Path, record: bool = True) -> Path:
    """A randomly initialised tiny U-Net on ``channels``, saved as Lightning saves it (with the data module's state
    when ``record``), without training."""
    cfg = compose_train([*_data(root, channels), *TINY_MODEL], path.parent)
    torch.manual_seed(0)
    module = build_module(cfg)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "datamodule_hyper_parameters": {"image_size": SIZE},
                  "pytorch-lightning_version": lightning.__version__}
    if record:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        checkpoint[DATAMODULE_STATE_KEY] = datamodule.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def lgg_root(tmp_path_factory) -> Path:
    """An LGG-like suffix-layout dataset: 4 patients x 3 slices of 3-channel 32x32 TIFFs (file order RGB)."""
    root = tmp_path_factory.mktemp("lgg")
    write_suffix_dataset(root)
    return root


@pytest.fixture(scope="module")
def flair_checkpoint(lgg_root, tmp_path_factory) -> Path:
    """A checkpoint trained (1 epoch) on the FLAIR channel, ``data.channels=[1]``, the data=lgg default."""
    run = tmp_path_factory.mktemp("flair_run")
    train(compose_train([*_data(lgg_root, "[1]"), *TINY_MODEL, "trainer=cpu", "trainer.max_epochs=1", "logger=csv",
                         "test=false"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def rgb_checkpoint(lgg_root, tmp_path_factory) -> Path:
    """An untrained 3-channel checkpoint (``data.channels=[0,1,2]``) with its split record."""
    return _save_checkpoint(lgg_root, "[0,1,2]", tmp_path_factory.mktemp("rgb") / "model.ckpt")


def _tiff(path: Path, height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    """Write a 3-channel TIFF whose channels differ (PIL writes file order: RGB); returns (3, H, W) in file order."""
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.zeros((height, width), np.uint8), rng.integers(0, 256, (height, width), dtype=np.uint8),
                    np.full((height, width), 200, np.uint8)], axis=-1)
    rgb[:8, :8, 2] = 0  # channel 2 not constant
    rgb[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)  # channel 0: a ramp
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return np.moveaxis(rgb, -1, 0)


class Recorder:
    """Wraps a predictor (keeping its contract) and records every batch and its probabilities."""

    def __init__(self, predictor) -> None:
        self.predictor, self.contract = predictor, predictor.contract
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.as_tensor(self.predictor(images)).cpu()
        self.calls.append((images.clone(), probabilities))
        return probabilities


def _predict(monkeypatch, model: Path, source: Path, out: Path, *overrides: str) -> tuple[dict, Recorder]:
    """Run the predict app on ``source``, recording what its predictor sees."""
    recorders: list[Recorder] = []

    def recording_loader(path, device=None):
        recorders.append(Recorder(load_predictor(path, device)))
        return recorders[-1]

    monkeypatch.setattr(predict_app, "load_predictor", recording_loader)
    cfg = compose_app("predict", [f"ckpt_path={model}", f"input={source}", f"output={out}", "device=cpu",
                                  *overrides], out.parent / "run")
    return predict_app.predict(cfg), recorders[0]


# ---------------------------------------------------------------- the contract


def test_contract_channels_normalize_round_trip_and_match_in_channels():
    contract = ModelContract(image_size=256, in_channels=3, channels=[0, 1, 2], model="unet")
    assert contract.channels == (0, 1, 2) and contract.channel_indices == (0, 1, 2)
    assert contract.to_dict()["channels"] == [0, 1, 2]
    assert ModelContract.from_json(contract.to_json()) == contract
    assert json.loads(contract.to_json())["channels"] == [0, 1, 2]
    flair = ModelContract(channels=[1])
    assert flair.in_channels == 1 and flair.describe_channels() == "channel [1] of each file (file order)"
    assert ModelContract().channels == "gray" and ModelContract().channel_indices is None
    # Contracts from before channels: gray for 1 channel, the first in_channels file channels otherwise.
    assert ModelContract.from_json(b'{"image_size": 96, "in_channels": 1}').channels == "gray"
    assert ModelContract.from_json(b'{"in_channels": 3}').channels == (0, 1, 2)
    with pytest.raises(ValueError, match=r"channels=\[0, 1\] give 2 channel\(s\) but in_channels=1"):
        ModelContract(channels=[0, 1])
    for bad in ('{"channels": "rgb"}', '{"channels": [1, 1]}', '{"channels": 1}', '{"in_channels": 2, "channels": [1]}'):
        with pytest.raises(ValueError):
            ModelContract.from_json(bad)


def test_channels_are_described_and_checked_under_the_key_given():
    assert describe_channels(None) == "each file converted to grayscale"
    assert describe_channels((0, 1, 2)) == "channels [0, 1, 2] of each file (file order)"
    with pytest.raises(ConfigError, match=r"^channels='rgb' is invalid"):
        parse_channels("rgb", "channels")


def test_a_checkpoint_brings_the_channels_it_was_trained_on(flair_checkpoint, rgb_checkpoint, lgg_root, tmp_path,
                                                            caplog):
    assert DATAMODULE_STATE_KEY == BrainTumorDataModule.__qualname__  # where Lightning saves the split record
    copied = tmp_path / "elsewhere.ckpt"  # no run directory near it: the split record carries the channels
    shutil.copy(flair_checkpoint, copied)
    assert load_predictor(copied, "cpu").contract == ModelContract(image_size=SIZE, channels=[1], model="unet")
    assert load_predictor(rgb_checkpoint, "cpu").contract.channels == (0, 1, 2)
    # A 3-channel checkpoint recording no channels: the first three, with a warning.
    bare = _save_checkpoint(lgg_root, "[2,1,0]", tmp_path / "bare.ckpt", record=False)
    with caplog.at_level(logging.WARNING, logger="bts_lightning.inference"):
        assert load_predictor(bare, "cpu").contract.channels == (0, 1, 2)
    assert "records no data.channels; assuming its 3-channel network takes channels [0, 1, 2]" in caplog.text
    # A record whose channels contradict the network.
    broken = torch.load(rgb_checkpoint, map_location="cpu", weights_only=True)
    broken[DATAMODULE_STATE_KEY]["split"]["settings"]["channels"] = [1]
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"broken.ckpt: its data.channels and data.neighbours do not match its network"):
        load_predictor(tmp_path / "broken.ckpt", "cpu")


# ---------------------------------------------------------------- predictors and export


def test_wrong_channel_counts_are_clear_errors(rgb_checkpoint, flair_checkpoint):
    rgb, flair = load_predictor(rgb_checkpoint, "cpu"), load_predictor(flair_checkpoint, "cpu")
    one = torch.zeros(2, 1, SIZE, SIZE)
    expected = r"expected an \(N, 3, H, W\) batch \(channels \[0, 1, 2\] of each file \(file order\)\), got shape"
    for batch in (one, one[:, 0]):
        with pytest.raises(ValueError, match=expected):
            predict_probabilities(rgb, batch)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) batch \(channel \[1\] of each file .*\(2, 3, 32, 32\)"):
        flair(torch.zeros(2, 3, SIZE, SIZE))
    assert predict_probabilities(flair, one[:, 0]).shape == (2, SIZE, SIZE)  # (N, H, W) still works for 1 channel
    assert isinstance(rgb, ModulePredictor) and predict_probabilities(rgb, torch.zeros(2, 3, SIZE, SIZE)).shape == (
        2, SIZE, SIZE)


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_three_channel_exports_match_pytorch_and_carry_their_channels(rgb_checkpoint, suffix, tmp_path):
    output = tmp_path / f"model{suffix}"
    summary = export(compose_app("export", [f"ckpt_path={rgb_checkpoint}", f"output={output}"], tmp_path / "run"))
    assert summary["max_abs_difference"] <= TOLERANCE and summary["contract"]["channels"] == [0, 1, 2]
    exported, module = load_predictor(output, "cpu"), load_module(rgb_checkpoint)
    assert exported.contract == load_predictor(rgb_checkpoint, "cpu").contract
    assert exported.contract.in_channels == 3 and exported.contract.channels == (0, 1, 2)
    if suffix == ".onnx":
        import onnx

        dims = onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim
        assert [dim.dim_param or dim.dim_value for dim in dims] == ["batch", 3, "height", "width"]
    generator = torch.Generator().manual_seed(0)
    for batch, height, width in ((1, SIZE, SIZE), (3, 48, 64)):
        images = torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()
        assert torch.allclose(exported(images), module.predict_probabilities(images), atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match=r"expected an \(N, 3, H, W\) batch \(channels \[0, 1, 2\]"):
        exported(torch.zeros(1, 1, SIZE, SIZE))


def test_export_refuses_a_contract_for_another_channel_count(rgb_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"in_channels=1 \(each file converted to grayscale\), but the network "
                                          r"takes 3 channel\(s\)"):
        export_model(load_module(rgb_checkpoint), tmp_path / "model.onnx", image_size=SIZE, contract=ModelContract())


# ---------------------------------------------------------------- the predict app


def test_predict_feeds_a_three_channel_model_the_file_channels_in_file_order(rgb_checkpoint, tmp_path, monkeypatch):
    source = tmp_path / "in"
    rgb = _tiff(source / "slice.tif")
    summary, recorder = _predict(monkeypatch, rgb_checkpoint, source, tmp_path / "out")
    assert summary["channels"] == [0, 1, 2] and summary["image_size"] == SIZE
    images, probabilities = recorder.calls[-1]  # after check_input_size's blank slice
    expected = torch.from_numpy(resize_image(rgb, SIZE)[None]).float()  # file order, each channel resized
    assert torch.equal(images, expected)
    module = load_module(rgb_checkpoint)
    assert torch.allclose(probabilities, module.predict_probabilities(expected), atol=1e-6, rtol=0)
    mask = cv2.imread(summary["written"][0], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 40)
    assert cv2.imread(str(tmp_path / "out" / "slice_overlay.png")).shape == (48, 40, 3)


def test_a_flair_model_reads_the_flair_channel_and_skips_gray_files_by_name(flair_checkpoint, tmp_path, monkeypatch,
                                                                           caplog):
    source = tmp_path / "in"
    rgb = _tiff(source / "a.tif", seed=1)
    assert cv2.imwrite(str(source / "gray.png"), np.full((40, 40), 9, np.uint8))
    with caplog.at_level(logging.INFO, logger="bts_lightning.predict"):
        summary, recorder = _predict(monkeypatch, flair_checkpoint, source, tmp_path / "out")
    assert caplog.text.count("The model takes channel [1] of each file (file order)") == 1
    assert "Skipping gray.png: has 1 channel(s), but the model takes channel [1] of each file (file order)" in caplog.text
    assert summary["skipped"] == ["gray.png"] and summary["channels"] == [1]
    assert [Path(p).name for p in summary["written"]] == ["a_mask.png"]
    images, probabilities = recorder.calls[-1]  # after check_input_size's blank slice
    flair = torch.from_numpy(resize_image(rgb[[1]], SIZE)[None]).float()
    assert torch.equal(images, flair)
    assert torch.allclose(probabilities, load_module(flair_checkpoint).predict_probabilities(flair), atol=1e-6)

    # Another channel on purpose: file order (index 2 is the file's third channel, not OpenCV's BGR first).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bts_lightning.predict"):
        summary, recorder = _predict(monkeypatch, flair_checkpoint, source, tmp_path / "out2", "channels=[2]")
    assert "Reading channel [2] of each file (file order) (channels=[2]), but the model was trained on channel [1]" \
        in caplog.text
    assert torch.equal(recorder.calls[-1][0], torch.from_numpy(resize_image(rgb[[2]], SIZE)[None]).float())
    with pytest.raises(ConfigError, match=r"channels=\[0, 1\] gives 2 channel\(s\) of each slice, but the model takes 1 "
                                          r"\(channel \[1\] of each file \(file order\)\)"):
        _predict(monkeypatch, flair_checkpoint, source, tmp_path / "out3", "channels=[0,1]")


def test_an_exported_flair_model_predicts_like_its_checkpoint(flair_checkpoint, tmp_path, monkeypatch):
    exported = export_model(load_module(flair_checkpoint), tmp_path / "somewhere" / "model.onnx", image_size=SIZE,
                            contract=load_predictor(flair_checkpoint, "cpu").contract)
    source = tmp_path / "in"
    _tiff(source / "a.tif", seed=2)
    probabilities = {}
    for model in (flair_checkpoint, exported):
        summary, recorder = _predict(monkeypatch, model, source, tmp_path / model.suffix.lstrip("."))
        assert summary["channels"] == [1]
        probabilities[model.suffix] = recorder.calls[-1][1]
    assert torch.allclose(probabilities[".onnx"], probabilities[".ckpt"], atol=TOLERANCE, rtol=0)


def test_gray_files_for_a_three_channel_model_are_one_clear_error(rgb_checkpoint, tmp_path, monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a.png", "b.png"):
        assert cv2.imwrite(str(source / name), np.zeros((40, 40), np.uint8))
    with pytest.raises(DataError, match=r"None of the 2 input file\(s\) could be read as the model's input: a.png, "
                                        r"b.png: has 1 channel\(s\), but the model takes channels \[0, 1, 2\] of each "
                                        r"file \(file order\)\. The model takes 3 channels of each file: pass files"):
        _predict(monkeypatch, rgb_checkpoint, source, tmp_path / "out")


def test_a_gray_model_still_reads_colour_files_as_grayscale(lgg_root, tmp_path, monkeypatch):
    checkpoint = _save_checkpoint(lgg_root, "gray", tmp_path / "gray.ckpt")
    source = tmp_path / "in"
    rgb = _tiff(source / "a.tif")
    summary, recorder = _predict(monkeypatch, checkpoint, source, tmp_path / "out")
    gray = cv2.cvtColor(np.ascontiguousarray(np.moveaxis(rgb, 0, -1)), cv2.COLOR_RGB2GRAY)
    assert summary["channels"] == "gray"
    assert torch.equal(recorder.calls[-1][0], torch.from_numpy(resize_image(gray[None], SIZE)[None]).float())
