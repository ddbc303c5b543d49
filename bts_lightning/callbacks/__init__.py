"""Lightning callbacks of bts_lightning."""

from bts_lightning.callbacks.backbone_freeze import BackboneFreeze
from bts_lightning.callbacks.metric_history import MetricHistory
from bts_lightning.callbacks.nonfinite_guard import NonFiniteLossGuard, TrainingDivergedError
from bts_lightning.callbacks.reproducibility import EpochSeed
from bts_lightning.callbacks.scheduler_resume import ResumeSchedulerStep
from bts_lightning.callbacks.training_time import TrainingTime
from bts_lightning.callbacks.validation_images import ValidationImages

__all__ = [
    "BackboneFreeze",
    "EpochSeed",
    "MetricHistory",
    "NonFiniteLossGuard",
    "ResumeSchedulerStep",
    "TrainingDivergedError",
    "TrainingTime",
    "ValidationImages",
]
