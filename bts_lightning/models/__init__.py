"""Segmentation models: ``build_model(name, ...)`` returns a module whose forward gives a dict.

``forward(x)`` returns ``{"out": logits}``, plus ``"aux"`` for models with auxiliary heads: one
logits tensor (DeepLabV3, FCN) or a list of them (UNet++ deep supervision, training mode only), all
of shape (N, num_classes, H, W) at input resolution. ``aux`` only feeds the training loss.
"""

# Importing the builder modules registers their models (smp is imported only when an smp model is built).
from bts_lightning.models import monai_models, smp_models, torchvision_models, unet  # noqa: F401
from bts_lightning.models.registry import MODELS, available_models, backbone_of, build_model, check_input_size

__all__ = ["MODELS", "available_models", "backbone_of", "build_model", "check_input_size"]
