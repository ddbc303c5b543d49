"""Batched tumor-probability prediction, flip test-time augmentation, thresholding, postprocessing.

A *predictor* is any callable taking a float (N, 1, H, W) batch of slices (any intensity scale;
CPU tensor) and returning tumor probabilities (N, H, W) (tensor on any device, or array). A
training checkpoint gives one through :class:`ModulePredictor`; exported models (``.onnx``,
``.pt``, ``.ts``) give one through ``bts_lightning.export.load_exported``. :func:`load_predictor`
picks by file suffix, so ``evaluate`` and ``predict`` run from either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bts_lightning.checkpoint import CheckpointError, load_module
from bts_lightning.data.io import MIN_IMAGE_SIZE
from bts_lightning.errors import ConfigError
from bts_lightning.models import check_input_size as check_network_input_size
from bts_lightning.segmentation_module import SegmentationModule

Predictor = Callable[[torch.Tensor], Any]

CHECKPOINT_SUFFIXES = (".ckpt",)
EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")


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
    return resolved


class ModulePredictor:
    """Predictor over a :class:`SegmentationModule`: moves each batch to the module's device."""

    def __init__(self, module: SegmentationModule, device: str | torch.device | None = "auto") -> None:
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.predict_probabilities(images.to(self.device))


def load_predictor(path: str | Path, device: str | torch.device | None = "auto") -> Predictor:
    """A predictor for a model file: ``.ckpt`` (training checkpoint) or ``.onnx``/``.pt``/``.ts`` (export)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        resolved = resolve_device(device)
        return ModulePredictor(load_module(path, map_location=resolved), resolved)
    if suffix in EXPORTED_SUFFIXES:
        if not path.is_file():
            raise CheckpointError(f"Exported model {path} does not exist.")
        try:
            from bts_lightning.export import load_exported
        except ImportError as error:
            if error.name != "bts_lightning.export":
                raise
            raise ConfigError(
                f"{path}: exported models ({', '.join(EXPORTED_SUFFIXES)}) need bts_lightning.export, "
                "which this installation lacks; use the training checkpoint (.ckpt)."
            ) from None
        return load_exported(path, device=resolve_device(device))
    supported = ", ".join(CHECKPOINT_SUFFIXES + EXPORTED_SUFFIXES)
    raise ConfigError(
        f"ckpt_path={path}: unsupported model file type {suffix or '(no suffix)'!r}; expected {supported}."
    )


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
        _call(predictor, torch.zeros(1, 1, size, size))
    except Exception as error:
        raise ConfigError(
            f"{key}={size}: the model cannot run on {size}x{size} slices ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else 'no details'}); use the size it "
            "was trained at (U-Net: a multiple of 16 with the default strides)."
        ) from None


def _call(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    probabilities = torch.as_tensor(predictor(images)).detach().float().cpu()
    expected = (images.shape[0], *images.shape[-2:])
    if tuple(probabilities.shape) != expected:
        raise ValueError(f"predictor returned shape {tuple(probabilities.shape)}, expected (N, H, W) = {expected}")
    return probabilities


def predict_probabilities(predictor: Predictor, images: torch.Tensor | np.ndarray, tta: bool = False) -> torch.Tensor:
    """Tumor probabilities (N, H, W), float32 on CPU, for a batch (N, 1, H, W) or (N, H, W).

    With ``tta`` the probabilities of the identity, horizontally flipped and vertically flipped
    inputs (each flipped back) are averaged.
    """
    batch = torch.as_tensor(images)
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ValueError(f"expected an (N, 1, H, W) or (N, H, W) batch, got shape {tuple(batch.shape)}")
    batch = batch.float()
    probabilities = _call(predictor, batch)
    if tta:
        probabilities = probabilities + _call(predictor, batch.flip(-1)).flip(-1)
        probabilities = probabilities + _call(predictor, batch.flip(-2)).flip(-2)
        probabilities = probabilities / 3
    return probabilities


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


@dataclass(frozen=True)
class InferenceOptions:
    """How probabilities become masks: ``threshold`` (tumor where p > threshold), flip ``tta``,
    and postprocessing (``largest_component``, ``min_size`` in pixels of the mask it is applied to)."""

    threshold: float = 0.5
    tta: bool = False
    largest_component: bool = False
    min_size: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ConfigError(f"threshold={self.threshold} must be in [0, 1) (tumor where probability > threshold).")
        if int(self.min_size) != self.min_size or self.min_size < 0:
            raise ConfigError(f"postprocess.min_size={self.min_size} must be a whole number of pixels >= 0.")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> InferenceOptions:
        """From an app config with ``threshold``, ``tta`` and ``postprocess.{largest_component,min_size}``."""
        post = cfg.get("postprocess") or {}
        return cls(
            threshold=float(cfg.get("threshold", 0.5)),
            tta=bool(cfg.get("tta", False)),
            largest_component=bool(post.get("largest_component", False)),
            min_size=int(post.get("min_size") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mask(self, probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
        """Threshold and postprocess one (H, W) probability map into a uint8 {0, 1} mask."""
        binary = (np.asarray(probabilities) > self.threshold).astype(np.uint8)
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
