"""Crash-safe outputs: atomic files and checkpoints, full disks, unwritable folders, errors in the run log.

A "full disk" is a child process whose file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) makes
every write past a few KiB fail with EFBIG: portable, and it also stops root (chmod does not).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from bts_lightning.checkpoint_io import AtomicCheckpointIO
from bts_lightning.errors import DataError, OutputError
from bts_lightning.export import export
from bts_lightning.report import report_app
from bts_lightning.runtime import STALE_SECONDS, atomic_path, run_app, write_bytes_atomic, write_json_atomic
from bts_lightning.train import train
from tests import fixtures_checkpoint
from tests.conftest import REPO_ROOT, assert_one_error_line, compose_train
from tests.fixtures_checkpoint import SYNTHETIC, TINY_MODEL, compose_app
from tests.test_report import _write_run

tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the session's trained checkpoint (fixture)

# Every output below is bigger than this; Hydra's own files (.hydra/*.yaml, <app>.log) are smaller.
FILE_SIZE_LIMIT = 64 * 1024


def run_python(args: list[str], cwd: Path, max_file_bytes: int | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` from ``cwd``; with ``max_file_bytes``, writing a file past that size fails (EFBIG)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size if max_file_bytes else None)


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: folders "under" it cannot be created, even by root."""
    path = tmp_path / "blocker"
    path.write_text("a file, not a folder")
    return path


# ------------------------------------------------------------------------------- atomic files


def test_atomic_path_writes_beside_the_target_then_renames(tmp_path):
    target = tmp_path / "out" / "result.csv"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and not target.exists()
        assert temporary.name.startswith(".result.csv.") and temporary.name.endswith(".tmp")
        temporary.write_text("a,b\n")
    assert target.read_text() == "a,b\n" and target.stat().st_mode & 0o777 == 0o644
    write_json_atomic(target.with_name("data.json"), {"b": 1, "a": [2]})
    assert target.with_name("data.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json", "result.csv"]


def test_a_killed_writers_old_temporary_files_go_with_the_next_write(tmp_path):
    """SIGKILL leaves ``.NAME.XXXX.tmp`` behind; the next write of NAME removes those older than STALE_SECONDS and
    leaves a fresh one (a write in progress) and other files' alone."""
    target = tmp_path / "last.ckpt"
    old, fresh, other = (tmp_path / name for name in (".last.ckpt.ab12.tmp", ".last.ckpt.cd34.tmp", ".best.ckpt.ef56.tmp"))
    for leftover in (old, fresh, other):
        leftover.write_bytes(b"partial")
    stale = time.time() - STALE_SECONDS - 5
    os.utime(old, (stale, stale))
    os.utime(other, (stale, stale))
    write_bytes_atomic(target, b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.ckpt.ef56.tmp", ".last.ckpt.cd34.tmp", "last.ckpt"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), ValueError("not an OS error")])
def test_an_interrupted_write_keeps_the_previous_file(tmp_path, failure):
    target = tmp_path / "result.png"
    target.write_bytes(b"previous")
    with pytest.raises(type(failure)), atomic_path(target) as temporary:
        temporary.write_bytes(b"partial new cont")
        raise failure
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["result.png"]


def test_os_errors_while_writing_are_user_errors_naming_the_file(tmp_path, blocker):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    full_disk = rf"Could not write {target}: No space left on device; free some disk space"
    with pytest.raises(OutputError, match=full_disk), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # torch.save raises a RuntimeError while handling the OSError of the failed write
    with pytest.raises(OutputError, match="File too large; free some disk space"), atomic_path(target):
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "model.pt"]
    with pytest.raises(OutputError, match=rf"Cannot create folder {blocker / 'sub'}: {blocker} is a file"):
        write_bytes_atomic(blocker / "sub" / "x.png", b"data")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(OutputError, match="Could not write .*folder.png: Is a directory; choose a writable folder"):
        write_bytes_atomic(tmp_path / "folder.png", b"data")
    assert temporary_files(tmp_path) == []


# -------------------------------------------------------------------------------- checkpoints

SAVE_CHECKPOINT = """
import sys, torch
from bts_lightning.checkpoint_io import AtomicCheckpointIO
from bts_lightning.runtime import run_app
run_app(AtomicCheckpointIO().save_checkpoint, {"weights": torch.ones(1_000_000)}, sys.argv[1])
"""

# Saves checkpoints whose every weight equals their step, as fast as it can, until killed.
SAVE_FOREVER = """
import sys, torch
from bts_lightning.checkpoint_io import AtomicCheckpointIO
checkpoint_io = AtomicCheckpointIO()
for step in range(1, 1_000_000):
    checkpoint_io.save_checkpoint({"step": step, "weights": torch.full((4_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_checkpoints_are_written_only_in_their_own_folder(tmp_path, monkeypatch):
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert list(system_temp.iterdir()) == [] and [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # e.g. TMPDIR removed during training
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 2}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.slow  # a subprocess per app (~10 s); the quick tier keeps report's full-disk case
def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    torch.save({"weights": torch.zeros(10)}, target)
    previous = target.read_bytes()
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    result = run_python(["-c", SAVE_CHECKPOINT, str(target)], tmp_path, FILE_SIZE_LIMIT, {"TMPDIR": str(system_temp)})
    assert_one_error_line(result, f"Could not write {target}: File too large; free some disk space")
    assert target.read_bytes() == previous and torch.equal(torch.load(target)["weights"], torch.zeros(10))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"] and list(system_temp.iterdir()) == []


@pytest.mark.slow
def test_sigkill_while_saving_checkpoints_never_leaves_a_partial_one(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    # System temp on another filesystem when there is one: moving a file there is a copy over the target.
    shm = Path("/dev/shm")
    other_filesystem = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    system_temp = Path(tempfile.mkdtemp(dir=shm if other_filesystem else tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(system_temp)}
    try:
        for _ in range(2):
            child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(target)], stdout=subprocess.PIPE,
                                     text=True, env=env)
            first = child.stdout.readline()  # one complete save, then kill it at a random moment
            time.sleep(random.uniform(0, 0.4))
            child.kill()
            child.wait()
            child.stdout.close()
            assert first.strip() == "1"
            checkpoint = torch.load(target, weights_only=True)
            assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["step"])))
        assert list(system_temp.iterdir()) == []
    finally:
        for leftover in system_temp.iterdir():
            leftover.unlink()
        system_temp.rmdir()
    others = [p.name for p in target.parent.iterdir() if p != target]
    assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in others)  # killed mid-write


def test_training_saves_checkpoints_atomically_and_resumes_from_them(tiny_checkpoint, tmp_path, monkeypatch):
    saved: list[str] = []
    original = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    resumed = torch.load(tiny_checkpoint.path, weights_only=False)
    clock = next(key for key in resumed["callbacks"] if key.startswith("TrainingTime"))
    assert resumed["callbacks"][clock]["seconds"] > 0
    resumed["callbacks"][clock]["seconds"] = 1000.0  # as if epoch 0 had taken that long
    torch.save(resumed, tmp_path / "resumed.ckpt")
    overrides = [*SYNTHETIC, *TINY_MODEL, f"paths.data_dir={tiny_checkpoint.data_dir}", "trainer=cpu", "logger=csv",
                 "test=false", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'resumed.ckpt'}"]
    metrics = train(compose_train(overrides, tmp_path / "run"))  # resumes after the fixture's epoch 0
    assert metrics["epochs_trained"] == 2 and [row["epoch"] for row in metrics["val_history"]] == [0, 1]
    assert metrics["train_time_s"] > 1000  # epoch 0's process counts too
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(saved) == ["best.ckpt", "last.ckpt"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "fit_finished.json", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["epoch"] == 1
    assert sorted(p.name for p in tiny_checkpoint.path.parent.iterdir()) == ["best.ckpt", "fit_finished.json",
                                                                              "last.ckpt"]


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_cpu"])
def test_every_trainer_config_uses_the_atomic_checkpoint_io(trainer, tmp_path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    assert isinstance(instantiate(cfg.trainer, logger=False).strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------- apps on a full disk


@pytest.mark.slow  # a subprocess per app (~10 s); the quick tier keeps report's full-disk case
def test_predict_on_a_full_disk_keeps_the_previous_outputs(tiny_checkpoint, tmp_path):
    source, out = tmp_path / "input", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    cv2.imwrite(str(source / "scan.png"), np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8))
    previous = out / "scan_overlay.png"
    previous.write_bytes(b"the previous overlay")
    result = run_python(["-m", "bts_lightning.predict", f"ckpt_path={tiny_checkpoint.path}", f"input={source}",
                         f"output={out}", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, FILE_SIZE_LIMIT)
    assert_one_error_line(result, f"Could not write {previous}: File too large; free some disk space")
    assert previous.read_bytes() == b"the previous overlay"
    # The small mask would fit, but a run's files take their places together: none of them, no temporary file either
    assert sorted(p.name for p in out.iterdir()) == ["scan_overlay.png"] and temporary_files(out) == []


@pytest.mark.slow  # a subprocess per app (~10 s); the quick tier keeps report's full-disk case
def test_evaluate_on_a_full_disk_fails_and_keeps_the_previous_figure(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "worst_slices.png").write_bytes(b"the previous figure")
    result = run_python(["-m", "bts_lightning.evaluate", f"ckpt_path={tiny_checkpoint.path}", "device=cpu",
                         *tiny_checkpoint.data_overrides, f"hydra.run.dir={run}"], tmp_path, FILE_SIZE_LIMIT)
    assert_one_error_line(result, f"Could not write {run / 'worst_slices.png'}: File too large")
    assert (run / "worst_slices.png").read_bytes() == b"the previous figure"
    assert (run / "per_image.csv").read_text().count("\n") == 9  # header and the 8 test slices: small enough
    assert not (run / "metrics.json").exists() and temporary_files(run) == []
    assert "error: Could not write" in (run / "evaluate.log").read_text()


@pytest.mark.slow  # a subprocess per app (~10 s); the quick tier keeps report's full-disk case
@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_export_on_a_full_disk_keeps_the_previous_model(tiny_checkpoint, tmp_path, format):
    output = tmp_path / "models" / ("model.pt" if format == "torchscript" else "model.onnx")
    output.parent.mkdir()
    output.write_bytes(b"the previous model")
    result = run_python(["-m", "bts_lightning.export", f"ckpt_path={tiny_checkpoint.path}", f"output={output}",
                         "image_size=64", "verify=false", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                        FILE_SIZE_LIMIT)
    assert_one_error_line(result, f"Could not write {output}: File too large")
    assert output.read_bytes() == b"the previous model" and [p.name for p in output.parent.iterdir()] == [output.name]


def test_report_on_a_full_disk_keeps_the_previous_report(tmp_path):
    _write_run(tmp_path / "runs" / "a", "unet", seed=1, val_fold=1, val_dice=0.7, test_dice=0.6)
    _write_run(tmp_path / "runs" / "b", "lraspp", seed=1, val_fold=1, val_dice=0.5, test_dice=0.4)
    out = tmp_path / "report"
    out.mkdir()
    for name in ("report.md", "report.png"):
        (out / name).write_text(f"the previous {name}")
    result = run_python(["-m", "bts_lightning.report", f"dirs={tmp_path / 'runs'}", f"out={out}"], tmp_path, 8 * 1024)
    assert_one_error_line(result, f"Could not write {out / 'report.png'}: File too large")
    assert [(out / name).read_text() for name in ("report.md", "report.png")] == [
        "the previous report.md", "the previous report.png"]
    assert (out / "report.csv").read_text().count("\n") == 3 and temporary_files(out) == []


# ------------------------------------------------------------------------- unwritable outputs


@pytest.mark.slow  # a subprocess per app (~10 s); the quick tier keeps report's full-disk case
@pytest.mark.parametrize(("app", "setting"), [("train", "hydra.run.dir"), ("export", "hydra.sweep.dir")])
def test_a_run_directory_under_a_file_is_one_error_line(tmp_path, blocker, app, setting):
    multirun = ["-m"] if setting == "hydra.sweep.dir" else []
    result = run_python(["-m", f"bts_lightning.{app}", *multirun, "ckpt_path=x.ckpt", f"{setting}={blocker}/sub"],
                        tmp_path)
    assert_one_error_line(result, f"Cannot create folder {blocker}/sub ({setting}): {blocker} is a file")


def test_outputs_under_a_file_are_one_error_line(tiny_checkpoint, tmp_path, blocker, capsys):
    cfg = compose_app("export", [f"ckpt_path={tiny_checkpoint.path}", f"output={blocker}/sub/model.onnx"], tmp_path)
    with pytest.raises(OutputError, match=rf"Cannot create folder {blocker}/sub \(output\): {blocker} is a file"):
        export(cfg)
    _write_run(tmp_path / "runs" / "a", "unet", seed=1, val_fold=1, val_dice=0.7, test_dice=0.6)
    cfg = compose_app("report", [f"dirs={tmp_path / 'runs'}", f"out={blocker / 'report'}"], tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_app(report_app, cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: Cannot create folder {blocker}/report (out): {blocker} is a file; choose a writable folder.\n")


# ------------------------------------------------------------------------- errors in the run log


def test_run_app_logs_errors_to_the_log_files_only(tmp_path, capsys):
    root = logging.getLogger()
    log_file, console = logging.FileHandler(tmp_path / "app.log"), logging.StreamHandler(sys.stdout)
    root.addHandler(log_file)
    root.addHandler(console)

    def user_error() -> None:
        raise DataError("no slices")

    def crash() -> None:
        raise KeyError("unexpected")

    try:
        with pytest.raises(SystemExit):
            run_app(user_error)
        with pytest.raises(KeyError):
            run_app(crash)
    finally:
        root.removeHandler(log_file)
        root.removeHandler(console)
        log_file.close()
    logged = (tmp_path / "app.log").read_text()
    assert logged.startswith("error: no slices\nKeyError: 'unexpected'\nTraceback (most recent call last):")
    assert 'raise KeyError("unexpected")' in logged
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "error: no slices\n"


@pytest.mark.parametrize(("rank", "printed"), [({}, True), ({"LOCAL_RANK": "0", "RANK": "0"}, True),
                                               ({"LOCAL_RANK": "1"}, False), ({"RANK": "3"}, False)])
def test_a_user_error_is_printed_by_rank_zero_only(rank, printed, tmp_path, capsys, monkeypatch):
    """Each DDP process runs the same checks: their one error line is printed once, by rank 0 (all exit 2)."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in rank.items():
        monkeypatch.setenv(name, value)

    def user_error() -> None:
        raise DataError("no slices")

    with pytest.raises(SystemExit) as stop:
        run_app(user_error)
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: no slices\n" if printed else "")


def test_a_run_stopped_by_sigterm_fails_and_says_how_to_resume(tmp_path, capsys):
    """Lightning turns SIGTERM into a SystemExit without a status (success to a shell, SLURM or a sweep)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    root = logging.getLogger()
    log_file = logging.FileHandler(tmp_path / "app.log")
    root.addHandler(log_file)

    def train() -> None:  # a training run: it says how to resume
        raise SIGTERMException

    try:
        with pytest.raises(SystemExit) as exit_info:
            run_app(train)
    finally:
        root.removeHandler(log_file)
        log_file.close()
    assert exit_info.value.code == 143
    message = "error: stopped by SIGTERM; a training run resumes with ckpt_path=last.\n"
    assert capsys.readouterr().err == message and (tmp_path / "app.log").read_text() == message


def _ctrl_c_in_lightning() -> None:
    """What Lightning's ``_call_and_handle_interrupt`` does on Ctrl-C: ``sys.exit(1)`` while handling it."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


def _ctrl_c_elsewhere() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupted", [_ctrl_c_in_lightning, _ctrl_c_elsewhere])
def test_a_run_stopped_by_ctrl_c_fails_with_the_shells_status_and_says_how_to_resume(interrupted, capsys,
                                                                                   monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_app(interrupted)  # another app (evaluate, predict...): nothing to resume
    assert exit_info.value.code == 130 and capsys.readouterr().err == "error: stopped by Ctrl-C (SIGINT).\n"
    monkeypatch.setattr(interrupted, "__name__", "train")
    with pytest.raises(SystemExit) as exit_info:
        run_app(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("error: stopped by Ctrl-C (SIGINT); a training run resumes with "
                                       "ckpt_path=last.\n")


def test_an_app_that_exits_1_on_its_own_keeps_its_status(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_app(sys.exit, 1)
    assert exit_info.value.code == 1 and capsys.readouterr().err == ""


def test_the_run_record_is_written_atomically_and_put_back_when_the_job_refuses_its_input(tmp_path, capsys):
    """Hydra's .hydra/*.yaml: a full disk keeps the old file (one error line); a refused job restores it."""
    import hydra.core.utils
    from omegaconf import OmegaConf

    from bts_lightning import runtime

    runtime.save_run_record_atomically()
    assert hydra.core.utils._save_config is runtime._save_config  # run_job looks the name up here
    record = tmp_path / ".hydra"
    record.mkdir()
    (record / "overrides.yaml").write_text("- model=unet\n")
    try:
        runtime._save_config(OmegaConf.create(["model=attention_unet"]), "overrides.yaml", record)
        runtime._save_config(OmegaConf.create({"a": 1}), "config.yaml", record)  # a new file: nothing to put back
        assert (record / "overrides.yaml").read_text() == "- model=attention_unet\n"
        runtime.restore_run_record()
        assert (record / "overrides.yaml").read_text() == "- model=unet\n"

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runtime, "_fsync", full_disk)
            with pytest.raises(SystemExit) as exit_info:
                runtime._save_config(OmegaConf.create(["x=1"]), "overrides.yaml", record)
        assert exit_info.value.code == 2 and (record / "overrides.yaml").read_text() == "- model=unet\n"
        assert capsys.readouterr().err.startswith(f"error: Could not write {record / 'overrides.yaml'}")
    finally:
        runtime._replaced_record.clear()


def test_files_written_together_take_their_places_in_order_after_all_are_written(tmp_path, monkeypatch):
    """Every file is complete beside its place before the first rename; the renames follow the given order; a failure
    while staging changes nothing, and a first write that fails leaves none of the folders it made."""
    from bts_lightning import runtime

    renamed: list[str] = []
    real_replace = os.replace

    def replace(source, target):
        if not renamed:  # the first rename: every file is staged, whole
            staged = sorted(path.name for path in (tmp_path / "out").rglob(".*.tmp"))
            assert len(staged) == 3, staged
        renamed.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(runtime.os, "replace", replace)
    files = {"model.bin": b"weights", "sub/notes.txt": b"notes", "config.json": b"{}"}
    runtime.write_files_together(tmp_path / "out", files)
    assert renamed == ["model.bin", "notes.txt", "config.json"]
    assert {str(path.relative_to(tmp_path / "out")): path.read_bytes() for path in (tmp_path / "out").rglob("*")
            if path.is_file()} == files

    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "_fsync", full_disk)
    with pytest.raises(Exception, match="No space left on device"):
        runtime.write_files_together(tmp_path / "out", {"model.bin": b"other", "config.json": b"[]"})
    assert (tmp_path / "out" / "model.bin").read_bytes() == b"weights" and not list((tmp_path / "out").rglob(".*.tmp"))
    with pytest.raises(Exception, match="No space left on device"):
        runtime.write_files_together(tmp_path / "new" / "deeper", files)
    assert not (tmp_path / "new").exists()
