"""The package as users install it: a wheel that carries conf/ and a console script for every app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

APPS = ("bts-train", "bts-evaluate", "bts-calibrate", "bts-predict", "bts-export", "bts-demo", "bts-report",
        "bts-synthetic", "bts-figshare-metadata")


def _build_wheel(tmp_path: Path) -> Path:
    """``pip wheel . --no-deps`` of a copy of the checkout (the build leaves build/ beside the sources)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("bts_lightning", "conf"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = dist.glob("bts_lightning-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_every_app_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"bts_lightning/conf/{p.relative_to(REPO_ROOT / 'conf').as_posix()}"
               for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "bts_lightning").rglob("*.py")}
    assert configs and configs <= names, sorted(configs - names)
    assert modules <= names, sorted(modules - names)

    # A fresh venv with the wheel alone (no editable install); dependencies come from this environment.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    Path(site_packages, "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    assert all((env_dir / "bin" / app).is_file() for app in APPS), sorted(os.listdir(env_dir / "bin"))

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    where = subprocess.run([str(python), "-c", "import bts_lightning; print(bts_lightning.__file__)"],
                           check=True, capture_output=True, text=True, cwd=workdir, env=env).stdout
    assert Path(where.strip()).is_relative_to(env_dir), where
    result = subprocess.run(
        [str(env_dir / "bin" / "bts-train"), "data=synthetic", "trainer=cpu", "debug=fast_dev_run",
         "data.synthetic.n=40", "data.synthetic.size=64"],
        check=False, capture_output=True, text=True, cwd=workdir, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((workdir / "logs" / "train" / "runs").glob("*/metrics.json"))
    assert (workdir / "data" / "synthetic").is_dir()
