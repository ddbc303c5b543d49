"""The README's offline demo (``experiment=demo``), trained once per test session as a user runs it.

Import the fixture into a test module (``from tests.fixtures_demo import readme_demo``): the README
demo test checks its Dice, the browser test serves its checkpoint in the demo page.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli

# Where tests leave files for people to look at (the demo page's screenshot); BTS_TEST_ARTIFACTS moves it.
ARTIFACTS = Path(os.environ.get("BTS_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@dataclass(frozen=True)
class DemoRun:
    result: subprocess.CompletedProcess[str]  # the training command's exit status and output
    run_dir: Path  # hydra.run.dir: metrics.json, checkpoints/
    data_dir: Path  # paths.data_dir: the synthetic dataset it generated

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "best.ckpt"


_RUNS: dict[Path, DemoRun] = {}  # by session temp folder: every module importing the fixture shares one run


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """``python -m bts_lightning.train experiment=demo`` (plus where to put its files), run once per session.

    Each test module importing this fixture gets its own session-scoped copy of it, so the run is kept
    here rather than in pytest's fixture cache.
    """
    root = tmp_path_factory.getbasetemp() / "readme_demo"
    if root not in _RUNS:
        root.mkdir()
        run_dir, data_dir = root / "run", root / "data"
        result = run_cli(["bts_lightning.train", "experiment=demo", f"paths.data_dir={data_dir}",
                          f"hydra.run.dir={run_dir}"], cwd=root)
        _RUNS[root] = DemoRun(result, run_dir, data_dir)
    return _RUNS[root]
