"""Shared fixtures: small synthetic datasets, hand-made dataset folders, composed configs, app subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from bts_lightning.data.synthetic import generate_dataset
from bts_lightning.runtime import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "brain-tumor"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic 64x64 slices with metadata (5 folds), generated once per test session."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "data", n=40, size=64, seed=3)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Write a small Kaggle-layout folder: ``make_dataset(stems, image_ext=".png", mask_ext=".png")``."""

    def make(stems: list[str], image_ext: str = ".png", mask_ext: str = ".png", size: int = 32) -> Path:
        root = tmp_path / "dataset"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for stem in stems:
            image = rng.integers(0, 255, (size, size), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            mask[8:16, 8:16] = 255
            cv2.imwrite(str(root / "images" / f"{stem}{image_ext}"), image)
            cv2.imwrite(str(root / "masks" / f"{stem}{mask_ext}"), mask)
        return root

    return make


def compose_app(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the app would, with the run directory set to ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` as the app would, with the run directory set to ``output_dir``."""
    return compose_app("train", overrides, output_dir)


def run_cli(args: Sequence[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ARGS`` as a user would, from ``cwd`` (where Hydra apps put their logs/ folder)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a page a test serves)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_served(url: str, app: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Return once ``url`` answers; fail with the end of ``log`` when ``app`` exits first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert app.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{url} did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.5)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and exactly one ``error:`` line on stderr, containing ``fragments``."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert all(fragment in errors[0] for fragment in fragments), errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def _no_network_weights(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the torch hub cache at an empty folder so no test depends on (or fills) the user's cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.delenv("BTS_DATA_ROOT", raising=False)
