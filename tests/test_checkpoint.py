"""Checkpoints rebuild their module from plain hyperparameters, also in the layout of older versions."""

from __future__ import annotations

import pytest
import torch

from bts_lightning.checkpoint import CheckpointError, load_module, read_checkpoint, upgrade_hparams
from bts_lightning.train import build_module
from tests.conftest import compose_train

TINY_UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=0"]


def test_hyperparameters_are_plain_configs(tmp_path):
    module = build_module(compose_train(TINY_UNET, tmp_path))
    hparams = dict(module.hparams)
    assert set(hparams) == {"net", "loss", "optimizer", "scheduler", "compile", "freeze_backbone_epochs",
                            "aux_loss_weight", "presence_loss_weight"}
    assert hparams["net"]["_target_"] == "bts_lightning.models.build_model" and hparams["net"]["name"] == "unet"
    assert hparams["scheduler"]["monitor"] == "val/dice"  # interpolations resolved, nothing left to the config

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain(hparams), hparams


def test_checkpoints_of_the_older_layout_still_load(tmp_path):
    module = build_module(compose_train([*TINY_UNET, "model.compile=false"], tmp_path))
    new = dict(module.hparams)
    old = {"model": {**{k: v for k, v in new["net"].items() if k != "_target_"}, "compile": False,
                     "freeze_backbone_epochs": 0, "aux_loss_weight": 0.4},
           "loss": new["loss"], "optimizer": new["optimizer"], "scheduler": new["scheduler"]}
    assert upgrade_hparams(old) == {k: v for k, v in new.items() if k != "presence_loss_weight"}  # newer: default
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": old}, path)
    loaded = load_module(path)
    assert dict(loaded.hparams) == new
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_weights_of_another_network_are_a_checkpoint_error(tmp_path):
    module = build_module(compose_train(TINY_UNET, tmp_path))
    hparams = dict(module.hparams)
    wider = {**hparams, "net": {**hparams["net"], "channels": [4, 16]}}
    path = tmp_path / "mismatch.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": wider}, path)
    with pytest.raises(CheckpointError, match="does not match the model it describes"):
        load_module(path)
    unknown = {**hparams, "net": {**hparams["net"], "name": "unetx"}}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": unknown}, path)
    with pytest.raises(Exception, match="Unknown model 'unetx'") as raised:
        load_module(path)
    assert type(raised.value).__name__ == "ConfigError"


def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path):
    """An exported model passed as a checkpoint is named as one; a pickle with other objects is refused unread, without
    PyTorch's advice to load it with ``weights_only=False``."""
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\x08\x07\x12\x07pytorch")  # the start of an ONNX protobuf
    with pytest.raises(CheckpointError, match=r"model.onnx could not be read: it is an exported model \(.onnx\), which "
                                              r"predict, evaluate and the demo take, but this needs a training"):
        read_checkpoint(exported)
    pickled = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": CheckpointError}}, pickled)  # a class: not plain data
    with pytest.raises(CheckpointError, match=r"other.ckpt could not be read \(it holds Python objects besides tensors "
                                              r"and plain data, which are never loaded") as error:
        read_checkpoint(pickled)
    assert "weights_only" not in str(error.value)
