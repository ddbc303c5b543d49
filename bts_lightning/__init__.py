"""bts_lightning: brain tumor segmentation with PyTorch Lightning and Hydra."""

import os

# albumentations checks PyPI for updates on import; never do that from this package.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
