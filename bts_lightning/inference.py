"""The one inference boundary: model files -> tumor probabilities -> masks.

A *predictor* is any callable taking a float (N, C, H, W) batch of slices (any intensity scale;
CPU tensor; C = its contract's ``in_channels``) and returning tumor probabilities (N, H, W) (tensor
on any device, or array).
:func:`load_predictor` gives one for every model file, picking the runtime by suffix:

- ``.ckpt``: a training checkpoint, rebuilt as a :class:`ModulePredictor`;
- ``.onnx``: an exported ONNX model, run by onnxruntime (:class:`ExportedModel`);
- ``.pt`` / ``.ts``: an exported TorchScript model, run by ``torch.jit.load`` (:class:`ExportedModel`);
- a folder: a hub model folder (``config.json`` + ``model.safetensors``, :mod:`bts_lightning.hub`).

Every loaded predictor has a ``contract`` (:class:`ModelContract`): the preprocessing it expects
(training ``image_size``, which channels of each file, per-image z-score normalization) and what it
returns. A checkpoint's is read from the checkpoint (its data settings and split record, and its
run's ``.hydra/config.yaml`` for older ones);
``bts_lightning.export`` embeds it in exported files (ONNX ``metadata_props`` key
:data:`ONNX_CONTRACT_KEY`, TorchScript extra file :data:`TORCHSCRIPT_CONTRACT_FILE`), so a model
file copied away from its run still tells ``predict``/``evaluate`` the size and channels it was trained on.

Also here: the one device choice (:func:`resolve_device`), flip test-time augmentation
(:func:`predict_probabilities`), thresholds, postprocessing and the slice decision (:class:`InferenceOptions`,
:func:`postprocess`, :func:`with_model_decision`). This module only reads model files; ``bts_lightning.export`` writes them.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from bts_lightning.checkpoint import (
    CheckpointError,
    load_module,
    training_channels,
    training_image_size,
    training_neighbours,
)
from bts_lightning.data.channels import GRAY, Channels, channels_setting, describe_channels, parse_channels
from bts_lightning.data.io import MIN_IMAGE_SIZE
from bts_lightning.data.neighbours import own_channel, window_size
from bts_lightning.decision import SliceDecision
from bts_lightning.errors import BtsError, ConfigError, first_line
from bts_lightning.models import check_input_size as check_network_input_size
from bts_lightning.models.cascade import cascade_of, flip_averaged_probability
from bts_lightning.preprocessing import blank, flip_mean, standardize
from bts_lightning.runtime import as_flag, as_number
from bts_lightning.segmentation_module import SegmentationModule

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], Any]

CHECKPOINT_SUFFIXES = (".ckpt",)
# Exported format -> file suffixes (the first is the default when writing).
EXPORT_FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}
EXPORTED_SUFFIXES = tuple(suffix for suffixes in EXPORT_FORMATS.values() for suffix in suffixes)
# Names of the exported graph's input and output.
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
# An exported cascade's further ONNX outputs (ModelContract.cascade_parts): segmentation (N, H, W), presence gate (N,).
PARTS_NAMES = ("segmentation_probabilities", "presence_gates")
INSTALL_HINT = "pip install 'bts_lightning[export]'"

# Where exported files carry their contract (JSON of ModelContract.to_json()).
ONNX_CONTRACT_KEY = "bts_lightning.contract"
TORCHSCRIPT_CONTRACT_FILE = "bts_lightning_contract.json"
CONTRACT_VERSION = 2  # the newest record this package reads; 2 = with neighbours (older readers refuse those)
NORMALIZATION = "per-image z-score (bts_lightning.preprocessing.standardize)"
INPUT_NOTE = ("float32 (N, C, H, W) slices, C = in_channels (the file channels in channels, of each slice of the "
              "window of 2 * neighbours + 1 scan slices), of any intensity scale (uint8, uint16 or [0, 1] give the "
              "same result)")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` = CUDA when available, else CPU; otherwise the named device, checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r} is not a device name (use auto, cpu, cuda or cuda:N): {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} was asked for but CUDA is not available here; use device=auto or cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of them or device=auto.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} was asked for but MPS (Apple GPUs) is not available here; use device=auto "
                          "or cpu.")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device} is not supported: use auto, cpu, cuda, cuda:N or mps.")
    return resolved


# ------------------------------------------------------------------------------------ the contract


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class ModelContract:
    """The preprocessing a model file expects and what it returns; travels with exported files.

    Attributes:
        image_size: side of the square slices it was trained at (the training ``data.image_size``);
            ``None`` when unknown (exported files older than the contract).
        in_channels, num_classes: of the network; model files take (N, in_channels, H, W) batches.
        channels: which channels of each image file make those inputs: ``"gray"`` (one grayscale
            channel) or a tuple of channel indices in file order (``(1,)``: FLAIR of an LGG TIFF), as
            ``data.channels`` (:mod:`bts_lightning.data.channels`). Its count times ``2 * neighbours + 1`` must
            equal ``in_channels``. Absent from older contracts: ``"gray"`` for a 1-channel model, else the first
            ``in_channels``.
        neighbours: ``data.neighbours`` (:mod:`bts_lightning.data.neighbours`): each input stacks ``channels`` of
            the slices ``n - neighbours .. n + neighbours`` of slice ``n``'s scan, in that order. 0 (older
            contracts too): the slice alone. A contract with neighbours is ``format_version`` 2.
        tumor_class: the softmax channel returned as tumor probability.
        normalization: how slices are normalized (inside the model: callers pass raw intensities).
        input: dtype, shape and intensity-scale note of the input.
        model: registry name of the network (``unet``, ``deeplabv3``, ...), ``None`` when unknown.
        fixed_size: the exported graph runs at ``image_size`` x ``image_size`` only (SwinUNETR: its
            attention masks are fixed at export); :class:`ExportedModel` resizes other slices to it
            and the probabilities back. Absent from older contracts: ``False``.
        decision: the calibrated slice-level "tumor present" decision (:meth:`SliceDecision.to_dict`), ``None``
            when the model has none (never calibrated; older contracts).
        cascade_parts: an exported cascade (:mod:`bts_lightning.models.cascade`) that also gives its parts, the
            segmentation's tumor probabilities (N, H, W) and the presence gate ``g`` (N,) whose ``min`` with them
            is its output (ONNX outputs :data:`PARTS_NAMES`; TorchScript method ``parts``), so flip TTA can gate
            the flip-averaged segmentation by the presence of the slice as given, as the checkpoint does
            (:func:`predict_probabilities`). Absent from older contracts: ``False``.
        format_version: version of this record.
    """

    image_size: int | None = None
    in_channels: int = 1
    num_classes: int = 2
    tumor_class: int = 1
    normalization: str = NORMALIZATION
    input: str = INPUT_NOTE
    model: str | None = None
    fixed_size: bool = False
    channels: str | tuple[int, ...] = GRAY
    decision: dict[str, Any] | None = None
    format_version: int = 1
    neighbours: int = 0
    cascade_parts: bool = False

    def __post_init__(self) -> None:
        if self.image_size is not None and not _is_count(self.image_size, 1):
            raise ValueError(f"image_size={self.image_size!r} must be a positive whole number or None")
        for name, minimum in (("in_channels", 1), ("num_classes", 1), ("tumor_class", 0), ("format_version", 1),
                              ("neighbours", 0)):
            if not _is_count(getattr(self, name), minimum):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a whole number >= {minimum}")
        if self.tumor_class >= self.num_classes:
            raise ValueError(f"tumor_class={self.tumor_class} must be below num_classes={self.num_classes}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model={self.model!r} must be a name or None")
        if not isinstance(self.fixed_size, bool) or (self.fixed_size and self.image_size is None):
            raise ValueError(f"fixed_size={self.fixed_size!r} must be true or false, and true only with an image_size")
        if not isinstance(self.cascade_parts, bool):
            raise ValueError(f"cascade_parts={self.cascade_parts!r} must be true or false")  # noqa: TRY004
        try:
            indices = parse_channels(self.channels, "channels")
        except ConfigError as error:
            raise ValueError(str(error)) from None
        object.__setattr__(self, "channels", GRAY if indices is None else indices)
        count = (1 if indices is None else len(indices)) * window_size(self.neighbours)
        if count != self.in_channels:
            window = f" with neighbours={self.neighbours}" if self.neighbours else ""
            raise ValueError(f"channels={channels_setting(indices)}{window} give {count} channel(s) but "
                             f"in_channels={self.in_channels}")
        if self.neighbours and self.format_version < 2:
            object.__setattr__(self, "format_version", 2)
        if self.decision is not None:
            object.__setattr__(self, "decision", SliceDecision.from_dict(self.decision).to_dict())

    @property
    def slice_decision(self) -> SliceDecision | None:
        """``decision`` as a :class:`SliceDecision`, or ``None``."""
        return None if self.decision is None else SliceDecision.from_dict(self.decision)

    @property
    def channel_indices(self) -> Channels:
        """``channels`` as :func:`~bts_lightning.data.io.read_channels` takes them: ``None`` = gray."""
        return None if self.channels == GRAY else self.channels

    @property
    def slice_channels(self) -> int:
        """How many channels each slice of the window gives: ``in_channels / (2 * neighbours + 1)``."""
        return self.in_channels // window_size(self.neighbours)

    @property
    def own_channel(self) -> int:
        """Index of the slice's own first channel in an input (the middle of the window): what overlays show."""
        return own_channel(self.neighbours, self.slice_channels)

    def describe_channels(self) -> str:
        """What the model takes of each file, e.g. ``channel [1] of each file (file order)``, and of which slices."""
        text = describe_channels(self.channel_indices)
        if self.neighbours:
            text += (f", of the slice and the {self.neighbours} slice(s) before and after it in its scan "
                     f"({self.in_channels} channels)")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "channels": channels_setting(self.channel_indices)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelContract:
        """Parse :meth:`to_json` output; unknown keys are ignored, a newer ``format_version`` is refused.

        Raises ``ValueError`` for text that is not such a record.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the contract is not a JSON object")  # noqa: TRY004  (bad value, one error type)
        version = data.get("format_version", CONTRACT_VERSION)
        if _is_count(version, 1) and version > CONTRACT_VERSION:
            raise ValueError(f"contract format_version {version} is newer than this bts_lightning reads "
                             f"({CONTRACT_VERSION}); upgrade bts_lightning")
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "channels" not in values and _is_count(values.get("in_channels"), 1):  # a contract from before channels
            values["channels"] = default_channels(values["in_channels"])
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(str(error)) from None

    @classmethod
    def from_module(cls, module: Any, image_size: int | None = None, channels: Any = None,
                    neighbours: int | None = None) -> ModelContract:
        """The contract of a :class:`SegmentationModule` trained at ``image_size`` on ``channels`` (a
        ``data.channels`` value) with ``neighbours``.

        Each argument left ``None`` comes from the module's ``data_settings`` (what it was trained on: recorded when
        it is fitted and when it is loaded from a checkpoint or hub folder); unknown there too: no image size,
        slices alone, and :func:`default_channels` of each slice's share of the network's ``in_channels``.
        Raises ``ValueError`` when ``channels`` are invalid or their count is not the network's ``in_channels``.
        """
        config = network_config(module)
        in_channels = int(config.get("in_channels", 1))
        recorded = getattr(module, "data_settings", None) or {}
        image_size = recorded.get("image_size") if image_size is None else image_size
        channels = recorded.get("channels") if channels is None else channels
        neighbours = int(recorded.get("neighbours") or 0) if neighbours is None else neighbours
        return cls(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=int(config.get("num_classes", 2)),
            model=None if config.get("name") is None else str(config["name"]),
            channels=default_channels(in_channels // window_size(neighbours)) if channels is None else channels,
            neighbours=neighbours,
            decision=getattr(module, "decision", None),
        )


def default_channels(in_channels: int) -> str | tuple[int, ...]:
    """The channels assumed when a model file does not record them: gray for 1, else the first ``in_channels``."""
    return GRAY if in_channels == 1 else tuple(range(in_channels))


def check_batch(images: torch.Tensor, contract: ModelContract) -> None:
    """Raise ``ValueError`` naming the expected channels unless ``images`` is (N, ``contract.in_channels``, H, W)."""
    if images.ndim != 4 or images.shape[1] != contract.in_channels:
        raise ValueError(
            f"expected an (N, {contract.in_channels}, H, W) batch ({contract.describe_channels()}), "
            f"got shape {tuple(images.shape)}"
        )


def network_config(module: Any) -> Mapping[str, Any]:
    """The network's builder config (``hparams.net``: ``name``, ``in_channels``, ...); empty without one.

    (``checkpoint.load_module`` brings older checkpoints' ``hparams.model`` into this layout.)
    """
    hparams = getattr(module, "hparams", None) or {}
    config = hparams.get("net") or {}
    return config if isinstance(config, Mapping) else {}


def contract_of(predictor: Predictor) -> ModelContract:
    """``predictor.contract``, or an all-unknown contract for a bare callable."""
    contract = getattr(predictor, "contract", None)
    return contract if isinstance(contract, ModelContract) else ModelContract()


# ------------------------------------------------------------------------------------ predictors


class ModulePredictor:
    """Predictor over a :class:`SegmentationModule`: moves each batch to the module's device."""

    def __init__(
        self,
        module: SegmentationModule,
        device: str | torch.device | None = "auto",
        contract: ModelContract | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.contract = contract or ModelContract.from_module(module)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        check_batch(images, self.contract)
        return self.module.predict_probabilities(images.to(self.device))


class ExportedModel:
    """Predictor over an exported file: float (N, C, H, W) images -> tumor probabilities (N, H, W).

    C is ``contract.in_channels`` (other batches raise ``ValueError`` naming the channels).

    A fixed-size file (``contract.fixed_size``) gets the images resized (bilinear) to its
    ``contract.image_size`` and returns probabilities resized back, so it takes any H and W.
    ``.onnx`` runs in onnxruntime (its CUDA provider when ``device`` is CUDA and it is installed,
    else CPU), ``.pt``/``.ts`` through ``torch.jit.load`` on ``device``. Returns a float32 tensor on
    the input's device. ``contract`` is the :class:`ModelContract` embedded by the exporter (an
    all-unknown one, with a warning, for files exported before it existed).

    Raises:
        BtsError: the file is missing, its suffix unknown, it is corrupt, its contract unreadable,
            or onnxruntime is not installed (each naming the file).
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            where = "is a directory" if self.path.is_dir() else "does not exist"
            raise CheckpointError(f"Exported model {self.path} {where}.")
        suffix = self.path.suffix.lower()
        self.format = next((name for name, suffixes in EXPORT_FORMATS.items() if suffix in suffixes), None)
        if self.format is None:
            raise BtsError(f"Exported model {self.path}: unknown format {suffix or '(no suffix)'!r}; "
                           f"expected {', '.join(EXPORTED_SUFFIXES)}.")
        self.device = resolve_device(device)
        if self.format == "onnx":
            self._session, self._input_name, self.providers = _onnx_session(self.path, self.device.type == "cuda")
            text = self._session.get_modelmeta().custom_metadata_map.get(ONNX_CONTRACT_KEY)
        else:
            self.providers = []
            extra = {TORCHSCRIPT_CONTRACT_FILE: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=extra).eval()
            except Exception as error:  # noqa: BLE001  (any failure: a corrupt or foreign file)
                raise BtsError(
                    f"Exported model {self.path} could not be loaded as TorchScript: {first_line(error)}"
                ) from None
            text = extra[TORCHSCRIPT_CONTRACT_FILE]
        self.contract = _read_contract(self.path, text)
        if self.contract.model == "cascade" and not self.contract.cascade_parts:
            log.warning("%s is a cascade exported without its parts: under tta=true it runs whole on each flipped "
                        "view, so its presence decisions can differ from the calibrated ones; re-export it from its "
                        "checkpoint (python -m bts_lightning.export) for flip TTA as the checkpoint does it.",
                        self.path.name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        check_batch(images, self.contract)
        size, shape = self.contract.image_size, images.shape[-2:]
        if self.contract.fixed_size and tuple(shape) != (size, size):
            resized = nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear")
            return nn.functional.interpolate(self._run(resized)[:, None], size=shape, mode="bilinear")[:, 0]
        return self._run(images)

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An exported cascade's (segmentation probabilities (N, H, W), presence gates (N,)) (``contract.cascade_parts``;
        ``ValueError`` for another file); its output is their ``min``."""
        if not self.contract.cascade_parts:
            raise ValueError(f"{self.path.name} does not give a cascade's parts (contract.cascade_parts is false)")
        images = torch.as_tensor(images)
        check_batch(images, self.contract)
        size, shape = self.contract.image_size, images.shape[-2:]
        resize = self.contract.fixed_size and tuple(shape) != (size, size)
        batch = nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear") if resize else images
        if self.format == "onnx":
            array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
            found = self._session.run(list(PARTS_NAMES), {self._input_name: array})
            segmentation, gates = (torch.from_numpy(value) for value in found)
        else:
            with torch.no_grad():
                segmentation, gates = self._module.parts(batch.to(self.device, torch.float32))
        if resize:
            segmentation = nn.functional.interpolate(segmentation[:, None], size=shape, mode="bilinear")[:, 0]
        return segmentation.float().to(images.device), gates.float().to(images.device)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            array = images.detach().to("cpu", torch.float32).contiguous().numpy()
            (probabilities,) = self._session.run([OUTPUT_NAME], {self._input_name: array})
            return torch.from_numpy(probabilities).to(images.device)
        with torch.no_grad():
            return self._module(images.to(self.device, torch.float32)).float().to(images.device)

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, format={self.format!r})"


def _onnx_session(path: Path, use_cuda: bool) -> tuple[Any, str, list[str]]:
    try:
        import onnxruntime
    except ImportError:
        raise BtsError(f"Running ONNX model {path} needs onnxruntime: {INSTALL_HINT}") from None
    available = onnxruntime.get_available_providers()
    wanted = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    providers = [p for p in wanted if p in available] or available
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run is a BtsError naming the cause, not logged as well
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # noqa: BLE001  (any failure: a corrupt or foreign file)
        raise BtsError(f"Exported model {path} could not be loaded by onnxruntime: {first_line(error)}") from None
    return session, session.get_inputs()[0].name, session.get_providers()


def _read_contract(path: Path, text: str | bytes | None) -> ModelContract:
    """The contract embedded in an exported file; all-unknown (logged) when it has none."""
    if not text:
        log.warning(
            "Exported model %s carries no bts_lightning contract (exported by an older version): the image size "
            "it was trained at is unknown; pass the size explicitly, or re-export it from its checkpoint.", path,
        )
        return ModelContract()
    try:
        return ModelContract.from_json(text)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BtsError(
            f"Exported model {path} has an unreadable bts_lightning contract ({first_line(error)}); re-export it "
            "from its checkpoint with python -m bts_lightning.export."
        ) from None


def load_predictor(path: str | Path, device: str | torch.device | None = "auto") -> ModulePredictor | ExportedModel:
    """The predictor of a model file, by suffix: ``.ckpt`` (training checkpoint) or ``.onnx``/``.pt``/``.ts``;
    or of a hub model folder (``config.json`` + ``model.safetensors``, :mod:`bts_lightning.hub`).

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. The
    predictor's ``contract`` says how it was trained (see :class:`ModelContract`).

    Raises:
        ConfigError: an unsupported suffix or device.
        BtsError: (``CheckpointError`` for checkpoints) the file is missing, corrupt, or its runtime
            (onnxruntime) is not installed, naming the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        from bts_lightning.hub import load_folder  # hub builds on this module

        return load_folder(path, device)
    if suffix in CHECKPOINT_SUFFIXES:
        resolved = resolve_device(device)
        module = load_module(path, map_location=resolved)
        return ModulePredictor(module, resolved, _checkpoint_contract(path, module))
    if suffix in EXPORTED_SUFFIXES:
        return ExportedModel(path, device)
    supported = ", ".join(CHECKPOINT_SUFFIXES + EXPORTED_SUFFIXES)
    if not suffix and not path.exists():
        raise CheckpointError(f"ckpt_path={path} does not exist; pass a model file ({supported}) or a hub model folder.")
    raise ConfigError(
        f"ckpt_path={path}: unsupported model file type {suffix or '(no suffix)'!r}; expected {supported}, "
        "or a hub model folder."
    )


def _checkpoint_contract(path: Path, module: SegmentationModule) -> ModelContract:
    """The contract of checkpoint ``path`` holding ``module``: its training size, channels and slice decision."""
    channels = training_channels(path)
    if module.decision is not None:  # the checkpoint's, as load_module read it
        try:
            SliceDecision.from_dict(module.decision)
        except ValueError as error:
            raise CheckpointError(f"Checkpoint {path}: its stored slice decision is invalid ({error}); "
                                  "calibrate it again with python -m bts_lightning.calibrate.") from None
    try:
        contract = ModelContract.from_module(module, training_image_size(path), channels, training_neighbours(path))
    except ValueError as error:
        raise CheckpointError(f"Checkpoint {path}: its data.channels and data.neighbours do not match its network "
                              f"({error}).") from None
    if channels is None and contract.in_channels > 1:
        log.warning("Checkpoint %s records no data.channels; assuming its %d-channel network takes %s.",
                    path, contract.in_channels, contract.describe_channels())
    return contract


def check_input_size(predictor: Predictor, size: int, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``predictor`` takes ``size`` x ``size`` slices.

    Sizes below ``MIN_IMAGE_SIZE`` are refused; a checkpoint's network states its own size rule
    (U-Net: multiples of the product of its strides); an exported model is tried on one blank slice.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ConfigError(f"{key}={size} must be a whole number of pixels >= {MIN_IMAGE_SIZE}.")
    if isinstance(predictor, ModulePredictor):
        check_network_input_size(predictor.module.net, size, key)
        return
    try:
        _call(predictor, torch.zeros(1, contract_of(predictor).in_channels, size, size))
    except Exception as error:  # noqa: BLE001  (whatever the runtime raises for a shape it cannot take)
        raise ConfigError(
            f"{key}={size}: the model cannot run on {size}x{size} slices ({type(error).__name__}: "
            f"{first_line(error, 200)}); use the size it was trained at "
            f"({_trained_size_hint(predictor)}U-Net: a multiple of 16 with the default strides)."
        ) from None


def _trained_size_hint(predictor: Predictor) -> str:
    size = contract_of(predictor).image_size
    return f"{size} px for this model; " if size else ""


def _call(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    probabilities = torch.as_tensor(predictor(images)).detach().float().cpu()
    expected = (images.shape[0], *images.shape[-2:])
    if tuple(probabilities.shape) != expected:
        raise ValueError(f"predictor returned shape {tuple(probabilities.shape)}, expected (N, H, W) = {expected}")
    return probabilities


def predict_probabilities(predictor: Predictor, images: torch.Tensor | np.ndarray, tta: bool = False) -> torch.Tensor:
    """Tumor probabilities (N, H, W), float32 on CPU, for a batch (N, C, H, W) (or (N, H, W) for C = 1).

    C is the predictor's ``contract.in_channels`` (1 for a bare callable); another shape raises
    ``ValueError`` naming the channels expected. With ``tta`` the probabilities of the identity,
    horizontally flipped and vertically flipped inputs (each flipped back) are averaged; for a cascade
    checkpoint, only its segmentation's, its presence decided on the slice as given
    (:func:`~bts_lightning.models.cascade.flip_averaged_probability`), and the same for a cascade exported with its
    parts (``contract.cascade_parts``; one exported before them runs whole on each flipped view). A blank slice (every
    channel one value: :func:`~bts_lightning.preprocessing.blank`) gets probability 0 everywhere, in every format.
    """
    batch = torch.as_tensor(images)
    contract = contract_of(predictor)
    if batch.ndim == 3 and contract.in_channels == 1:
        batch = batch.unsqueeze(1)
    check_batch(batch, contract)
    batch = batch.float()
    probabilities = _probabilities(predictor, batch, contract, tta)
    return torch.where(blank(batch)[:, None, None], 0.0, probabilities)  # nothing to segment on a blank slice


def _probabilities(predictor: Predictor, batch: torch.Tensor, contract: ModelContract, tta: bool) -> torch.Tensor:
    """:func:`predict_probabilities` of a checked float batch, before blank slices are emptied."""
    if tta:
        cascade = cascade_of(predictor)
        if cascade is not None:  # its presence scored once, on the slice as given, as calibrated
            with torch.no_grad():
                return flip_averaged_probability(cascade, standardize(batch.to(predictor.device))).cpu()
        if contract.cascade_parts and isinstance(predictor, ExportedModel):  # the same, from the exported parts
            segmentation, gates = predictor.parts(batch)
            total = segmentation + predictor.parts(batch.flip(-1))[0].flip(-1) + predictor.parts(batch.flip(-2))[0].flip(-2)
            return torch.minimum(total / 3, gates[:, None, None]).cpu()
        return flip_mean(lambda images: _call(predictor, images), batch)
    return _call(predictor, batch)


def postprocess(mask: np.ndarray, largest_component: bool = False, min_size: int = 0) -> np.ndarray:
    """Clean a binary (H, W) mask with 8-connected components; returns uint8 {0, 1}.

    First components of fewer than ``min_size`` pixels are dropped, then, with
    ``largest_component``, only the largest remaining one is kept (the first in raster order on
    a tie). Empty masks stay empty.
    """
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if not largest_component and min_size <= 1:
        return binary
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return binary
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = areas >= min_size
    if largest_component and keep.any():
        largest = int(np.argmax(np.where(keep, areas, -1)))
        keep = np.zeros_like(keep)
        keep[largest] = True
    lookup = np.concatenate([[0], keep]).astype(np.uint8)
    return lookup[labels]


DECISION_SETTINGS = ("auto", "off")


@dataclass(frozen=True)
class InferenceOptions:
    """How probabilities become masks: ``threshold`` (tumor where p > threshold), flip ``tta``,
    postprocessing (``largest_component``, ``min_size`` in pixels of the mask it is applied to), and
    the slice-level ``decision`` (an all-zero mask where it says "no tumor"; ``None`` = none)."""

    threshold: float = 0.5
    tta: bool = False
    largest_component: bool = False
    min_size: int = 0
    decision: SliceDecision | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ConfigError(f"threshold={self.threshold} must be in [0, 1) (tumor where probability > threshold).")
        if int(self.min_size) != self.min_size or self.min_size < 0:
            raise ConfigError(f"postprocess.min_size={self.min_size} must be a whole number of pixels >= 0.")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], prefix: str = "") -> InferenceOptions:
        """From an app config with ``threshold``, ``tta`` and ``postprocess.{largest_component,min_size}``
        (``null`` threshold / tta: 0.5 / false here, the calibrated ones under a decision: see
        :func:`with_model_decision`); also checks its ``slice_decision`` setting. ``prefix``: where these settings
        sit in the config (``cross_evaluate.``), for the errors naming them."""
        decision_setting(cfg, prefix)
        post = cfg.get("postprocess") or {}
        threshold = cfg.get("threshold")
        options = {
            "threshold": 0.5 if threshold is None else float(as_number(f"{prefix}threshold", threshold)),
            "tta": as_flag(f"{prefix}tta", cfg.get("tta"), False),
            "largest_component": as_flag(f"{prefix}postprocess.largest_component",
                                         post.get("largest_component"), False),
            "min_size": int(as_number(f"{prefix}postprocess.min_size", post.get("min_size", 0), whole=True)),
        }
        try:
            return cls(**options)
        except ConfigError as error:  # __post_init__'s messages start with the key
            raise ConfigError(f"{prefix}{error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": None if self.decision is None else self.decision.to_dict()}

    def mask(self, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
        """Threshold and postprocess one (H, W) probability map into a uint8 {0, 1} mask; all zero when the
        decision (scored on this map) says no tumor."""
        probability = np.asarray(probabilities)
        if self.decision is not None and not self.decision.tumor_present(self.decision.score(probability)):
            return np.zeros(probability.shape, np.uint8)
        binary = (probability > self.threshold).astype(np.uint8)
        return postprocess(binary, self.largest_component, self.min_size)

    def masks(self, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
        """:meth:`mask` of each map of an (N, H, W) batch."""
        array = np.asarray(probabilities)
        if len(array) == 0:
            return np.zeros(array.shape, np.uint8)
        return np.stack([self.mask(p) for p in array])

    def predict_masks(self, predictor: Predictor, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Masks (N, H, W) uint8 {0, 1} of a batch, at the batch's resolution."""
        return self.masks(predict_probabilities(predictor, images, self.tta).numpy())


def auto_or_off(cfg: Mapping[str, Any], key: str, auto_means: str, prefix: str = "") -> str:
    """The app's ``key`` setting, ``auto`` (when absent) or ``off``, checked; YAML reads ``off`` as false.

    ``auto_means``: what ``auto`` does, and ``prefix`` where ``cfg`` sits in the config, for the error.
    """
    value = cfg.get(key, "auto")
    setting = "off" if value is False else str(value)
    if setting not in DECISION_SETTINGS:
        raise ConfigError(f"{prefix}{key}={setting} must be auto ({auto_means}) or off.")
    return setting


def decision_setting(cfg: Mapping[str, Any], prefix: str = "") -> str:
    """The app's ``slice_decision`` setting (:func:`auto_or_off`)."""
    return auto_or_off(cfg, "slice_decision", "the model's calibrated decision, when it has one", prefix)


def with_model_decision(options: InferenceOptions, cfg: Mapping[str, Any], contract: ModelContract) -> InferenceOptions:
    """``options`` with the model's slice decision when ``cfg.slice_decision`` is ``auto`` and ``contract`` has one.

    ``threshold`` and ``tta`` left ``null`` in ``cfg`` become those the decision was calibrated with (its pixel
    threshold; its ``tta``, when recorded), so its false-alarm rate holds. Logs the decision applied; warns when it is
    applied at another ``threshold`` (rule ``component_fraction``) or ``tta`` than it was calibrated with.
    """
    decision = contract.slice_decision if decision_setting(cfg) == "auto" else None
    if decision is None:
        if contract.decision is not None:
            log.info("Slice decision off (slice_decision=off): every slice keeps its mask.")
        return options
    log.info("Slice decision: tumor present iff %s", decision.describe())
    calibrated_tta = decision.calibration.get("tta")
    calibrated = {"threshold": decision.pixel_threshold,
                  "tta": calibrated_tta if isinstance(calibrated_tta, bool) else None}
    followed = {key: value for key, value in calibrated.items() if value is not None and cfg.get(key) is None}
    if followed:
        options = replace(options, **followed)
        log.info("%s as the slice decision was calibrated (set them to choose others).",
                 " and ".join(f"{key}={str(value).lower()}" for key, value in followed.items()))
    if decision.rule == "component_fraction" and decision.pixel_threshold != options.threshold:
        log.warning("The slice decision was calibrated at threshold=%g but threshold=%g: its false-alarm rate no "
                    "longer holds; pass threshold=%g, recalibrate, or slice_decision=off.",
                    decision.pixel_threshold, options.threshold, decision.pixel_threshold)
    if calibrated["tta"] is not None and calibrated["tta"] != options.tta:
        log.warning("The slice decision was calibrated with tta=%s but tta=%s: its false-alarm rate no longer holds; "
                    "pass tta=%s, recalibrate, or slice_decision=off.", str(calibrated_tta).lower(),
                    str(options.tta).lower(), str(calibrated_tta).lower())
    return replace(options, decision=decision)
