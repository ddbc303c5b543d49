"""Segmentation models: ``build_model(name, ...)`` returns a module whose forward gives a dict.

``forward(x)`` returns ``{"out": logits}`` (plus ``"aux"`` for models with an auxiliary
head), all of shape (N, num_classes, H, W) at input resolution.
"""

from bts_lightning.models import torchvision_models, unet  # noqa: F401 - importing registers their builders
from bts_lightning.models.registry import MODELS, available_models, backbone_of, build_model, check_input_size

__all__ = ["MODELS", "available_models", "backbone_of", "build_model", "check_input_size"]
