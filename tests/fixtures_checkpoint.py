"""A tiny trained checkpoint for the evaluate and predict tests, trained once per test session.

Import the fixture into a test module (``from tests.fixtures_checkpoint import tiny_checkpoint``).
The checkpoint lives under the session's base temp folder, so modules that each import the
fixture still share one training run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from bts_lightning.train import train
from tests.conftest import REPO_ROOT, compose_app, compose_train  # noqa: F401 (compose_app: tests import it from here)

# 40 synthetic 64x64 slices in 5 patient-wise folds (val fold 1, test fold 2 -> 8 test slices).
SYNTHETIC = ["data=synthetic", "data.synthetic.n=40", "data.synthetic.size=64", "data.num_workers=0"]
# A small U-Net keeps training and inference to seconds on 2 CPU cores.
TINY_MODEL = ["model.net.channels=[8,16,32,64]", "model.net.strides=[2,2,2]", "model.net.num_res_units=1"]


@dataclass(frozen=True)
class TinyCheckpoint:
    path: Path  # checkpoints/last.ckpt of a 1-epoch run
    data_dir: Path  # paths.data_dir holding the synthetic dataset it was trained on

    @property
    def data_overrides(self) -> list[str]:
        """Overrides that point the evaluate app at the training data (same split)."""
        return [*SYNTHETIC, f"paths.data_dir={self.data_dir}"]


def train_tiny_checkpoint(root: Path) -> TinyCheckpoint:
    """Train (or reuse) the tiny checkpoint under ``root``."""
    checkpoint = TinyCheckpoint(root / "run" / "checkpoints" / "last.ckpt", root / "data")
    if not checkpoint.path.is_file():
        overrides = [*SYNTHETIC, *TINY_MODEL, f"paths.data_dir={checkpoint.data_dir}", "trainer=cpu",
                     "trainer.max_epochs=1", "logger=csv", "test=false"]
        train(compose_train(overrides, root / "run"))
    assert checkpoint.path.is_file()
    return checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """A 1-epoch tiny U-Net checkpoint on 64x64 synthetic slices, shared by the whole session."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "tiny_checkpoint")
