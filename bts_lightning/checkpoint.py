"""Load a training checkpoint for inference, without the training config.

A checkpoint written by ``bts_lightning.train`` holds the module's plain configs as hyperparameters
(net, loss, optimizer, scheduler and the module's own settings) and the network weights in its state
dict, so the file alone rebuilds the :class:`~bts_lightning.segmentation_module.SegmentationModule`.
Pretrained-weight names (``model.net.weights``) are cleared first: the state dict already holds the trained weights,
so nothing is ever downloaded to load a checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bts_lightning.errors import BtsError, first_line
from bts_lightning.runtime import atomic_path, user_error_of, write_json_atomic
from bts_lightning.segmentation_module import DATA_SETTINGS_KEY, DECISION_KEY, SegmentationModule

log = logging.getLogger(__name__)

_REQUIRED_HPARAMS = ("net", "loss", "optimizer")
# Suffixes of exported models (bts_lightning.inference.EXPORTED_SUFFIXES, which imports this module).
_EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")
# Module settings that checkpoints written before the model config became the module's kept in "model".
_LEGACY_MODULE_KEYS = ("compile", "freeze_backbone_epochs", "aux_loss_weight")


class CheckpointError(BtsError):
    """A checkpoint file is missing, unreadable or not written by bts_lightning."""


def read_checkpoint(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, checked to be a bts_lightning checkpoint.

    Loaded with ``weights_only=True`` (no arbitrary code runs). Raises :class:`CheckpointError`
    naming the path when the file is missing, unreadable, or lacks the module's hyperparameters.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"Checkpoint {path} {where}; give the checkpoints/best.ckpt (or last.ckpt) of a "
                              "training run.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt file, not a torch file, unsupported pickled objects...
        if path.suffix.lower() in _EXPORTED_SUFFIXES:
            raise CheckpointError(
                f"Checkpoint {path} could not be read: it is an exported model ({path.suffix}), which predict, evaluate "
                "and the demo take, but this needs a training checkpoint: the checkpoints/best.ckpt (or last.ckpt) "
                "of a training run."
            ) from None
        reason = ("it holds Python objects besides tensors and plain data, which are never loaded (no code in a file "
                  "runs)" if "weights only load failed" in str(error).lower()
                  else f"{type(error).__name__}: {first_line(error)}")
        raise CheckpointError(
            f"Checkpoint {path} could not be read ({reason}): it is not a PyTorch checkpoint of bts_lightning, or it "
            "is damaged (an interrupted copy or download); give the checkpoints/best.ckpt (or last.ckpt) of a "
            "training run, or copy it again."
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict) and isinstance(hparams.get("model"), dict) and "net" not in hparams:
        hparams = checkpoint["hyper_parameters"] = upgrade_hparams(hparams)
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or any(
        not isinstance(hparams.get(key), dict) for key in _REQUIRED_HPARAMS
    ):
        raise CheckpointError(
            f"{path} is not a bts_lightning checkpoint (expected 'state_dict' and hyperparameters "
            f"{', '.join(_REQUIRED_HPARAMS)}); use checkpoints/best.ckpt or last.ckpt of a training run."
        )
    return checkpoint


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters of an older checkpoint (``model: {name, ...}``) in today's layout (``net: {_target_, ...}``)."""
    upgraded = {key: value for key, value in hparams.items() if key != "model"}
    model = dict(hparams["model"])
    for key in _LEGACY_MODULE_KEYS:
        if key in model:
            upgraded[key] = model.pop(key)
    upgraded["net"] = {"_target_": "bts_lightning.models.build_model", **model}
    return upgraded


def load_module(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationModule:
    """Rebuild the :class:`SegmentationModule` of a checkpoint, in eval mode, on ``map_location``.

    ``net.weights`` is set to ``None`` before the network is built (the trained weights come from
    the state dict), so loading never downloads anything; ``compile`` is switched off, so a
    network trained compiled runs eagerly (no recompilation for every new batch shape, no compiler needed).
    The module's ``data_settings`` (``image_size``, ``channels``, ``neighbours``) are those the checkpoint keeps, or
    for older checkpoints those its data records hold.
    """
    checkpoint = read_checkpoint(ckpt_path, map_location)
    hparams = copy.deepcopy(checkpoint["hyper_parameters"])
    hparams["net"]["weights"] = None
    hparams["compile"] = False
    try:
        module = SegmentationModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except Exception as error:  # noqa: BLE001 - whatever fails, the checkpoint does not rebuild its module
        user_error = user_error_of(error)
        if user_error is not None:
            raise user_error from None
        raise CheckpointError(
            f"Checkpoint {ckpt_path} does not match the model it describes ({type(error).__name__}): "
            f"{first_line(error)}"
        ) from None
    module.on_load_checkpoint(checkpoint)  # the data_settings the checkpoint keeps
    if not module.data_settings:  # a checkpoint from before they were kept: from its data records
        recorded = {"image_size": training_image_size(ckpt_path), "channels": training_channels(ckpt_path),
                    "neighbours": training_neighbours(ckpt_path)}
        module.data_settings = {key: value for key, value in recorded.items() if value is not None}
    return module.to(map_location).eval()


# Network keys that do not change the network's parameters: a resumed run may change them.
_RESUMABLE_NET_KEYS = ("weights",)


# In a run's checkpoints/: written when fitting ended on its own (max_epochs, early stopping, max_time, max_steps),
# naming the training step of its last.ckpt. Without metrics.json beside the checkpoints, the run was stopped after
# fitting (in its test, calibration or cross-dataset scoring).
FIT_FINISHED_NAME = "fit_finished.json"


@dataclass(frozen=True)
class Resume:
    """Where a training run resumes from. ``finish_epochs``: set when fitting had ended (see
    :data:`FIT_FINISHED_NAME`): the epoch count to fit to, which trains nothing, before the steps after fitting."""

    path: Path
    finish_epochs: int | None = None


def mark_fit_finished(checkpoint_dir: Path, global_step: int, epochs: int) -> None:
    """Record in ``checkpoint_dir`` that fitting ended on its own at ``global_step`` after ``epochs`` epochs."""
    write_json_atomic(checkpoint_dir / FIT_FINISHED_NAME, {"global_step": global_step, "epochs": epochs})


def _finished_fit_epochs(checkpoint_dir: Path, checkpoint: Mapping[str, Any]) -> int | None:
    """The epochs of a fit that ended on its own with ``checkpoint`` (its last.ckpt) as final state, else None."""
    try:
        record = json.loads((checkpoint_dir / FIT_FINISHED_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("global_step") != checkpoint.get("global_step"):
        return None
    epochs = record.get("epochs")
    return epochs if isinstance(epochs, int) and epochs > 0 else None


def resolve_resume(ckpt_path: str | Path | None, run_dir: str | Path, net: Mapping[str, Any],
                   max_epochs: int | None = None) -> Resume | None:
    """The checkpoint a training run resumes from, checked before anything is fitted.

    ``None`` = start fresh. ``last`` = ``RUN_DIR/checkpoints/last.ckpt``, which must exist (resuming
    happens in the killed run's own directory). The file must be a readable bts_lightning checkpoint
    of the same network as ``net`` (the ``model.net`` config; ``weights`` may differ), saved before epoch
    ``max_epochs`` (else nothing would be trained), unless its fit had ended (early stopping included) and the run
    was stopped before writing ``RUN_DIR/metrics.json``: resuming then trains nothing and does what that run had
    left (the test of ``best.ckpt``, calibration, ``metrics.json``; :attr:`Resume.finish_epochs`). Raises
    :class:`CheckpointError` otherwise, naming the file and what to do.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        path = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last: there is no {path} to resume from. Resume in the interrupted run's own "
                "directory (hydra.run.dir=logs/train/runs/<date_time> ckpt_path=last) or pass ckpt_path=PATH/last.ckpt."
            )
    else:
        path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    stored, epoch = checkpoint["hyper_parameters"]["net"], checkpoint.get("epoch")
    wanted = dict(net)
    differences = [
        f"model.net.{key}: {stored.get(key)!r} in the checkpoint, {wanted.get(key)!r} now"
        for key in sorted(set(stored) | set(wanted), key=str)
        if key not in _RESUMABLE_NET_KEYS and stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"Cannot resume from {path}: it holds another network ({'; '.join(differences)}). Pass the model "
            "overrides the run was trained with, or start a new run without ckpt_path."
        )
    finished = _finished_fit_epochs(path.parent, checkpoint) if str(ckpt_path) == "last" else None
    if finished is not None and not (Path(run_dir) / "metrics.json").is_file():
        log.info("%s is the end of a fit (%d epochs) whose run stopped before writing metrics.json: this run trains "
                 "nothing and does the steps after fitting.", path, finished)
        return Resume(path, finish_epochs=finished)
    if isinstance(max_epochs, int) and max_epochs > 0 and isinstance(epoch, int) and epoch + 1 >= max_epochs:
        raise CheckpointError(f"{path} finished epoch {epoch + 1} of trainer.max_epochs={max_epochs} already, so "
                              "resuming would train nothing: raise trainer.max_epochs to train on from it.")
    return Resume(path)


def check_new_run_dir(run_dir: str | Path) -> None:
    """``CheckpointError`` when ``run_dir`` holds a training run (its checkpoints or ``metrics.json``): a new run
    there would replace that run's checkpoints, and until it wrote its own ``metrics.json`` the folder would show the
    earlier run's scores under the new run's config."""
    run_dir = Path(run_dir)
    found = [name for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.json")
             if (run_dir / name).is_file()]
    if found:
        raise CheckpointError(
            f"The run folder {run_dir} holds a training run already ({', '.join(found)}), which a new run (or one "
            "continued from another folder's checkpoint) would replace. Resume it with ckpt_path=last, or train into "
            "a new folder (another hydra.run.dir, or hydra.sweep.dir in a -m sweep; without them, a dated one)."
        )


# Lightning saves the data module's state (BrainTumorDataModule.state_dict: {"split": split record}) under its class name.
DATAMODULE_STATE_KEY = "BrainTumorDataModule"


def _differences(prefix: str, then: Any, now: Any) -> list[str]:
    """``"prefix.key: X then, Y now"`` for every leaf where two nested configs differ."""
    if isinstance(then, Mapping) and isinstance(now, Mapping):
        return [line for key in sorted(set(then) | set(now), key=str)
                for line in _differences(f"{prefix}.{key}", then.get(key), now.get(key))]
    return [] if then == now else [f"{prefix}: {then!r} then, {now!r} now"]


def check_resume_settings(ckpt_path: str | Path, hparams: Mapping[str, Any], data_settings: Mapping[str, Any],
                          split: Mapping[str, Any], seed: int | None = None) -> None:
    """Resuming continues the same run, so what it trains with now must be what ``ckpt_path`` was trained with: the
    module's ``hparams`` (loss, optimizer, scheduler, ...; ``net`` is :func:`resolve_resume`'s), the input
    (``data_settings``: image size, channels, neighbours) and the train/val/test slices (``split``, the data module's
    :meth:`split_record`), and the ``seed`` every epoch is seeded from (``EpochSeed``'s, when the checkpoint has it).
    Lightning restores the optimizer's state over a changed optimizer (another class crashes,
    another learning rate is silently replaced), mixes input sizes in one run, and with another split ``best.ckpt``
    compares scores of different slices while trained slices could be validated. Raises :class:`CheckpointError`
    naming what differs; entries the checkpoint does not record pass."""
    checkpoint = _stored(Path(ckpt_path))
    stored = checkpoint.get("hyper_parameters") or {}
    differ = [line for key in sorted(set(stored) & set(hparams) - {"net", "compile"})
              for line in _differences(key, stored[key], hparams[key])]
    trained_data = checkpoint.get(DATA_SETTINGS_KEY) or {}
    differ += [line for key in sorted(set(trained_data) & set(data_settings))
               for line in _differences(f"data.{key}", trained_data[key], data_settings[key])]
    seeded = [state.get("seed") for key, state in (checkpoint.get("callbacks") or {}).items()
              if "EpochSeed" in str(key) and isinstance(state, Mapping) and "seed" in state]
    if seed is not None and seeded and seeded[0] != seed:
        differ.append(f"seed: {seeded[0]!r} then, {seed!r} now")
    trained = (checkpoint.get(DATAMODULE_STATE_KEY) or {}).get("split")
    if isinstance(trained, Mapping):
        subsets = [name for name in split["subsets"]
                   if (trained["subsets"].get(name) or {}).get("sha256") != split["subsets"][name]["sha256"]]
        if subsets:
            then = trained.get("settings", {})
            differ.append(f"the {', '.join(subsets)} slices of the split (" + ("; ".join(
                f"data.{key}: {then.get(key)!r} then, {split['settings'].get(key)!r} now"
                for key in ("root", "split_by", "val_fold", "test_fold", "num_folds", "val_fraction", "test_fraction",
                            "seed") if then.get(key) != split["settings"].get(key)) or "the data changed") + ")")
    if differ:
        raise CheckpointError(
            f"Cannot resume from {ckpt_path}: its run was trained with other settings ({'; '.join(differ)}). Resume "
            "with the overrides the run was started with, or start a new run without ckpt_path."
        )


def training_image_size(ckpt_path: str | Path) -> int | None:
    """``data.image_size`` the checkpoint was trained at, or ``None`` when it cannot be told.

    Checkpoints of ``bts_lightning.train`` store it with the data module's hyperparameters; for
    older ones, the run's ``.hydra/config.yaml`` (``RUN/checkpoints/best.ckpt`` -> ``RUN/.hydra``)
    is read instead.
    """
    path = Path(ckpt_path).resolve()
    size = _stored(path).get("datamodule_hyper_parameters", {}).get("image_size")
    if size is None:
        size = _from_run_config(path, "data.image_size")
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def training_channels(ckpt_path: str | Path) -> Any:
    """``data.channels`` the checkpoint was trained with (``"gray"`` or a list, unchecked), or ``None`` when unknown.

    Read from the split record the checkpoint holds, else from its run's ``.hydra/config.yaml``;
    checkpoints from before ``data.channels`` have neither (they were trained on gray slices).
    """
    return _recorded_setting(Path(ckpt_path).resolve(), "channels")


def training_neighbours(ckpt_path: str | Path) -> int:
    """``data.neighbours`` the checkpoint was trained with (from its split record, else its run's config); 0 when
    neither records it (checkpoints from before ``data.neighbours`` were trained on slices alone)."""
    neighbours = _recorded_setting(Path(ckpt_path).resolve(), "neighbours")
    return neighbours if isinstance(neighbours, int) and not isinstance(neighbours, bool) and neighbours > 0 else 0


def _recorded_setting(path: Path, key: str) -> Any:
    """``data.<key>`` of checkpoint ``path``: from the split record it holds, else from its run's config; ``None``."""
    record = (_stored(path).get(DATAMODULE_STATE_KEY) or {}).get("split") or {}
    value = record.get("settings", {}).get(key) if isinstance(record, dict) else None
    return value if value is not None else _from_run_config(path, f"data.{key}")


def _stored(path: Path) -> dict[str, Any]:
    """The checkpoint dict (memory-mapped), or ``{}`` when unreadable: loading it reports that properly."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a readable checkpoint
        return {}
    return checkpoint if isinstance(checkpoint, dict) else {}


def _from_run_config(path: Path, key: str) -> Any:
    for run_dir in (path.parent.parent, path.parent):
        config_file = run_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            continue
        try:
            value = OmegaConf.select(OmegaConf.load(config_file), key, default=None, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - unreadable or unresolvable config: no hint, not an error
            return None
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return None


def write_decision(ckpt_path: str | Path, decision: Mapping[str, Any]) -> None:
    """Store ``decision`` (a ``SliceDecision.to_dict()``) in checkpoint ``ckpt_path``, replacing any earlier one.

    The file is rewritten atomically (temporary file beside it, then renamed): it always holds the old or
    the new checkpoint. Raises :class:`CheckpointError` when it is not a readable bts_lightning checkpoint,
    :class:`~bts_lightning.errors.OutputError` when it cannot be written.
    """
    checkpoint = read_checkpoint(ckpt_path)
    checkpoint[DECISION_KEY] = dict(decision)
    with atomic_path(ckpt_path) as temporary, temporary.open("wb") as stream:
        torch.save(checkpoint, stream)
