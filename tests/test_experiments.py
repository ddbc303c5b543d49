"""Resume after a kill, non-finite loss, determinism, compiled checkpoints, DDP on CPU, cross-validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bts_lightning.callbacks import TrainingDivergedError
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.train import build_module, train
from tests.conftest import REPO_ROOT, assert_one_error_line, compose_train, run_cli
from tests.test_train import SMALL_SYNTHETIC

QUICK = [*SMALL_SYNTHETIC, "trainer=cpu", "data.num_workers=0", "trainer.deterministic=true", "test=false"]


def history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["val_history"]


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint_and_matches_uninterrupted(tmp_path):
    # 120 slices: epochs long enough to kill the run inside the one after its first last.ckpt (with 40, an idle
    # machine finished the remaining epochs within the half second the test used to wait)
    args = ["bts_lightning.train", *QUICK, "data.synthetic.n=120", "trainer.max_epochs=4",
            f"paths.data_dir={tmp_path / 'data'}"]
    reference = run_cli([*args, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "killed"
    env_args = [sys.executable, "-m", *args, f"hydra.run.dir={run}"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(env_args, cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.exists() and not (run / "metrics.json").exists(), "the run finished before it could be killed"
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert epoch_at_kill < 3

    record = {path.name: path.read_bytes() for path in (run / ".hydra").iterdir()}
    refused = run_cli([*args, "model=attention_unet", f"hydra.run.dir={run}", "ckpt_path=last"], cwd=tmp_path)
    assert refused.returncode == 2 and "it holds another network" in refused.stderr
    assert {path.name: path.read_bytes() for path in (run / ".hydra").iterdir()} == record  # the run's own record

    resumed = run_cli([*args, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs_trained"] == 4
    assert history(run) == history(tmp_path / "reference")


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_best_checkpoint(tmp_path):
    cfg = compose_train([*QUICK, "trainer.max_epochs=3", f"paths.data_dir={tmp_path / 'data'}"], tmp_path / "run")
    original = SegmentationModule.compute_loss

    def diverge_in_epoch_two(self, outputs, masks, distance=None):
        loss = original(self, outputs, masks, distance)
        return loss * float("nan") if self.current_epoch == 1 and self.training else loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SegmentationModule, "compute_loss", diverge_in_epoch_two)
        with pytest.raises(TrainingDivergedError, match=r"\(earlier best.ckpt/last.ckpt are intact\)\. Try a lower "
                                                         r"learning rate \(optimizer.lr, now [^)]*\)\.$"):
            train(cfg)  # at 32-true precision, no advice to use it
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(tmp_path / "run" / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert checkpoint["epoch"] == 0
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_same_seed_and_deterministic_give_identical_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_train([*QUICK, "trainer.max_epochs=2", f"paths.data_dir={tmp_path / 'data'}"], tmp_path / name)
        runs.append(train(cfg)["val_history"])
    assert runs[0] == runs[1]


def test_compiled_and_uncompiled_checkpoints_are_interchangeable(tmp_path):
    compiled = build_module(compose_train(["model=lraspp", "model.compile=true"], tmp_path))
    plain = build_module(compose_train(["model=lraspp", "model.compile=false"], tmp_path))
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())


def test_compiled_checkpoints_load_uncompiled_for_inference(tmp_path):
    """Inference must not recompile (minutes per new batch shape on CPU) nor need a compiler."""
    from bts_lightning.checkpoint import load_module

    cfg = compose_train(["model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "model.compile=true"], tmp_path)
    compiled = build_module(cfg)
    assert compiled.net._compiled_call_impl is not None
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": compiled.state_dict(), "hyper_parameters": dict(compiled.hparams)}, path)
    loaded = load_module(path)
    assert loaded.net._compiled_call_impl is None
    assert loaded.hparams.compile is False
    assert all(torch.equal(value, compiled.state_dict()[key]) for key, value in loaded.state_dict().items())


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_single_process_evaluation(tmp_path):
    """Two gloo processes score every validation slice exactly once (no padding with repeated slices)."""
    run = tmp_path / "run"
    # 39 slices, 3 per patient, 5 folds: validation fold 1 holds 9 slices, which 2 ranks cannot split evenly.
    odd = ["data.synthetic.n=39", "+data.synthetic.slices_per_patient=3", "data.batch_size=4"]
    result = run_cli(
        ["bts_lightning.train", *QUICK, *odd, "trainer=ddp_cpu", "trainer.max_epochs=1",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]
    saved = json.loads((run / "metrics.json").read_text())

    import lightning as L

    from bts_lightning.data.datamodule import BrainTumorDataModule

    checkpoint = run / "checkpoints" / "best.ckpt"
    module = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu")
    datamodule = BrainTumorDataModule(tmp_path / "data" / "synthetic" / "n39-size64-seed0", image_size=64,
                                      batch_size=4, num_workers=0, val_fold=1, test_fold=2, download=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert len(datamodule.datasets["val"]) == 9
    assert single["val/dice"] == pytest.approx(saved["best_val_dice"], abs=1e-6)
    assert single["val/iou"] == pytest.approx(saved["val_history"][0]["val/iou"], abs=1e-6)


@pytest.mark.slow
def test_cross_validation_experiment_trains_one_model_per_fold(tmp_path):
    sweep = tmp_path / "cv"
    result = run_cli(
        ["bts_lightning.train", "experiment=cv", *SMALL_SYNTHETIC, "trainer=cpu", "debug=fast_dev_run",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from omegaconf import OmegaConf

    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]
    folds = sorted(OmegaConf.load(job / ".hydra" / "config.yaml").data.val_fold for job in jobs)
    assert folds == [1, 2, 3, 4]
    assert all((job / "metrics.json").is_file() for job in jobs)


@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_maximizes_val_dice(tmp_path):
    sweep = tmp_path / "optuna"
    result = run_cli(
        ["bts_lightning.train", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.params.model='choice(unet,lraspp)'", *QUICK, "test=true", "debug=limit",
         "trainer.max_epochs=1", f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 2 and all((job / "metrics.json").is_file() for job in jobs)
    from omegaconf import OmegaConf

    best = OmegaConf.load(sweep / "optimization_results.yaml")
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    values = [job["best_val_dice"] for job in metrics]
    assert best.best_value == pytest.approx(max(values))
    # what the best value is, and the chosen trial's score on the split that chose nothing
    assert "chosen on the validation split twice" in best.best_value_is
    chosen = values.index(max(values))
    assert best.best_trial.job == chosen and best.best_trial.test_dice == metrics[chosen]["test"]["test/dice"]
    assert f"the best trial is job #{chosen}" in result.stderr + result.stdout

    # without the metric history a trial has no best_val_dice to return: one error line before training
    result = run_cli(["bts_lightning.train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *QUICK,
                      "callbacks=none", f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'none'}"],
                     cwd=tmp_path)
    assert_one_error_line(result, "hparams_search=optuna maximizes best_val_dice", "callbacks=none")


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_refused_job_and_names_it(tmp_path):
    """Job #1 (val fold 2 = the test fold) is refused; #0 and #2 train, and the sweep ends with exit status 2 naming
    #1. A sweep whose first job is refused stops there (the settings all jobs share are the likely cause)."""
    common = ["bts_lightning.train", "-m", *QUICK, "debug=limit", "trainer.max_epochs=1", "data.test_fold=2",
              f"paths.data_dir={tmp_path / 'data'}"]
    result = run_cli([*common, "data.val_fold=1,2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "data.val_fold and data.test_fold are both 2" in errors[0], errors
    assert errors[1].startswith("error: 1 job(s) of the sweep were refused") and f"#1 ({tmp_path / 'sweep' / '1'})" in \
        errors[1]
    assert [(tmp_path / "sweep" / job / "metrics.json").is_file() for job in "012"] == [True, False, True]

    result = run_cli([*common, "data.val_fold=2,1", f"hydra.sweep.dir={tmp_path / 'first'}"], cwd=tmp_path)
    assert_one_error_line(result, "data.val_fold and data.test_fold are both 2")
    assert not (tmp_path / "first" / "1").exists()


# A sweep's app (train's config, a stand-in for training): job seed=2 is refused, seed=3 crashes.
REFUSE_THEN_CRASH = """
import sys
from bts_lightning.errors import ConfigError
from bts_lightning.runtime import hydra_app

def app(cfg):
    if cfg.seed == 2:
        raise ConfigError("seed 2 is refused")
    if cfg.seed == 3:
        raise RuntimeError("seed 3 crashed")

hydra_app("train", app)()
"""


def test_a_sweep_stopped_by_a_later_job_still_names_the_refused_ones(tmp_path):
    script = tmp_path / "sweep_app.py"
    script.write_text(REFUSE_THEN_CRASH)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(script), "-m", "seed=1,2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            check=False, cwd=tmp_path, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "RuntimeError: seed 3 crashed" in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: seed 2 is refused",
                      ("error: 1 job(s) of the sweep were refused, each with its error above: "
                       f"#1 ({tmp_path / 'sweep' / '1'}). Then a later job stopped the sweep.")], result.stderr[-3000:]


def test_slurm_launcher_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir

    from bts_lightning.runtime import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "experiment=cv"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.sweeper.params["data.val_fold"] == "1,2,3,4"
