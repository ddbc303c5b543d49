"""segmentation_models_pytorch networks (U-Net, U-Net++, DeepLabV3+) with any smp or timm (``tu-``) encoder.

They need the smp extra (``pip install 'bts_lightning[smp]'``); the package is imported only when one is built.
``weights`` selects the encoder's starting point:

* ``None``: random init; nothing is read from disk or the network.
* a file path (``.pth``, ``.pt``, ``.bin``, ``.safetensors``): the weights a name below would fetch, as a local
  file: for smp encoders the encoder's state dict (torchvision ImageNet ResNet files fit too), for ``tu-``
  encoders a timm checkpoint of the model (its ``model.safetensors`` on the Hugging Face hub).
* a name: for smp encoders one of its ``pretrained_settings`` (e.g. ``imagenet``); for ``tu-`` encoders
  ``imagenet``, timm's pretrained weights for the tag in the name (``tu-resnet18.a1_in1k``). The file is taken
  from the Hugging Face hub cache (``$HF_HOME/hub``), downloaded there only when missing (and ``HF_HUB_OFFLINE``
  is unset).

Pretrained first-conv filters are adapted to ``in_channels`` like the torchvision models': RGB filters summed for
one channel, otherwise repeated cyclically and scaled by ``3 / in_channels``.
"""

from __future__ import annotations

import inspect
import socket
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import torch
from torch import nn

from bts_lightning.errors import ConfigError, WeightsUnavailableError
from bts_lightning.models.registry import register_model

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# smp constructor arguments the builder sets itself (None: not settable, the module must return plain logits).
RESERVED = {"encoder_name": "encoder", "encoder_weights": "weights", "classes": "num_classes", "activation": None,
            "aux_params": None}
SMP_ENCODERS = 'python -c "import segmentation_models_pytorch as smp; print(smp.encoders.get_encoder_names())"'
TIMM_MODELS = 'python -c "import timm; print(timm.list_models())"'


class SmpNet(nn.Module):
    """An smp model whose ``forward(x)`` returns ``{"out": logits}`` (N, classes, H, W).

    ``backbone`` is the encoder (frozen by ``BackboneFreeze``); H and W must be multiples of ``size_multiple``,
    the encoder's output stride, which ``size_rule`` explains.
    """

    def __init__(self, model: nn.Module, size_rule: str) -> None:
        super().__init__()
        self.model = model
        self.size_multiple = int(model.encoder.output_stride)
        self.size_rule = size_rule

    @property
    def backbone(self) -> nn.Module:
        return self.model.encoder

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.model(x)}


def _import_smp(name: str) -> ModuleType:
    try:
        import segmentation_models_pytorch
    except ImportError as exc:
        raise ConfigError(f"model {name} needs the smp extra: pip install 'bts_lightning[smp]' ({exc}).") from None
    return segmentation_models_pytorch


def _check_options(name: str, arch: type, options: Mapping[str, object]) -> None:
    """Raise ``ConfigError`` unless every option is a named argument of ``arch`` that the builder leaves open."""
    parameters = inspect.signature(arch).parameters
    valid = [p for p, v in parameters.items()
             if v.kind is v.POSITIONAL_OR_KEYWORD and p not in RESERVED and p != "in_channels"]
    for option in options:
        if option in RESERVED:
            own = RESERVED[option]
            use = f"use model.net.{own}" if own else "the module needs plain logits"
            raise ConfigError(f"model.net.{option} cannot be set for model {name} ({use}).")
        if option not in valid:
            raise ConfigError(f"Unknown option model.net.{option} for model {name}. Valid options: "
                              f"encoder, weights, in_channels, num_classes, {', '.join(valid)}.")


def _check_encoder(name: str, smp: ModuleType, encoder: str) -> None:
    if encoder.startswith("tu-"):
        import timm

        known = timm.is_model(encoder[3:])
    else:
        known = encoder in smp.encoders.get_encoder_names()
    if not known:
        raise ConfigError(
            f"Unknown encoder model.net.encoder={encoder} for model {name}. smp encoders: {SMP_ENCODERS}; "
            f"timm encoders: tu-<name> with a name from {TIMM_MODELS}."
        )


def _hub_source(smp: ModuleType, encoder: str, weights: str) -> tuple[str, tuple[str, ...], str | None]:
    """(Hugging Face repo, candidate file names, revision) holding the named ``weights`` of ``encoder``."""
    if not encoder.startswith("tu-"):
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        if weights not in settings:
            raise ConfigError(
                f"Unknown weights model.net.weights={weights} for encoder {encoder}. Valid names: "
                f"{', '.join(settings)}; or a path to a weights file, or null for random init."
            )
        return settings[weights]["repo_id"], ("model.safetensors",), settings[weights]["revision"]
    arch = encoder[3:]
    if weights != "imagenet":
        raise ConfigError(
            f"tu- encoders take model.net.weights=imagenet (timm's pretrained weights for the tag in the name, "
            f"e.g. tu-resnet18.a1_in1k), a path to a timm weights file, or null; got {weights}."
        )
    import timm

    config = timm.models.get_pretrained_cfg(arch)
    if config is None or not config.hf_hub_id:
        where = f"; download {config.url} and use model.net.weights=<that file>" if config and config.url else ""
        raise WeightsUnavailableError(
            f"timm has no Hugging Face weights for {arch}{where}; or use model.net.weights=null."
        )
    names = (config.hf_hub_filename,) if config.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    return config.hf_hub_id, names, None


def unreachable(url: str, timeout_s: float = 5.0) -> OSError | None:
    """Why a connection to the host of ``url`` fails (no DNS, refused, timed out), or ``None`` when it opens; also
    ``None`` when the environment sets a proxy (downloads then go through it, so a direct connection proves nothing).
    """
    if urllib.request.getproxies():
        return None
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return None
    except OSError as exc:
        return exc


def _hub_file(repo: str, filenames: tuple[str, ...], revision: str | None, weights: str, encoder: str) -> Path:
    """The cached file of ``repo`` (first of ``filenames`` found), downloaded into the cache if missing.

    Raises ``WeightsUnavailableError`` naming the expected file when it is neither cached nor downloadable.
    """
    from huggingface_hub import constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    for filename in filenames:
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    # Without a network huggingface_hub retries for about 25 s before failing; a hub it cannot connect to
    # fails here at once instead.
    refused = None if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    failure: Exception | None = None if refused is None else ConnectionError(
        f"no connection to {constants.ENDPOINT}: {refused}")
    for filename in filenames if failure is None else ():
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError as exc:  # offline mode or no network: the other names would fail alike
            failure = failure or exc
            break
        except Exception as exc:  # noqa: BLE001 - e.g. no such file in the repository (try the next name), disk
            failure = failure or exc
    filename = filenames[0]
    cache = Path(constants.HF_HUB_CACHE)
    folder = f"models--{repo.replace('/', '--')}"
    command = f"hf download {repo} {filename}" + (f" --revision {revision}" if revision else "")
    raise WeightsUnavailableError(
        f"Pretrained weights {weights} of encoder {encoder} are not in the Hugging Face cache and could not be "
        f"downloaded ({type(failure).__name__}: {' '.join(str(failure).split())[:300]}).\n"
        f"  Expected file: {cache / folder / 'snapshots' / (revision or '<commit>') / filename}\n"
        f"  Download it from: {hf_hub_url(repo, filename, revision=revision)}\n"
        f"Where there is network, run `{command}` and copy the folder it fills, {folder}, into {cache} here (or "
        f"set HF_HOME to a copy); or pass the downloaded file with model.net.weights=/path/to/{filename}; or train "
        f"from scratch with model.net.weights=null."
    )


def _weights_file(smp: ModuleType, encoder: str, weights: str) -> Path:
    """The local file ``weights`` (a path or a weights name) stands for."""
    path = Path(weights).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or "/" in weights or "\\" in weights:
        if not path.is_file():
            raise WeightsUnavailableError(
                f"model.net.weights={weights}: no such file. Give an encoder weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}), a weights name such as imagenet, or null for random init."
            )
        return path
    repo, filenames, revision = _hub_source(smp, encoder, weights)
    return _hub_file(repo, filenames, revision, weights, encoder)


def _unfit(path: Path, encoder: str, reason: str) -> WeightsUnavailableError:
    kind = "a timm checkpoint of the model" if encoder.startswith("tu-") else "the encoder's state dict"
    return WeightsUnavailableError(
        f"Weights file {path} cannot be loaded into encoder {encoder} ({' '.join(reason.split())[:300]}). It must "
        f"hold {kind}; fix model.net.weights (or model.net.encoder), or use model.net.weights=null."
    )


def _read_state(path: Path, encoder: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file (a ``state_dict``/``model`` entry is unwrapped)."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or foreign files fail in many ways
        raise _unfit(path, encoder, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _unfit(path, encoder, "it is not a state dict of tensors")
    return dict(state)


def _check_timm_state(encoder: str, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise unless ``state`` fills every weight of timm model ``encoder[3:]`` (its classifier aside).

    timm loads encoder weights non-strictly (it drops the classifier), so a file of another network would
    otherwise leave the encoder silently at random init.
    """
    import timm

    reference = timm.create_model(encoder[3:], num_classes=0)
    try:
        missing = reference.load_state_dict(state, strict=False).missing_keys
    except RuntimeError as exc:
        raise _unfit(path, encoder, str(exc)) from None
    if missing:
        raise _unfit(path, encoder, f"{len(missing)} weights missing, e.g. {', '.join(missing[:3])}")


def _construct(name: str, arch: type, **kwargs: object) -> nn.Module:
    try:
        return arch(**kwargs)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"model {name} cannot be built with these model.net options: {exc}") from None


def _build(
    name: str,
    arch_name: str,
    in_channels: int,
    num_classes: int,
    weights: str | None,
    encoder: str,
    options: Mapping[str, object],
) -> SmpNet:
    smp = _import_smp(name)
    arch = getattr(smp, arch_name)
    _check_options(name, arch, options)
    _check_encoder(name, smp, encoder)
    kwargs = {"encoder_name": encoder, "classes": num_classes, **options}
    stride = "model.net.encoder_output_stride" if "encoder_output_stride" in inspect.signature(arch).parameters \
        else "2**model.net.encoder_depth, at most 32"
    rule = f"the output stride of encoder {encoder}: {stride}"
    if weights is None:
        return SmpNet(_construct(name, arch, encoder_weights=None, in_channels=in_channels, **kwargs), rule)
    path = _weights_file(smp, encoder, weights)
    state = _read_state(path, encoder)
    if encoder.startswith("tu-"):
        _check_timm_state(encoder, state, path)
        # timm loads the checkpoint into the feature extractor and adapts its first conv to in_channels.
        model = _construct(name, arch, encoder_weights=True, in_channels=in_channels,
                           pretrained_cfg_overlay={"state_dict": state}, **kwargs)
    else:
        model = _construct(name, arch, encoder_weights=None, in_channels=3, **kwargs)
        try:
            model.encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise _unfit(path, encoder, str(exc)) from None
        model.encoder.set_in_channels(in_channels, pretrained=True)
    return SmpNet(model, rule)


@register_model("smp_unet", pretrained=True)
def smp_unet(
    in_channels: int, num_classes: int, weights: str | None = None, encoder: str = "resnet34", **options: object
) -> nn.Module:
    """smp ``Unet``; ``options`` are its other arguments (decoder_channels, encoder_depth, ...)."""
    return _build("smp_unet", "Unet", in_channels, num_classes, weights, encoder, options)


@register_model("smp_unetpp", pretrained=True)
def smp_unetpp(
    in_channels: int, num_classes: int, weights: str | None = None, encoder: str = "resnet34", **options: object
) -> nn.Module:
    """smp ``UnetPlusPlus``; ``options`` are its other arguments (decoder_channels, encoder_depth, ...)."""
    return _build("smp_unetpp", "UnetPlusPlus", in_channels, num_classes, weights, encoder, options)


@register_model("smp_deeplabv3plus", pretrained=True)
def smp_deeplabv3plus(
    in_channels: int, num_classes: int, weights: str | None = None, encoder: str = "resnet34", **options: object
) -> nn.Module:
    """smp ``DeepLabV3Plus``; ``options`` are its other arguments (encoder_output_stride, decoder_atrous_rates, ...)."""
    return _build("smp_deeplabv3plus", "DeepLabV3Plus", in_channels, num_classes, weights, encoder, options)
