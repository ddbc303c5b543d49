"""data.channels: parsing, the bts.channel_count resolver in every model config, reading channels, per-channel z-score."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bts_lightning import space_app
from bts_lightning.data.channels import channel_count, parse_channels
from bts_lightning.data.io import ChannelError, read_channels, to_channels
from bts_lightning.errors import ConfigError
from bts_lightning.preprocessing import standardize
from bts_lightning.runtime import CONFIG_DIR, run_app
from bts_lightning.train import build_module, train
from tests.conftest import compose_train

MODELS = sorted(path.stem for path in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


@pytest.mark.parametrize("value, parsed", [("gray", None), ([1], (1,)), ([2, 0], (2, 0)), ((0, 1, 2), (0, 1, 2))])
def test_channels_parse_and_count(value, parsed):
    assert parse_channels(value) == parsed
    assert channel_count(value) == (1 if parsed is None else len(parsed))


@pytest.mark.parametrize("value", ["rgb", 1, [], [1, 1], [-1], [0.5], [True], None])
def test_bad_channels_name_the_key(value):
    with pytest.raises(ConfigError, match=r"data\.channels=.* is invalid: it must be gray or a list"):
        parse_channels(value)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_takes_its_input_channels_from_the_data(model, tmp_path):
    assert compose_train([f"model={model}"], tmp_path).model.net.in_channels == 1
    assert compose_train([f"model={model}", "data=lgg"], tmp_path).model.net.in_channels == 1
    assert compose_train([f"model={model}", "data.channels=[0,1,2]"], tmp_path).model.net.in_channels == 3


def test_a_three_channel_network_takes_three_channel_batches(tmp_path):
    cfg = compose_train(["data.channels=[0,2,1]", "model.net.channels=[8,16]", "model.net.strides=[2]"], tmp_path)
    module = build_module(cfg).eval()
    assert module.hparams.net["in_channels"] == 3
    with torch.no_grad():
        assert module.predict_probabilities(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 32, 32)


def test_bad_channels_on_the_command_line_are_one_error_line(tmp_path, capsys):
    cfg = compose_train(["data.channels=2", "trainer=cpu"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_app(train, cfg)
    assert exit_.value.code == 2
    assert "error: data.channels=2 is invalid" in capsys.readouterr().err


def test_resolver_is_registered_on_import():
    config = OmegaConf.create({"data": {"channels": [1, 2]}, "in_channels": "${bts.channel_count:${data.channels}}"})
    assert config.in_channels == 2


def test_channels_are_read_in_file_order_and_deep_images_scaled_together(tmp_path):
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 1000, 2000, 4000
    rgb16[0, 0] = 0
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR: the file holds rgb16 in RGB order
    image = read_channels(path, (2, 0))
    assert image.shape == (2, 4, 4) and image.dtype == np.uint8
    assert image[:, 1, 1].tolist() == [255, 64]  # one min-max for the kept channels: 4000 -> 255, 1000 -> 64
    assert read_channels(path, None).shape == (1, 4, 4)
    with pytest.raises(ChannelError, match=r"has 3 channel\(s\), data.channels=\[3\] needs 4"):
        read_channels(path, (3,))
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(to_channels(gray, (0,)), gray[None])  # a gray file's one channel is [0]
    int16 = np.array([[-100, 0], [100, 1100]], np.int16)
    assert to_channels(int16, None)[0].tolist() == [[0, 21], [42, 255]]  # int16 (Figshare): min-max per slice


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float64])
@pytest.mark.parametrize("planes", [3, 4])
def test_colour_images_of_any_depth_become_gray(tmp_path, dtype, planes):
    """OpenCV's colour conversion takes 8/16-bit unsigned and float32 only; other depths are converted first."""
    colour = np.random.default_rng(0).integers(-50, 3000, (6, 5, planes)).astype(dtype)
    gray = to_channels(colour, None)
    assert gray.shape == (1, 6, 5) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, to_channels(colour.astype(np.float32), None))
    if dtype == np.int16:  # a file, as the Space app reads it too
        assert cv2.imwrite(str(tmp_path / "colour.tif"), colour)
        np.testing.assert_array_equal(read_channels(tmp_path / "colour.tif", None), space_app.read_slice(
            tmp_path / "colour.tif", None))


def test_standardize_z_scores_each_channel_and_matches_the_one_channel_rule():
    rng = torch.Generator().manual_seed(0)
    batch = torch.stack([torch.rand(2, 8, 8, generator=rng) * 10, torch.rand(2, 8, 8, generator=rng) * 1000], dim=1)
    out = standardize(batch)
    assert out.shape == (2, 2, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), torch.ones(2, 2), atol=1e-5, rtol=0)
    one = batch[:, :1]
    expected = (one - one.mean(dim=(1, 2, 3), keepdim=True)) / one.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(standardize(one), expected)


def test_a_channel_no_image_has_is_the_setting_to_change_and_one_some_lack_names_them(tmp_path):
    from bts_lightning.data.dataset import scan_pairs
    from bts_lightning.data.discovery import SlicePair
    from bts_lightning.errors import DataError

    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    pairs = []
    for name, planes in (("rgb", 3), ("gray", 1)):
        image = np.random.default_rng(0).integers(0, 255, (32, 32, planes), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{name}.png"), image if planes == 3 else image[..., 0])
        pairs.append(SlicePair(name, tmp_path / f"{name}.png", tmp_path / "mask.png"))
    with pytest.raises(DataError, match=r"1 image\(s\) with 1 channel\(s\), fewer than data.channels=\[1\] needs .*: "
                                        r"gray.png\. Replace or remove these slices"):
        scan_pairs(pairs, 32, keep=False, channels=(1,))
    with pytest.raises(ConfigError, match=r"^data.channels=\[5\]: every image \(2\) has 1 or 3 channel\(s\); choose "
                                          r"indices below 1, or gray\.$"):
        scan_pairs(pairs, 32, keep=False, channels=(5,))
