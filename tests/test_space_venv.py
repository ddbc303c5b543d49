"""The Space bundle as Hugging Face runs it: a fresh venv from its own requirements.txt (no PyTorch), ``python app.py``.

The bundle's page answers through ``gradio_client`` with predict's mask for the same slice. pip
installs from the package index or its local wheel cache; where neither has the pinned packages the
test skips and shows pip's reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bts_lightning.export import export
from bts_lightning.predict import predict
from tests import fixtures_checkpoint
from tests.conftest import free_port, wait_until_served
from tests.fixtures_checkpoint import compose_app

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("onnxruntime")
tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below
pytestmark = pytest.mark.slow
UNAVAILABLE = ("No matching distribution found", "Could not find a version", "NewConnectionError", "Network is unreachable")


def fresh_venv(folder: Path, requirements: Path) -> Path:
    """A new venv at ``folder`` (no system packages) with ``requirements`` installed; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                         capture_output=True, text=True, timeout=900, check=False)
    if pip.returncode != 0 and any(reason in pip.stderr for reason in UNAVAILABLE):
        pytest.skip(f"pip cannot get the Space's requirements here: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    return python


def test_space_runs_from_its_own_requirements_without_torch(tiny_checkpoint, tmp_path):
    bundle = tmp_path / "space"
    export(compose_app("export", [f"ckpt_path={tiny_checkpoint.path}", "format=space", f"output={bundle}"],
                       tmp_path / "export_run"))
    python = fresh_venv(tmp_path / "venv", bundle / "requirements.txt")
    has_torch = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)"],
                               capture_output=True, text=True, check=True)
    assert has_torch.stdout.strip() == "False", "the Space's requirements pulled in PyTorch"

    image = min((bundle / "examples").glob("*.png"))
    predict(compose_app("predict", [f"ckpt_path={bundle / 'model.onnx'}", f"input={image}", f"output={tmp_path / 'p'}",
                                    "postprocess.min_size=3"], tmp_path / "run"))
    expected = cv2.imread(str(tmp_path / "p" / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)

    port, log = free_port(), tmp_path / "app.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "0"}
    with log.open("w") as output:
        app = subprocess.Popen([str(python), "app.py"], cwd=bundle, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_served(f"http://127.0.0.1:{port}/", app, log)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, area, mask_file = client.predict(gradio_client.handle_file(str(image)), 0.5, False, False, 3,
                                            api_name="/segment")
    finally:
        app.terminate()
        app.wait(timeout=30)
    mask = cv2.imread(mask_file, cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, expected) and 0 < np.count_nonzero(mask) < mask.size
    assert area.startswith(f"Tumor area: {np.count_nonzero(expected)} px")
