"""Hub-style model folders: save_pretrained / from_pretrained round trip, predict on a folder, missing files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

from bts_lightning.checkpoint import CheckpointError
from bts_lightning.errors import ConfigError
from bts_lightning.hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, from_pretrained, model_card, save_pretrained
from bts_lightning.inference import load_predictor, predict_probabilities
from bts_lightning.predict import predict
from tests import fixtures_checkpoint
from tests.fixtures_checkpoint import compose_app

pytest.importorskip("safetensors")
tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below


@pytest.fixture(scope="module")
def hub_folder(tiny_checkpoint, tmp_path_factory):
    return save_pretrained(tiny_checkpoint.path, tmp_path_factory.mktemp("hub") / "model")


def test_round_trip_gives_the_same_probabilities_and_contract(tiny_checkpoint, hub_folder):
    assert {path.name for path in hub_folder.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
    config = json.loads((hub_folder / CONFIG_NAME).read_text())
    original, folder = load_predictor(tiny_checkpoint.path, "cpu"), load_predictor(hub_folder, "cpu")
    assert config["image_size"] == 64 and config["net"]["channels"] == [8, 16, 32, 64]
    assert folder.contract == original.contract
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    assert torch.equal(predict_probabilities(folder, images, tta=True), predict_probabilities(original, images, tta=True))
    assert isinstance(from_pretrained(hub_folder).net, torch.nn.Module)
    card = (hub_folder / CARD_NAME).read_text()
    assert "library_name: bts_lightning" in card and "not for diagnosis" in card
    assert "Dataset: synthetic." in card and "- best_val_dice: " in card  # from the run's metrics.json
    lines = model_card({}, {"best_val_dice": 0.5, "test": {"test/dice": 0.7}}).splitlines()
    assert "- best_val_dice: 0.5" in lines and "- test/dice: 0.7" in lines  # not "test test/dice"
    assert any(line.endswith("trained at a slice size it does not record.") for line in lines)
    assert "trained at 64 px square slices." in card


def test_copies_of_a_folder_keep_its_training_data_and_numbers(hub_folder, tmp_path):
    """save_pretrained of a module loaded from a folder, and a folder exported again, show the same card: the numbers
    travel in config.json's metrics, since the folder has no run metrics.json beside it."""
    from bts_lightning.export import export

    config = json.loads((hub_folder / CONFIG_NAME).read_text())
    assert config["metrics"]["dataset"] == "synthetic" and "best_val_dice" in config["metrics"]
    assert "val_history" not in config["metrics"]  # only what the card shows
    card = (hub_folder / CARD_NAME).read_text()
    copy = save_pretrained(from_pretrained(hub_folder), tmp_path / "copy")
    export(compose_app("export", [f"ckpt_path={hub_folder}", "format=hub", f"output={tmp_path / 'again'}"], tmp_path))
    for folder in (copy, tmp_path / "again"):
        assert (folder / CARD_NAME).read_text() == card
        assert json.loads((folder / CONFIG_NAME).read_text())["metrics"] == config["metrics"]


def test_predict_on_a_folder_equals_predict_on_the_checkpoint(tiny_checkpoint, hub_folder, tmp_path):
    image = tmp_path / "slice.png"  # another size than the network's, to check the resizing too
    cv2.imwrite(str(image), cv2.resize(cv2.imread(str(min(tiny_checkpoint.data_dir.rglob("images/*.png")))),
                                       (90, 70)))
    masks = {}
    for name, model in (("ckpt", tiny_checkpoint.path), ("hub", hub_folder)):
        cfg = compose_app("predict", [f"ckpt_path={model}", f"input={image}", f"output={tmp_path / name}",
                                      "tta=true"], tmp_path / f"run_{name}")
        predict(cfg)
        masks[name] = cv2.imread(str(tmp_path / name / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    assert masks["ckpt"] is not None and np.array_equal(masks["ckpt"], masks["hub"])


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_a_folder_missing_a_file_is_a_clear_error(hub_folder, tmp_path, missing):
    broken = shutil.copytree(hub_folder, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(CheckpointError, match=f"has no {missing}"):
        load_predictor(broken, "cpu")


def test_weights_or_a_config_that_do_not_make_the_model_name_the_file_and_what_differs(hub_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    renamed = shutil.copytree(hub_folder, tmp_path / "renamed")
    state = load_file(str(renamed / WEIGHTS_NAME))
    first = min(state)
    state[f"{first}_renamed"] = state.pop(first)
    save_file(state, str(renamed / WEIGHTS_NAME))
    config = json.loads((renamed / CONFIG_NAME).read_text())
    config["weights_sha256"] = hashlib.sha256((renamed / WEIGHTS_NAME).read_bytes()).hexdigest()
    (renamed / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"does not hold the weights of the network .*config\.json describes: 1 "
                                              rf"missing tensor\(s\) \({re.escape(first)}\); 1 unexpected tensor\(s\) "
                                              rf"\({re.escape(first)}_renamed\)"):
        load_predictor(renamed, "cpu")

    unknown = shutil.copytree(hub_folder, tmp_path / "unknown")
    config = json.loads((unknown / CONFIG_NAME).read_text())
    config["net"]["name"] = "nosuchnet"
    (unknown / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json does not build a model \(ConfigError\): Unknown model "
                                              r"'nosuchnet'"):
        load_predictor(unknown, "cpu")


def test_a_checkpoint_other_than_the_scored_one_gets_no_run_metrics(tiny_checkpoint, tmp_path):
    """The run's metrics.json scores best.ckpt; last.ckpt of a later epoch holds other weights (1-epoch run: the same)."""
    run = shutil.copytree(tiny_checkpoint.path.parent.parent, tmp_path / "run")
    assert "best_val_dice" in (save_pretrained(run / "checkpoints" / "last.ckpt", tmp_path / "same") / CARD_NAME).read_text()
    (tmp_path / "model.ckpt").symlink_to(run / "checkpoints" / "best.ckpt")  # a link is the file it names
    assert "best_val_dice" in (save_pretrained(tmp_path / "model.ckpt", tmp_path / "linked") / CARD_NAME).read_text()
    later = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    later["global_step"] += 1
    torch.save(later, run / "checkpoints" / "last.ckpt")
    card = (save_pretrained(run / "checkpoints" / "last.ckpt", tmp_path / "later") / CARD_NAME).read_text()
    assert "best_val_dice" not in card and "No metrics recorded with this checkpoint" in card


def test_a_folder_whose_weights_are_not_its_configs_is_refused(hub_folder, tmp_path):
    """An export into a folder killed after the new weights, before the new config.json, must not load as a mix."""
    from safetensors.torch import load_file, save_file

    mixed = shutil.copytree(hub_folder, tmp_path / "mixed")
    state = load_file(str(mixed / WEIGHTS_NAME))
    save_file({key: tensor + 1 for key, tensor in state.items()}, str(mixed / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not the file .*config\.json was written with "
                                              r"\(weights_sha256 differs\): an export into this folder was interrupted"):
        load_predictor(mixed, "cpu")


def test_a_failed_export_leaves_the_folders_model_whole(tiny_checkpoint, hub_folder, tmp_path, monkeypatch):
    """A full disk while the card is written (after the weights were staged) leaves the earlier model loadable,
    byte for byte; a failed first export leaves no folder."""
    from bts_lightning import runtime

    folder = shutil.copytree(hub_folder, tmp_path / "model")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    real_fsync = runtime._fsync

    def full_disk(path):
        if path.name.startswith(f".{CARD_NAME}."):
            raise OSError(28, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr(runtime, "_fsync", full_disk)
    with pytest.raises(Exception, match="No space left on device"):
        save_pretrained(tiny_checkpoint.path, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    load_predictor(folder, "cpu")
    with pytest.raises(Exception, match="No space left on device"):
        save_pretrained(tiny_checkpoint.path, tmp_path / "new" / "nested" / "model")
    assert not (tmp_path / "new").exists()  # nor the folders above it that the export made


def test_export_app_writes_a_hub_folder(tiny_checkpoint, tmp_path):
    from bts_lightning.export import export

    output = tmp_path / "exported"
    cfg = compose_app("export", [f"ckpt_path={tiny_checkpoint.path}", "format=hub", f"output={output}"], tmp_path)
    summary = export(cfg)
    assert summary["format"] == "hub" and summary["max_abs_difference"] == 0.0
    assert (output / WEIGHTS_NAME).is_file()
    (output / ".git").mkdir()  # a cloned model repository: exported again, updated in place
    export(cfg)
    (output / "scan_1.png").write_bytes(b"a user's slice")  # would be uploaded with the folder
    with pytest.raises(ConfigError, match=r"output=.*exported already holds scan_1.png: a hub model folder is uploaded"):
        export(cfg)


def test_evaluate_on_a_folder_scores_as_the_checkpoint(tiny_checkpoint, hub_folder, tmp_path):
    from bts_lightning.evaluate import evaluate

    summaries = {}
    for name, model in (("ckpt", tiny_checkpoint.path), ("hub", hub_folder)):
        overrides = [f"ckpt_path={model}", *tiny_checkpoint.data_overrides, "split=all", "worst_k=0", "device=cpu"]
        summaries[name] = evaluate(compose_app("evaluate", overrides, tmp_path / name))["summary"]
    assert summaries["hub"] == summaries["ckpt"]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_predictor(tmp_path / "no_such_model", "cpu")


def test_a_training_run_folder_points_to_its_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "best.ckpt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    expected = tmp_path / "run" / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError, match=f"is a training run's folder, .*: pass ckpt_path={expected}"):
        load_predictor(tmp_path / "run", "cpu")
