"""``experiment=cross_dataset``: score a trained model in domain and on every slice of a second dataset.

After training, :func:`evaluate_across` calls the evaluate app's function (:func:`bts_lightning.evaluate.evaluate`)
twice on one model file (:func:`checkpoint_to_score`):

- in domain: the training data's held-out split, into ``<run dir>/cross_dataset/in_domain/``;
- cross-dataset: every slice (``split=all``) of ``cross_data``, a data config (``data@cross_data=lgg``), into
  ``<run dir>/cross_dataset/<its name>/``.

Each writes evaluate's ``metrics.json``, ``per_image.csv`` and ``worst_slices.png``; the training run's
``metrics.json`` keeps one :func:`evaluation_row` of each (``cross_dataset.evaluations``), which ``report``
shows side by side.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from bts_lightning.data.channels import parse_channels
from bts_lightning.data.layouts import detect_layout
from bts_lightning.data.neighbours import SCAN_LAYOUTS, check_neighbours, window_size
from bts_lightning.data.suffix_layout import MASK_SUFFIX
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.evaluate import evaluate
from bts_lightning.inference import InferenceOptions
from bts_lightning.runtime import user_error_of
from bts_lightning.trained_split import channel_mapping

log = logging.getLogger(__name__)

# Settings of the evaluate app (conf/evaluate.yaml) that ``cross_evaluate`` may set.
EVALUATE_KEYS = ("device", "threshold", "tta", "postprocess", "slice_decision", "worst_k")
FOLDER = "cross_dataset"
IN_DOMAIN = "in_domain"


def evaluate_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.cross_evaluate`` as plain settings of the evaluate app, checked.

    Raises:
        ConfigError: a key the evaluate app does not take, or an invalid threshold or post-processing size.
    """
    options = OmegaConf.to_container(cfg.get("cross_evaluate") or OmegaConf.create({}), resolve=True)
    unknown = sorted(set(options) - set(EVALUATE_KEYS))
    if unknown:
        raise ConfigError(f"cross_evaluate.{unknown[0]} is not an evaluate setting; cross_evaluate takes "
                          f"{', '.join(EVALUATE_KEYS)}.")
    InferenceOptions.from_config(options, prefix="cross_evaluate.")
    return options


def check_cross_data(cfg: DictConfig, in_channels: int) -> str:
    """Check ``cfg.cross_data`` and ``cfg.cross_evaluate`` before training: a data config whose channels the model
    (``in_channels``, over its ``data.neighbours`` window) takes, and valid evaluate settings.

    Returns the channel line of :func:`~bts_lightning.trained_split.channel_mapping`.

    Raises:
        ConfigError: ``cross_data`` is not a data config, ``cross_data.channels`` gives another channel count, or
            :func:`evaluate_options` refuses ``cross_evaluate``.
        BtsError: its slices cannot be found or read (:func:`check_cross_files`).
    """
    evaluate_options(cfg)
    other = cfg.cross_data
    if not OmegaConf.is_dict(other) or "_target_" not in other:
        shown = other if not OmegaConf.is_config(other) else OmegaConf.to_container(other)
        raise ConfigError(f"cross_data={shown} is not a data config: choose the second dataset with "
                          "data@cross_data=<option of conf/data/>, e.g. data@cross_data=lgg.")
    trained = {"name": cfg.data.get("name"), "channels": cfg.data.channels}
    name = other.get("name") or Path(str(other.root)).name
    neighbours = check_neighbours(cfg.data.get("neighbours", 0))
    if neighbours:
        check_cross_scans(other, name, neighbours)
    per_slice = in_channels // window_size(neighbours)
    line = channel_mapping(per_slice, trained, parse_channels(other.channels, "cross_data.channels"), name,
                           key="cross_data.channels")
    check_cross_files(other, neighbours)
    return line


def check_cross_files(other: DictConfig, neighbours: int) -> None:
    """Find and read every slice of ``cross_data`` as its evaluation will (without caching them), so a missing
    folder or a bad file stops the run before training; the error names the ``cross_data.*`` keys."""
    data = other.copy()
    with open_dict(data):
        data.neighbours, data.cache = neighbours, False
    try:
        instantiate(data, augmentations=None).setup("test")
    except Exception as error:
        found = user_error_of(error)
        if found is None:
            raise
        raise type(found)(f"cross_data: {_DATA_KEY.sub('cross_data.', str(found))}") from None


_DATA_KEY = re.compile(r"(?<![\w./-])data\.(?=[a-z_])")  # a data.<key> setting named in a message, not a path


def check_cross_scans(other: DictConfig, name: str, neighbours: int) -> None:
    """``ConfigError`` when a model with scan ``neighbours`` would be scored on ``cross_data`` whose folder (found
    here) is not in one folder per scan; a root that is not there yet is left to the evaluation to report."""
    root = Path(str(other.root)).expanduser()
    layout = other.get("layout", "auto")
    if layout == "auto" and root.is_dir():
        try:
            layout = detect_layout(root, str(other.get("mask_suffix", MASK_SUFFIX)))
        except DataError:
            return  # the evaluation reports it, with the data's own error
    if layout not in ("auto", *SCAN_LAYOUTS):
        raise ConfigError(f"cross_data {name} ({root}) is in the {layout} layout, without one folder per scan, but the "
                          f"model takes data.neighbours={neighbours} scan neighbours: choose a cross dataset in the "
                          "suffix layout (e.g. data@cross_data=lgg), or train with data.neighbours=0.")


def checkpoint_to_score(trainer: L.Trainer, best_path: str | None, output_dir: Path) -> Path:
    """``best_path``, or the final weights saved as ``checkpoints/final.ckpt`` when no callback chose a best one.

    Call it on every process (saving a checkpoint is collective under DDP).
    """
    if best_path:
        return Path(best_path)
    path = output_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(path)
    return path


def evaluation_config(cfg: DictConfig, data: dict[str, Any], split: str, ckpt_path: Path, output_dir: Path) -> DictConfig:
    """The evaluate app's config: :func:`evaluate_options`, the model file, ``data`` and ``split``."""
    return OmegaConf.create({**evaluate_options(cfg), "ckpt_path": str(ckpt_path), "split": split, "data": data,
                             "paths": {"output_dir": str(output_dir)}})


def evaluation_row(role: str, metrics: dict[str, Any], output_dir: Path, chose_checkpoint: bool) -> dict[str, Any]:
    """What a training run's ``metrics.json`` keeps of one evaluation (evaluate's ``metrics.json``).

    ``chose_checkpoint``: the scored slices also chose the checkpoint (the in-domain val split), so
    its scores are optimistic; ``decision_note``: where the model's slice decision was calibrated against
    these slices (evaluate's note; ``None`` without a decision).
    """
    return {
        "role": role,
        "dataset": metrics["dataset"],
        "split": metrics["split"],
        "chose_checkpoint": chose_checkpoint,
        "n_images": metrics["n_images"],
        "all_slices_dice": metrics["summary"]["dice"]["mean"],
        "tumor_slices": metrics["tumor_slices"],
        "empty_slices": metrics["empty_slices"],
        "channels": metrics["channels"],
        "decision_note": metrics.get("decision_note"),
        "output_dir": str(output_dir),
    }


def evaluate_across(cfg: DictConfig, ckpt_path: Path, in_domain_split: str, chosen_on: str | None) -> dict[str, Any]:
    """Score ``ckpt_path`` on ``in_domain_split`` of ``cfg.data`` and on every slice of ``cfg.cross_data``.

    ``chosen_on``: the split of ``cfg.data`` that chose the checkpoint (``val``), or ``None``.

    Returns ``{"checkpoint", "trained_on", "evaluations": [in-domain row, cross-dataset row]}``.
    """
    training = OmegaConf.to_container(cfg.data, resolve=True)
    other = OmegaConf.to_container(cfg.cross_data, resolve=True)
    base = Path(cfg.paths.output_dir) / FOLDER
    cross_name = other.get("name") or Path(str(other["root"])).name  # the data module's name, as it falls back
    runs = (("in-domain", training, in_domain_split, IN_DOMAIN), ("cross-dataset", other, "all", cross_name))
    evaluations = []
    for role, data, split, folder in runs:
        output_dir = base / folder
        log.info("Scoring %s on %s (%s, split=%s) into %s", ckpt_path.name, data.get("name"), role, split, output_dir)
        metrics = evaluate(evaluation_config(cfg, data, split, ckpt_path, output_dir))
        evaluations.append(evaluation_row(role, metrics, output_dir, role == "in-domain" and split == chosen_on))
    return {"checkpoint": str(ckpt_path), "trained_on": evaluations[0]["dataset"], "evaluations": evaluations}
