"""Hydra app: ``python -m bts_lightning.cascade segmentation=A/best.ckpt presence=B/best.ckpt``.

Joins two training checkpoints of the same data split into one (:mod:`bts_lightning.models.cascade`):
the segmentation of ``segmentation`` (e.g. trained on tumor slices only, the best segmentation) on the
slices that ``presence`` (e.g. trained with ``experiment=empty_slices``, which learns to leave empty
slices empty) says have a tumor, and an empty mask elsewhere (``presence=[B1.ckpt,B2.ckpt]``: an ensemble of presence
networks, e.g. trained with different seeds, whose tumor probability maps are averaged). The presence threshold is
calibrated on the ``split`` slices (val by default) so that at most ``target_false_alarm_rate`` of their empty slices
pass it (``target_on=new_slices``: at most that share of new empty slices is expected to); the joined checkpoint then
gets the usual slice decision (``calibrate``, rule ``component_fraction``) on the same slices. It is an ordinary
checkpoint: ``evaluate``, ``predict``, ``export``, ``demo`` take it.
With ``context=K`` (K > 0; the data in one folder per scan, e.g. the LGG layout) it also gets a scan context
(:mod:`bts_lightning.scan_context`): the presence probability averaged over each slice and K slices either side
in its scan, with its own threshold calibrated on the same empty slices, which ``evaluate`` and ``predict`` apply.
``cascade.json`` in the run folder records both sources, the thresholds and what they reach on ``split``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bts_lightning.calibrate import (
    calibrate_on,
    check_enough_empty,
    check_settings,
    check_target_on_setting,
    reached_line,
    score_slices,
)
from bts_lightning.checkpoint import (
    DECISION_KEY,
    load_module,
    read_checkpoint,
    training_channels,
    training_image_size,
    training_neighbours,
)
from bts_lightning.data.dataset import SliceDataset
from bts_lightning.decision import calibrate as threshold_for
from bts_lightning.decision import chance_warning, on_new_slices, on_new_slices_line, rate_above
from bts_lightning.errors import ConfigError
from bts_lightning.evaluate import load_split
from bts_lightning.inference import CHECKPOINT_SUFFIXES, ModelContract, ModulePredictor
from bts_lightning.models.cascade import Cascade
from bts_lightning.runtime import (
    atomic_path,
    flag_setting,
    hydra_app,
    number_setting,
    write_json_atomic,
)
from bts_lightning.scan_context import (
    Position,
    ScanContext,
    check_context,
    check_scan_layout,
    context_means,
    presence_probabilities,
)
from bts_lightning.segmentation_module import SegmentationModule
from bts_lightning.trained_split import same_held_out, stored_split

log = logging.getLogger(__name__)

CASCADE_TARGET = "bts_lightning.models.cascade.build_cascade"  # the network config of a joined checkpoint
# Checkpoint entries of a training run's state that a joined checkpoint does not continue.
_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks", "loops", DECISION_KEY)


def _checkpoint_path(cfg: Mapping[str, Any], key: str) -> Path:
    value = cfg.get(key)
    if not value:
        raise ConfigError(f"{key} is required: python -m bts_lightning.cascade segmentation=RUN_A/checkpoints/best.ckpt "
                          "presence=RUN_B/checkpoints/best.ckpt")
    path = Path(str(value))
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"{key}={value} is not a training checkpoint (.ckpt); a cascade joins the checkpoints of "
                          "two training runs.")
    return path


def _presence_paths(cfg: DictConfig) -> list[Path]:
    """``presence``: one checkpoint, or a list of them (an ensemble); each checked as ``_checkpoint_path`` does."""
    value = cfg.get("presence")
    if not OmegaConf.is_list(value) and not isinstance(value, (list, tuple)):
        return [_checkpoint_path(cfg, "presence")]
    if not value:
        raise ConfigError("presence=[] lists no checkpoint: give one (presence=RUN_B/checkpoints/best.ckpt) or "
                          "several (presence=[RUN_B/checkpoints/best.ckpt,RUN_C/checkpoints/best.ckpt]).")
    paths = [_checkpoint_path({"presence": item}, "presence") for item in value]
    seen: dict[str, Path] = {}
    for path in paths:  # the same file however it is spelled, or a copy of its network (calibrated or not)
        first = seen.setdefault(weights_sha256(path), path)
        if first is not path:
            same = "the same file" if first.resolve() == path.resolve() else "copies of one network"
            raise ConfigError(f"presence={[str(path) for path in paths]} lists a checkpoint twice ({first} and "
                              f"{path} are {same}); an ensemble averages different networks.")
    return paths


def weights_sha256(path: Path) -> str:
    """The sha256 of checkpoint ``path``'s network weights (names and bytes), whatever else its file holds (a
    calibrated copy keeps the weights of the file it was copied from)."""
    digest = hashlib.sha256()
    state = read_checkpoint(path)["state_dict"]
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_output(output: Path, inputs: Sequence[Path]) -> None:
    """``ConfigError`` when ``output`` is one of the ``inputs`` (it would replace that training checkpoint)."""
    for path in inputs:
        if output.exists() and output.samefile(path):  # however spelled or linked
            raise ConfigError(f"output={output} is one of the checkpoints it joins ({path}): writing the cascade there "
                              "would replace it. Choose another file, e.g. output=cascade.ckpt, or leave output out "
                              "(the run folder's checkpoints/cascade.ckpt).")


def check_compatible(segmentation: Path, presence: Path) -> None:
    """``ConfigError`` unless both checkpoints take the same input and held out the same val and test slices.

    The presence threshold is calibrated on the val split and the cascade is scored on the test split: both
    must be unseen by both networks.
    """
    checks = {
        "input channels (data.channels)": (training_channels(segmentation), training_channels(presence)),
        "scan neighbours (data.neighbours)": (training_neighbours(segmentation), training_neighbours(presence)),
        "image size (data.image_size)": (training_image_size(segmentation), training_image_size(presence)),
    }
    for what, (first, second) in checks.items():
        if first != second:
            raise ConfigError(f"segmentation={segmentation} and presence={presence} differ in {what}: {first} and "
                              f"{second}. Train both on the same data settings.")
    records = stored_split(segmentation), stored_split(presence)
    for path, record in zip((segmentation, presence), records, strict=True):
        if not isinstance((record or {}).get("subsets"), dict):
            raise ConfigError(f"{path} records no data split (a checkpoint from before split records): a cascade "
                              "needs to know that both networks held out the same val and test slices. Train it again.")
    if not same_held_out(*records):
        raise ConfigError(f"segmentation={segmentation} and presence={presence} were trained on different splits (their "
                          "val or test slices differ): the presence threshold is calibrated on val slices and the "
                          "cascade is scored on test slices that neither network saw. Train both with the same data, "
                          "data.val_fold and data.test_fold (or seed).")


def joined_checkpoint(segmentation: Path, presence: Sequence[Path], flips: bool) -> tuple[dict[str, Any],
                                                                                         SegmentationModule]:
    """The checkpoint dict of the cascade (presence threshold 0.5, uncalibrated) and its module, in eval mode.

    The dict starts from ``segmentation``'s: its data records (split, image size, channels) are that
    checkpoint's; its network config nests the networks' configs (``presence``: one config, or a list for an
    ensemble), its state dict all their weights. Training state (optimizer, loops, callbacks) and any slice decision
    are left out.
    """
    checkpoint = copy.deepcopy(read_checkpoint(segmentation))
    for key in _TRAINING_STATE:
        checkpoint.pop(key, None)

    def network_config(path: Path) -> dict[str, Any]:
        return dict(read_checkpoint(path)["hyper_parameters"]["net"], weights=None)

    presence_configs = [network_config(path) for path in presence]
    hparams = checkpoint["hyper_parameters"]
    segmentation_config = network_config(segmentation)
    hparams["net"] = {"_target_": CASCADE_TARGET, "name": "cascade",
                      "segmentation": segmentation_config,
                      "presence": presence_configs[0] if len(presence_configs) == 1 else presence_configs,
                      "presence_threshold": 0.5, "flips": bool(flips),
                      "in_channels": segmentation_config.get("in_channels", 1), "num_classes": 2, "weights": None}
    hparams["compile"] = False
    module = SegmentationModule(**hparams)
    joined = module.net.net
    joined.segmentation.load_state_dict(load_module(segmentation).net.state_dict())
    for network, path in zip(joined.presence_networks, presence):
        network.load_state_dict(load_module(path).net.state_dict())
    checkpoint["state_dict"] = module.state_dict()
    return checkpoint, module.eval()


def presence_scores(joined: Cascade, dataset: SliceDataset, batch_size: int = 16) -> tuple[list[float], list[bool]]:
    """:meth:`Cascade.presence_probability` of every slice of ``dataset``, and whether its truth has a tumor."""
    return score_slices(dataset, lambda images: presence_probabilities(joined, images), batch_size, desc="presence")


def calibrate_context(scores: list[float], tumor: list[bool], positions: list[Position], context: int,
                      target: float, slice_threshold: float, split: str,
                      target_on: str = "split") -> tuple[ScanContext, dict[str, Any]]:
    """The :class:`ScanContext` whose threshold lets at most ``target`` of the split's empty slices with a
    neighbour through (``target_on`` as in :func:`~bts_lightning.decision.calibrate`; slices without one are judged
    alone, against ``slice_threshold``), and its record for ``cascade.json``: the thresholds, and the false-alarm
    rate and sensitivity it reaches on the split."""
    means = context_means(scores, positions, context, fix="pass context=0")
    empty = [mean for mean, has_tumor in zip(means, tumor) if mean is not None and not has_tumor]
    if not empty:
        raise ConfigError(f"No empty slice of the {split} split has a neighbouring slice in its scan, so the scan "
                          "context cannot be calibrated there; check that each scan's slices are numbered (file names "
                          "ending in the slice number), or pass context=0.")
    check_enough_empty(len(empty), target, target_on, split, "the slices with a scan neighbour")
    scan_context = ScanContext(context, threshold_for(empty, target, target_on), slice_threshold)
    record = {**scan_context.to_dict(), "split": split, **_rates(scan_context.present(scores, positions), tumor),
              "on_new_empty_slices": on_new_slices(len(empty), target, target_on)}
    log.info("Scan context: %s; on the %s split, %.4f of the empty slices and %.4f of the tumor slices pass it; %s.",
             scan_context.describe(), split, record["false_alarm_rate"], record["sensitivity"] or 0.0,
             on_new_slices_line(record["on_new_empty_slices"]))
    if warning := chance_warning("The scan context", split, record["sensitivity"], record["false_alarm_rate"]):
        log.warning(warning)
    return scan_context, record


def _rates(kept: list[bool], tumor: list[bool]) -> dict[str, Any]:
    """Counts, false-alarm rate and sensitivity of slice decisions ``kept`` against the truth ``tumor``."""
    empty = [keep for keep, has_tumor in zip(kept, tumor) if not has_tumor]
    present = [keep for keep, has_tumor in zip(kept, tumor) if has_tumor]
    return {"n_empty": len(empty), "n_tumor": len(present),
            "false_alarm_rate": float(sum(empty)) / len(empty) if empty else None,
            "sensitivity": float(sum(present)) / len(present) if present else None}


def cascade(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Join ``cfg.segmentation`` and ``cfg.presence`` into ``cfg.output``, calibrated on ``cfg.split``.

    ``overrides``: the user's command-line overrides, as for ``evaluate`` (which data and split; by default
    the ``segmentation`` checkpoint's). The output is written once, complete. Returns the cascade.json content.
    """
    segmentation, presence = _checkpoint_path(cfg, "segmentation"), _presence_paths(cfg)
    target, rule = check_settings(cfg.get("target_false_alarm_rate"), "component_fraction")
    target_on = check_target_on_setting(cfg.get("target_on", "split"), target)
    split = str(cfg.get("split", "val"))
    flips = flag_setting(cfg, "flips", True)
    context = check_context(cfg.get("context", 0))
    for key, path in (("segmentation", segmentation), *(("presence", path) for path in presence)):
        net = read_checkpoint(path)["hyper_parameters"]["net"]  # a missing or foreign file fails here, naming it
        if net.get("_target_") == CASCADE_TARGET:
            raise ConfigError(f"{key}={path} is a cascade already (written by python -m bts_lightning.cascade); join the "
                              "training checkpoints it came from, which its run's cascade.json names.")
    for path in presence:
        check_compatible(segmentation, path)
    output = Path(str(cfg.get("output") or Path(cfg.paths.output_dir) / "checkpoints" / "cascade.ckpt"))
    check_output(output, [segmentation, *presence])

    scoring_cfg = copy.deepcopy(cfg)
    with open_dict(scoring_cfg):
        scoring_cfg.ckpt_path = str(segmentation)
    scoring = load_split(scoring_cfg, overrides, split, "cascade")  # the slices, as evaluate loads them
    if context:
        check_scan_layout(scoring.datamodule.found_layout, scoring.datamodule.root, "context=0")
    checkpoint, module = joined_checkpoint(segmentation, presence, flips)
    module.to(scoring.device)
    joined = module.net.net
    batch_size = int(number_setting(cfg, "data.batch_size", 16, whole=True, minimum=1))
    scores, tumor = presence_scores(joined, scoring.dataset, batch_size)
    empty = [score for score, has_tumor in zip(scores, tumor) if not has_tumor]
    check_enough_empty(len(empty), target, target_on, split, scoring.datamodule.name)
    present = [score for score, has_tumor in zip(scores, tumor) if has_tumor]
    threshold = threshold_for(empty, target, target_on)
    joined.presence_threshold = checkpoint["hyper_parameters"]["net"]["presence_threshold"] = threshold
    on_split = {"split": split, "n_empty": len(empty), "n_tumor": len(present),
                "false_alarm_rate": rate_above(empty, threshold), "sensitivity": rate_above(present, threshold),
                "on_new_empty_slices": on_new_slices(len(empty), target, target_on)}
    log.info("Presence threshold %.6g: on the %s split, %.4f of %d empty slices and %.4f of %d tumor slices pass it; %s.",
             threshold, split, on_split["false_alarm_rate"], len(empty), on_split["sensitivity"] or 0.0, len(present),
             on_new_slices_line(on_split["on_new_empty_slices"]))
    if warning := chance_warning("The presence threshold", split, on_split["sensitivity"], on_split["false_alarm_rate"]):
        log.warning(warning)
    context_record = None
    if context:
        positions = scoring.dataset.scan_positions()
        scan_context, context_record = calibrate_context(scores, tumor, positions, context, target, threshold, split,
                                                         target_on)
        joined.context, joined.context_threshold = context, scan_context.threshold
        net_config = checkpoint["hyper_parameters"]["net"]
        net_config["context"], net_config["context_threshold"] = context, scan_context.threshold

    contract = ModelContract.from_module(module, training_image_size(segmentation), training_channels(segmentation),
                                         training_neighbours(segmentation))
    decision = calibrate_on(ModulePredictor(module, scoring.device, contract), scoring.dataset, target, rule, 0.5,
                            split, scoring.datamodule.name, batch_size=batch_size, target_on=target_on)
    checkpoint[DECISION_KEY] = decision.to_dict()
    with atomic_path(output) as temporary, temporary.open("wb") as stream:
        torch.save(checkpoint, stream)
    result = {"checkpoint": str(output.resolve()), "segmentation": str(segmentation.resolve()),
              "presence": str(presence[0].resolve()) if len(presence) == 1 else [str(path.resolve()) for path in presence],
              "flips": flips, "presence_threshold": threshold, "target_on": target_on,
              "data_root": str(scoring.datamodule.root), "slices": scoring.scored,
              "presence_on_split": on_split,
              "scan_context": context_record,
              "decision": decision.to_dict()}
    write_json_atomic(Path(cfg.paths.output_dir) / "cascade.json", result)
    print(f"Cascade written to {output}", flush=True)
    print(reached_line(decision), flush=True)
    return result


main = hydra_app("cascade", cascade, pass_overrides=True)  # entry point: bts-cascade


if __name__ == "__main__":
    main()
