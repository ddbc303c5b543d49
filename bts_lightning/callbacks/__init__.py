"""Lightning callbacks of bts_lightning."""

from bts_lightning.callbacks.backbone_freeze import BackboneFreeze
from bts_lightning.callbacks.validation_images import ValidationImages

__all__ = ["BackboneFreeze", "ValidationImages"]
