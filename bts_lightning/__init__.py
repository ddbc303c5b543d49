"""bts_lightning: brain tumor segmentation with PyTorch Lightning and Hydra."""

import os

from omegaconf import OmegaConf

from bts_lightning.data.channels import channel_count

# albumentations checks PyPI for updates on import; never do that from this package.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Model configs take their input channels from the data: in_channels: ${bts.channel_count:${data.channels},${data.neighbours}}
OmegaConf.register_new_resolver("bts.channel_count", channel_count, replace=True)

__version__ = "0.1.0"
