"""Tests for the optional segmentation_models_pytorch models: shapes, encoders, errors and offline weights."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from bts_lightning.errors import ConfigError, WeightsUnavailableError
from bts_lightning.models import available_models, backbone_of, build_model, check_input_size, smp_models
from bts_lightning.models.smp_models import unreachable

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")

# Dependencies of smp, so imported after the skip.
import huggingface_hub
from huggingface_hub import constants
from safetensors.torch import save_file

ARCHS = ("smp_unet", "smp_unetpp", "smp_deeplabv3plus")
SMALL = "resnet18"  # the quickest smp encoder with pretrained settings
TIMM_SMALL = "mobilenetv3_small_050"
RESNET18_IMAGENET = smp.encoders.encoders[SMALL]["pretrained_settings"]["imagenet"]


@pytest.fixture(autouse=True)
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch caches per test, in offline mode: no test reads the real caches or the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


def _forward(model: torch.nn.Module, in_channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(torch.randn(2, in_channels, height, width))


def _marked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every float tensor set to distinct values no random init produces."""
    return {k: torch.linspace(0.1, 0.9, v.numel()).view_as(v) if v.is_floating_point() else v for k, v in state.items()}


def _first_conv_sum(rgb: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The adapted first-conv weight: RGB filters summed for 1 channel, else repeated cyclically and scaled."""
    if in_channels == 1:
        return rgb.sum(dim=1, keepdim=True)
    return rgb[:, torch.arange(in_channels) % 3] * (3 / in_channels)


def test_registered_without_importing_smp() -> None:
    """The names are always listed; smp and its dependencies are imported only inside the builders."""
    assert set(ARCHS) <= set(available_models())
    tree = ast.parse(Path(smp_models.__file__).read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not top_level & {"segmentation_models_pytorch", "timm", "huggingface_hub", "safetensors"}


@pytest.mark.slow  # a fresh interpreter importing torch and MONAI: ~20 s on 2 busy cores
def test_package_imports_without_smp() -> None:
    code = ("import sys; sys.modules['segmentation_models_pytorch'] = None; import bts_lightning.models as m; "
            "assert {'smp_unet', 'smp_unetpp', 'smp_deeplabv3plus'} <= set(m.available_models())")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_dict_at_two_sizes(name: str, in_channels: int) -> None:
    model = build_model(name, in_channels=in_channels, num_classes=2, encoder=SMALL)
    for height, width in [(64, 64), (64, 96)]:
        out = _forward(model, in_channels, height, width)
        assert set(out) == {"out"} and out["out"].shape == (2, 2, height, width)
    assert backbone_of(model) is model.model.encoder
    assert model.size_multiple == (16 if name == "smp_deeplabv3plus" else 32)
    assert not any(key.startswith("backbone.") for key in model.state_dict())  # the encoder is stored once


def test_size_rule_names_the_option() -> None:
    model = build_model("smp_deeplabv3plus", encoder=SMALL, encoder_output_stride=8)
    assert model.size_multiple == 8
    with pytest.raises(ConfigError, match=r"image_size=36 is not a multiple of 8.*encoder_output_stride.*32 or 40"):
        check_input_size(model, 36, "data.image_size")
    model = build_model("smp_unet", encoder=SMALL, encoder_depth=4, decoder_channels=[64, 32, 16, 8])
    assert model.size_multiple == 16
    assert _forward(model, 1, 48, 80)["out"].shape == (2, 2, 48, 80)


@pytest.mark.parametrize("encoder", ["resnet34", "efficientnet-b0", f"tu-{TIMM_SMALL}"])
def test_encoders_construct(encoder: str) -> None:
    model = build_model("smp_unet", num_classes=3, encoder=encoder)
    assert _forward(model, 1, 64, 96)["out"].shape == (2, 3, 64, 96)
    timm_encoder = isinstance(model.backbone, smp.encoders.TimmUniversalEncoder)
    assert timm_encoder == encoder.startswith("tu-")


@pytest.mark.parametrize("encoder", ["resnet1000", "tu-not_a_timm_model"])
def test_unknown_encoder_says_how_to_list_names(encoder: str) -> None:
    with pytest.raises(ConfigError, match=rf"model.net.encoder={encoder} for model smp_unetpp.*get_encoder_names.*"
                                          r"tu-<name>.*timm.list_models"):
        build_model("smp_unetpp", encoder=encoder)


def test_missing_smp_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"^model smp_unet needs the smp extra: pip install 'bts_lightning\[smp\]'"):
        build_model("smp_unet")


@pytest.mark.parametrize(("option", "match"), [
    ("decoder_chanels", r"Unknown option model.net.decoder_chanels.*decoder_channels"),
    ("activation", r"model.net.activation cannot be set"),
    ("encoder_weights", r"use model.net.weights"),
])
def test_invalid_options(option: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model("smp_unet", encoder=SMALL, **{option: None})


def test_bad_option_value_is_config_error() -> None:
    with pytest.raises(ConfigError, match="smp_unet cannot be built"):
        build_model("smp_unet", encoder=SMALL, decoder_channels=[16, 8])  # 2 widths for 5 encoder stages


@pytest.mark.parametrize(("source", "suffix", "in_channels"), [
    ("smp", ".pth", 1), ("smp", ".safetensors", 4), ("torchvision", ".pth", 1),
])
def test_encoder_weights_from_local_file(source: str, suffix: str, in_channels: int, tmp_path: Path) -> None:
    random_init = smp.encoders.get_encoder(SMALL, weights=None) if source == "smp" else resnet18(weights=None)
    state = _marked(random_init.state_dict())
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)

    model = build_model("smp_unet", in_channels=in_channels, weights=str(path), encoder=SMALL)
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], _first_conv_sum(state["conv1.weight"], in_channels))
    for key in ("layer4.1.conv2.weight", "layer2.0.bn1.running_var"):
        torch.testing.assert_close(loaded[key], state[key])
    assert _forward(model, in_channels, 64, 64)["out"].shape == (2, 2, 64, 64)
    # Checkpoints rebuild the network with weights=None: the same parameters must fit it.
    build_model("smp_unet", in_channels=in_channels, encoder=SMALL).load_state_dict(model.state_dict())


def test_timm_weights_from_local_file(tmp_path: Path) -> None:
    state = _marked(timm.create_model(TIMM_SMALL).state_dict())
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = build_model("smp_deeplabv3plus", weights=str(path), encoder=f"tu-{TIMM_SMALL}")
    loaded = model.backbone.model.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["blocks.2.1.conv_pw.weight"], state["blocks.2.1.conv_pw.weight"])
    build_model("smp_deeplabv3plus", encoder=f"tu-{TIMM_SMALL}").load_state_dict(model.state_dict())


@pytest.mark.parametrize(("encoder", "make_state"), [
    ("resnet34", lambda: smp.encoders.get_encoder(SMALL, weights=None).state_dict()),  # another depth
    (f"tu-{TIMM_SMALL}", lambda: smp.encoders.get_encoder(f"tu-{TIMM_SMALL}", weights=None).state_dict()),  # not timm's
])
def test_file_of_another_network_is_rejected(encoder: str, make_state, tmp_path: Path) -> None:
    path = tmp_path / "encoder.pth"
    torch.save(make_state(), path)
    with pytest.raises(WeightsUnavailableError, match=rf"{path}.*{encoder}.*model.net.weights=null"):
        build_model("smp_unet", weights=str(path), encoder=encoder)


def test_corrupt_or_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=rf"{path} cannot be loaded"):
        build_model("smp_unet", weights=str(path), encoder=SMALL)
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_model("smp_unet", weights=str(tmp_path / "absent.pth"), encoder=SMALL)


def test_unknown_weights_name_lists_valid() -> None:
    with pytest.raises(ConfigError, match=r"weights=imagenet21k for encoder resnet18. Valid names: imagenet, ssl, swsl"):
        build_model("smp_unet", weights="imagenet21k", encoder=SMALL)
    with pytest.raises(ConfigError, match=r"tu- encoders take model.net.weights=imagenet"):
        build_model("smp_unet", weights="ssl", encoder=f"tu-{TIMM_SMALL}")


def test_named_weights_missing_offline_raises_with_path(offline_cache: Path) -> None:
    repo, revision = RESNET18_IMAGENET["repo_id"], RESNET18_IMAGENET["revision"]
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("smp_unet", weights="imagenet", encoder=SMALL)
    message = str(info.value)
    assert str(offline_cache / "models--smp-hub--resnet18.imagenet" / "snapshots" / revision / "model.safetensors") in message
    assert f"https://huggingface.co/{repo}/resolve/{revision}/model.safetensors" in message
    assert "model.net.weights=/path/to/model.safetensors" in message and "model.net.weights=null" in message
    assert not any(path.is_file() for path in offline_cache.rglob("*"))

    with pytest.raises(WeightsUnavailableError, match=r"models--timm--mobilenetv3_small_050\.lamb_in1k"):
        build_model("smp_unet", weights="imagenet", encoder=f"tu-{TIMM_SMALL}")


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_hub_that_cannot_be_reached_fails_before_any_download_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode without a network: the clear error at once, not after huggingface_hub's retries."""
    calls: list[str] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **_: calls.append(filename))
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WeightsUnavailableError, match=r"(?s)could not be downloaded \(ConnectionError: "
                                                      r"no connection to http://127.0.0.1:\d+: .*model.net.weights=null"):
        build_model("smp_unet", weights="imagenet", encoder=SMALL)
    assert calls == []

    # Behind a proxy a direct connection proves nothing: the download is tried.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert unreachable(constants.ENDPOINT) is None
    with pytest.raises(WeightsUnavailableError):  # the stand-in download returns no file
        build_model("smp_unet", weights="imagenet", encoder=SMALL)
    assert calls == ["model.safetensors"]


def test_named_weights_load_from_cache(offline_cache: Path) -> None:
    state = _marked(smp.encoders.get_encoder(SMALL, weights=None).state_dict())
    snapshot = offline_cache / "models--smp-hub--resnet18.imagenet" / "snapshots" / RESNET18_IMAGENET["revision"]
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")
    loaded = build_model("smp_unetpp", weights="imagenet", encoder=SMALL).backbone.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["layer3.1.conv1.weight"], state["layer3.1.conv1.weight"])


def test_timm_named_weights_load_from_cache(offline_cache: Path) -> None:
    state = _marked(timm.create_model(TIMM_SMALL).state_dict())
    repo = offline_cache / "models--timm--mobilenetv3_small_050.lamb_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, repo / "snapshots" / commit / "model.safetensors")
    loaded = build_model("smp_unet", weights="imagenet", encoder=f"tu-{TIMM_SMALL}").backbone.model.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["blocks.1.0.conv_dw.weight"], state["blocks.1.0.conv_dw.weight"])
