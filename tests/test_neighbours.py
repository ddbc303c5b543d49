"""data.neighbours: each slice's scan neighbours as input channels (2.5D), from the data to predict, export and demo."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

import bts_lightning.predict as predict_module
from bts_lightning.callbacks import validation_images
from bts_lightning.cascade import cascade, check_compatible
from bts_lightning.checkpoint import load_module
from bts_lightning.data.channels import channel_count
from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.io import read_channels
from bts_lightning.data.neighbours import check_neighbours, neighbour_windows
from bts_lightning.demo import analyze
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.evaluate import evaluate
from bts_lightning.export import export_model
from bts_lightning.hub import from_pretrained, save_pretrained
from bts_lightning.inference import (
    InferenceOptions,
    ModelContract,
    ModulePredictor,
    contract_of,
    load_predictor,
    predict_probabilities,
)
from bts_lightning.predict import InputReader, predict
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import train
from tests.conftest import compose_app, compose_train
from tests.test_scan_context import _scan_folders

SIZE = 32


# ------------------------------------------------------------------------------------------- windows


def test_each_slice_gets_its_scan_neighbours_and_the_nearest_stands_in_for_a_missing_one():
    positions = [("a", 1), ("a", 2), ("a", 3), ("b", 5), None, ("a", 5)]
    assert neighbour_windows(positions, 1) == [(0, 0, 1), (0, 1, 2), (1, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 5)]
    # a3: slice 5 two steps up is there, slice 4 is not (it repeats a3); a5: a3 two below, a4 missing
    assert neighbour_windows(positions, 2)[2] == (0, 1, 2, 2, 5)
    assert neighbour_windows(positions, 2)[5] == (2, 5, 5, 5, 5)
    assert neighbour_windows(positions, 0) == [(i,) for i in range(6)]


def test_two_slices_with_one_number_in_one_folder_and_bad_settings_are_refused():
    with pytest.raises(DataError, match=r"a: slice 1.*own folder, or predict each"):
        neighbour_windows([("a", 1), ("a", 1)], 1, fix="predict each scan's folder on its own")
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(ConfigError, match=r"data.neighbours=.* whole number >= 0"):
            check_neighbours(bad)
    assert channel_count([1], 1) == 3 and channel_count("gray", 2) == 5 and channel_count([0, 2]) == 2
    cfg = compose_train(["data=lgg", "data.channels=[0,1,2]", "data.neighbours=1"], Path("unused"))
    assert OmegaConf.to_container(cfg.model.net, resolve=True)["in_channels"] == 9


# ------------------------------------------------------------------------------------------- the data


def _scan(root: Path, name: str, values: list[int]) -> None:
    """Scan folder ``name`` of 8x8 RGB slices ``<name>_<n>`` whose channel 1 is ``values[n - 1]`` everywhere."""
    folder = root / name
    folder.mkdir(parents=True)
    for number, value in enumerate(values, start=1):
        rgb = np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), value, np.uint8),
                        np.full((8, 8), 7, np.uint8)], axis=-1)
        cv2.imwrite(str(folder / f"{name}_{number}.png"), rgb[..., ::-1])
        mask = np.zeros((8, 8), np.uint8)
        mask[:number, :2] = 255
        cv2.imwrite(str(folder / f"{name}_{number}_mask.png"), mask)


def _module(root: Path, **settings) -> BrainTumorDataModule:
    options = {"image_size": 32, "layout": "suffix", "channels": [1], "split_by": "slice", "val_fraction": 0.3,
               "val_fold": None, "download": False, "num_workers": 0, "augmentations": None, **settings}
    module = BrainTumorDataModule(root, **options)
    module.setup("fit")
    return module


@pytest.mark.parametrize("cache", [True, False])
def test_the_data_stacks_each_slice_with_its_neighbours_and_keeps_its_own_mask(tmp_path, cache):
    _scan(tmp_path, "SCAN_A", [10, 20, 30, 40])
    _scan(tmp_path, "SCAN_B", [90, 80])
    module = _module(tmp_path, neighbours=1, cache=cache)
    dataset = module.make_dataset(range(len(module.pairs)))  # every slice
    planes = {dataset.stem(i): dataset[i]["image"][:, 0, 0].tolist() for i in range(len(dataset))}
    masks = {dataset.stem(i): int(dataset[i]["mask"].sum()) for i in range(len(dataset))}
    by_name = {stem.rsplit("/", 1)[-1]: value for stem, value in planes.items()}
    assert by_name == {"SCAN_A_1": [10, 10, 20], "SCAN_A_2": [10, 20, 30], "SCAN_A_3": [20, 30, 40],
                       "SCAN_A_4": [30, 40, 40], "SCAN_B_1": [90, 90, 80], "SCAN_B_2": [90, 80, 80]}
    assert sorted(masks.values()) == sorted(16 * 2 * n for n in (1, 2, 3, 4, 1, 2))  # 2n px at 8 px, 16x at 32 px
    assert dataset.own_channel == 1
    assert module.split_record()["settings"]["neighbours"] == 1
    wide_module = _module(tmp_path, neighbours=2, channels=[1, 2], cache=cache)
    wide = wide_module.make_dataset(range(len(wide_module.pairs)))
    first = next(i for i in range(len(wide)) if wide.stem(i).endswith("SCAN_A_1"))
    assert wide[first]["image"][:, 0, 0].tolist() == [10, 7, 10, 7, 10, 7, 20, 7, 30, 7] and wide.own_channel == 4


def test_data_without_scans_or_slice_numbers_is_refused_with_the_way_out(tmp_path, make_dataset):
    flat = make_dataset(["1", "2", "3"])
    with pytest.raises(ConfigError, match=r"data.neighbours=1 needs one folder per scan.*kaggle layout.*"
                                          r"data.neighbours=0"):
        _module(flat, neighbours=1, layout="auto", channels="gray")
    _scan(tmp_path / "scans", "SCAN_A", [10, 20])
    shutil.copy(tmp_path / "scans" / "SCAN_A" / "SCAN_A_1.png", tmp_path / "scans" / "SCAN_A" / "first.png")
    shutil.copy(tmp_path / "scans" / "SCAN_A" / "SCAN_A_1_mask.png", tmp_path / "scans" / "SCAN_A" / "first_mask.png")
    with pytest.raises(DataError, match=r"1 slice file\(s\).*no slice number.*first.png.*<scan>_<n>"):
        _module(tmp_path / "scans", neighbours=1)
    with pytest.raises(ConfigError, match="data.negatives and data.neighbours=1 do not combine"):
        BrainTumorDataModule(tmp_path, neighbours=1, negatives={"root": str(tmp_path)})


def test_predict_reads_each_file_with_its_neighbours_among_the_inputs(tmp_path, caplog):
    _scan(tmp_path, "SCAN_A", [10, 20, 30])
    files = sorted((tmp_path / "SCAN_A").glob("SCAN_A_?.png"))
    (tmp_path / "SCAN_A" / "SCAN_A_2.png").write_bytes(b"broken")  # unreadable: its neighbours stand in
    reader = InputReader(files, (1,), neighbours=1)
    assert reader.read(files[0])[:, 0, 0].tolist() == [10, 10, 10] and reader.own_channel == 1
    assert reader.read(files[2])[:, 0, 0].tolist() == [30, 30, 30]
    with caplog.at_level(logging.WARNING, logger="bts_lightning.predict"):
        InputReader(files[:1], (1,), neighbours=1)
    assert "no scan neighbours among the inputs" in caplog.text and "Pass a scan's folder" in caplog.text


def test_predict_decodes_each_file_of_a_scan_once(tmp_path, monkeypatch):
    _scan(tmp_path, "SCAN_A", [10, 20, 30, 40, 50])
    files = sorted((tmp_path / "SCAN_A").glob("SCAN_A_?.png"))
    decoded: list[str] = []

    def counting(path: Path, channels):
        decoded.append(path.name)
        return read_channels(path, channels)

    monkeypatch.setattr(predict_module, "read_channels", counting)
    reader = InputReader(files, (1,), neighbours=2)
    windows = [reader.read(path)[:, 0, 0].tolist() for path in files]
    assert windows[0] == [10, 10, 10, 20, 30] and windows[2] == [10, 20, 30, 40, 50] and windows[4] == [30, 40] + [50] * 3
    assert sorted(decoded) == sorted(path.name for path in files)


def test_validation_images_show_each_slice_not_its_neighbour(tmp_path, monkeypatch):
    _scan(tmp_path / "data", "SCAN_A", [10, 20, 30, 40])
    dataset = _module(tmp_path / "data", neighbours=1).make_dataset(range(4))
    shown: list[int] = []
    monkeypatch.setattr(validation_images, "panel", lambda image, mask, prediction: shown.append(int(image[0, 0]))
                        or np.zeros((4, 4, 3), np.uint8))
    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path / "tb")], sanity_checking=False, is_global_zero=True,
                              global_step=0, datamodule=SimpleNamespace(datasets={"val": dataset}))
    network = SimpleNamespace(device="cpu", predict_probabilities=lambda images: torch.zeros(images.shape[0], 32, 32))
    validation_images.ValidationImages(count=4).on_validation_epoch_end(trainer, network)
    assert sorted(shown) == [10, 20, 30, 40]  # each window's middle, the slice itself (its first: 10, 10, 20, 30)


def test_the_contract_counts_the_window_and_travels_as_version_2():
    contract = ModelContract(in_channels=3, channels=(1,), neighbours=1, image_size=64)
    assert contract.format_version == 2 and contract.slice_channels == 1 and contract.own_channel == 1
    assert "1 slice(s) before and after it in its scan (3 channels)" in contract.describe_channels()
    assert ModelContract.from_json(contract.to_json()) == contract
    assert ModelContract(in_channels=1).format_version == 1  # models without neighbours stay readable by older code
    with pytest.raises(ValueError, match=r"neighbours=1 give 3 channel\(s\) but in_channels=1"):
        ModelContract(in_channels=1, neighbours=1)


def test_a_module_fitted_or_loaded_in_python_knows_its_window_for_export_and_hub(tmp_path):
    """The Python API without a checkpoint path: the bare module's contract is the data it was fitted on."""
    for name, values in (("SCAN_A", [10, 20, 30, 40]), ("SCAN_B", [90, 80, 70])):
        _scan(tmp_path / "data", name, values)
    data = _module(tmp_path / "data", neighbours=1, batch_size=2)
    module = SegmentationModule(
        net={"_target_": "bts_lightning.models.build_model", "name": "unet", "in_channels": 3,
             "channels": [4, 8], "strides": [2]},
        loss={"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01})
    assert ModelContract.from_module(module).channels == (0, 1, 2)  # unfitted: nothing known of its data
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    expected = ModelContract(in_channels=3, channels=(1,), neighbours=1, image_size=32, model="unet")
    assert ModelContract.from_module(module) == expected == ModulePredictor(module, "cpu").contract
    assert ModelContract.from_module(module, neighbours=0, channels=[0, 1, 2]).neighbours == 0  # arguments win
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    assert ModelContract.from_module(SegmentationModule.load_from_checkpoint(tmp_path / "saved.ckpt")) == expected
    onnx = export_model(module, tmp_path / "model.onnx")
    assert contract_of(load_predictor(onnx, "cpu")) == replace(expected, fixed_size=False)
    folder = save_pretrained(module, tmp_path / "hub")
    assert contract_of(load_predictor(folder, "cpu")) == expected
    assert save_pretrained(from_pretrained(folder), tmp_path / "again").joinpath("config.json").read_text() == \
        (folder / "config.json").read_text()


# ------------------------------------------------------------------------------------------- the apps


@pytest.fixture(scope="module")
def neighbour_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2.5D model (data.neighbours=1) and a slice-alone one, trained briefly on synthetic scans in folders."""
    from bts_lightning.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("neighbours")
    flat = generate_dataset(base / "flat", n=30, size=SIZE, seed=3, slices_per_patient=6, empty_fraction=0.5)
    root = _scan_folders(flat, base / "scans")
    common = ["data=lgg", f"data.root={root}", "data.channels=gray", f"data.image_size={SIZE}", "data.test_fold=2",
              "data.batch_size=4", "data.num_workers=0", "trainer=cpu", "trainer.max_epochs=1", "logger=csv",
              "test=false", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "model.net.num_res_units=1"]
    paths = {"root": root, "flat": flat}
    for name, extra in (("window", "data.neighbours=1"), ("alone", "data.neighbours=0"),
                        ("presence", "loss=dice_ce_slice")):
        torch.manual_seed(0)
        train(compose_train([*common, "data.neighbours=1", extra], base / name))
        paths[name] = base / name / "checkpoints" / "last.ckpt"
    return paths


def test_a_trained_model_records_its_window_and_evaluate_reads_its_data_with_it(neighbour_runs, tmp_path):
    contract = contract_of(load_predictor(neighbour_runs["window"], "cpu"))
    assert (contract.neighbours, contract.in_channels, contract.channels) == (1, 3, "gray")
    kept = {"image_size": SIZE, "channels": "gray", "neighbours": 1}
    assert load_module(neighbour_runs["window"]).data_settings == kept
    older = torch.load(neighbour_runs["window"], map_location="cpu", weights_only=False)
    del older["bts_data_settings"]  # a checkpoint from before modules kept them: read from its data records
    torch.save(older, tmp_path / "older.ckpt")
    assert load_module(tmp_path / "older.ckpt").data_settings == kept
    metrics = evaluate(compose_app("evaluate", [f"ckpt_path={neighbour_runs['window']}", "split=val"],
                                   tmp_path / "eval"), [])
    assert metrics["n_images"] > 0 and metrics["channels"].endswith("before and after each in its scan (data.neighbours): 3 "
                                                                     "input channels")
    wrong = [f"ckpt_path={neighbour_runs['window']}", "split=val", "data.neighbours=0"]
    with pytest.raises(ConfigError, match=r"data.neighbours=0, but the model was trained with data.neighbours=1"):
        evaluate(compose_app("evaluate", wrong, tmp_path / "wrong"), wrong)
    flat = [f"ckpt_path={neighbour_runs['window']}", "split=all", "data=brain_tumor",
            f"data.root={neighbour_runs['flat']}", f"data.image_size={SIZE}"]
    with pytest.raises(ConfigError, match="needs one folder per scan.*: this model was trained with them") as error:
        evaluate(compose_app("evaluate", flat, tmp_path / "flat"), flat)
    assert "set data.neighbours=0" not in str(error.value)  # which the next message would refuse
    with pytest.raises(ConfigError, match=r"scan neighbours \(data.neighbours\): 1 and 0"):
        check_compatible(neighbour_runs["window"], neighbour_runs["alone"])


def test_a_cascade_of_two_models_with_neighbours_keeps_them(neighbour_runs, tmp_path):
    overrides = [f"segmentation={neighbour_runs['window']}", f"presence={neighbour_runs['presence']}", "context=1",
                 "target_false_alarm_rate=0.2"]
    cascade(compose_app("cascade", overrides, tmp_path / "joined"), [])
    joined = tmp_path / "joined" / "checkpoints" / "cascade.ckpt"
    assert contract_of(load_predictor(joined, "cpu")).neighbours == 1
    metrics = evaluate(compose_app("evaluate", [f"ckpt_path={joined}", "split=test"], tmp_path / "eval"), [])
    assert metrics["inference"]["scan_context"]["context"] == 1 and metrics["n_images"] > 0
    scan = min(path for path in neighbour_runs["root"].iterdir() if path.is_dir())
    result = predict(compose_app("predict", [f"ckpt_path={joined}", f"input={scan}", f"output={tmp_path / 'out'}"],
                                 tmp_path))  # the scan's masks beside its slices are left out
    assert result["scan_context"]["context"] == 1 and len(result["slices"]) == len(list(scan.glob("*_mask.png")))
    assert not any(entry["file"].endswith("_mask.png") for entry in result["slices"])


def test_predict_export_hub_and_demo_give_the_network_the_scan_window(neighbour_runs, tmp_path):
    scan_folder = min(path for path in neighbour_runs["root"].iterdir() if path.is_dir())
    scan = tmp_path / scan_folder.name
    scan.mkdir()
    for path in scan_folder.glob("*.png"):
        if not path.stem.endswith("_mask"):
            shutil.copy(path, scan / path.name)
    files = sorted(scan.glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    planes = [read_channels(path, None) for path in files]
    windows = np.stack([np.concatenate([planes[max(i - 1, 0)], planes[i], planes[min(i + 1, len(files) - 1)]])
                        for i in range(len(files))])
    checkpoint = load_predictor(neighbour_runs["window"], "cpu")
    expected = predict_probabilities(checkpoint, windows) > 0.5
    alone = predict_probabilities(checkpoint, np.stack([np.concatenate([p, p, p]) for p in planes]))
    assert not torch.equal(alone, predict_probabilities(checkpoint, windows))  # the neighbours reach the network

    result = predict(compose_app("predict", [f"ckpt_path={neighbour_runs['window']}", f"input={scan}",
                                             f"output={tmp_path / 'out'}"], tmp_path))
    assert [row["tumor_area_px"] for row in result["slices"]] == [int(mask.sum()) for mask in expected]

    onnx = tmp_path / "model.onnx"
    export_model(load_module(neighbour_runs["window"]), onnx, image_size=SIZE)  # the loaded module knows its data
    exported = load_predictor(onnx, "cpu")
    assert contract_of(exported).neighbours == 1
    assert torch.allclose(predict_probabilities(exported, windows), predict_probabilities(checkpoint, windows),
                          atol=1e-4)
    folder = save_pretrained(neighbour_runs["window"], tmp_path / "hub")
    assert json.loads((folder / "config.json").read_text())["neighbours"] == 1
    assert "Scan neighbours:" in (folder / "README.md").read_text()
    assert contract_of(load_predictor(folder, "cpu")).neighbours == 1

    shown = analyze(checkpoint, files[0], InferenceOptions())  # one slice: its own planes stand in
    assert int(shown.mask.sum()) == int((alone[0] > 0.5).sum())
    space_app = pytest.importorskip("bts_lightning.space_app")  # the Space, without torch: the same for one slice
    space_model = space_app.Model.load(onnx)
    assert space_model.neighbours == 1
    assert int((space_app.segment(space_model, files[0])[1] > 0).sum()) == int(shown.mask.sum())
