"""Hub-style model folders, following huggingface_hub's ``PyTorchModelHubMixin`` file names.

:func:`save_pretrained` writes a folder with

- ``config.json``: the :class:`~bts_lightning.inference.ModelContract` fields (image_size, channels,
  in_channels, ...) at the top level, plus ``net`` (the checkpoint's ``model.net`` config, ``weights``
  cleared) and ``module`` (the module's other hyperparameters: loss, optimizer, ...), so the folder alone
  rebuilds the :class:`~bts_lightning.segmentation_module.SegmentationModule`;
- ``model.safetensors``: the network's state dict (``module.net``);
- ``README.md``: a model card (architecture, training data, preprocessing, metrics, intended use); the numbers it
  shows are also in ``config.json``'s ``metrics`` (:func:`card_metrics`), so a copy of the folder keeps them.

:func:`from_pretrained` rebuilds the module from such a local folder, offline (only ``safetensors`` is
needed; huggingface_hub never is), and :func:`load_folder` gives its predictor, which
:func:`bts_lightning.inference.load_predictor` returns for a folder ``ckpt_path``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bts_lightning.checkpoint import CheckpointError
from bts_lightning.decision import SliceDecision
from bts_lightning.errors import BtsError, ConfigError, first_line, format_names
from bts_lightning.inference import ModelContract, ModulePredictor, load_predictor, resolve_device
from bts_lightning.runtime import file_sha256, json_bytes, user_error_of, write_files_together
from bts_lightning.segmentation_module import SegmentationModule

log = logging.getLogger(__name__)

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
# config.json's record of the weights file it belongs with.
WEIGHTS_HASH_KEY = "weights_sha256"
HUB_FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'bts_lightning[hub]'"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise BtsError(f"Hub model folders need the safetensors package: {INSTALL_HINT}") from None
    return safetensors.torch


def _plain(value: Any) -> Any:
    """``value`` as plain JSON-ready containers (OmegaConf configs and tuples unwrapped)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def hub_config(module: SegmentationModule, contract: ModelContract,
               metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content of ``module`` trained under ``contract``, with the :func:`card_metrics` of its
    run's ``metrics`` when there are any."""
    hparams = _plain(dict(module.hparams))
    net = dict(hparams.pop("net"))
    net["weights"] = None  # the trained weights are in model.safetensors
    hparams["compile"] = False
    shown = card_metrics(metrics)
    return {**contract.to_dict(), "net": net, "module": hparams, "library_name": "bts_lightning",
            "hub_format_version": HUB_FORMAT_VERSION, **({"metrics": shown} if shown else {})}


def card_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a model card shows of a run's ``metrics.json``: its ``dataset``, top-level numbers, ``test`` scores and
    ``selection`` note (``None`` without metrics); :func:`model_card` reads it as it reads the whole file."""
    if not metrics:
        return None

    def numbers(record: Any) -> dict[str, Any]:
        return {key: value for key, value in (record.items() if isinstance(record, Mapping) else ())
                if isinstance(value, (int, float)) and not isinstance(value, bool)}

    note = (metrics.get("selection") or {}).get("note") if isinstance(metrics.get("selection"), Mapping) else None
    return {**({"dataset": metrics["dataset"]} if metrics.get("dataset") else {}), **numbers(metrics),
            **({"test": numbers(metrics["test"])} if numbers(metrics.get("test")) else {}),
            **({"selection": {"note": note}} if note else {})}


def check_upload_folder(directory: str | Path, own: Collection[str], what: str) -> None:
    """``ConfigError`` when folder ``directory`` holds anything but ``own`` (the files of a ``what``) and hidden entries
    (``.git`` of a cloned repository) and ``__pycache__`` (running ``app.py`` there): such a folder is uploaded whole,
    so those files would be published with it."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    others = sorted(p.name for p in directory.iterdir()
                    if p.name not in own and not p.name.startswith(".") and p.name != "__pycache__")
    if others:
        raise ConfigError(f"output={directory} already holds {format_names(others)}: a {what} folder is uploaded as a "
                          "whole, so they would be published with it. Choose a new or empty folder (or one this "
                          "export wrote before, which it updates).")


def save_pretrained(
    source: SegmentationModule | str | Path,
    directory: str | Path,
    contract: ModelContract | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` of ``source`` into ``directory``; returns it.

    ``source`` is a training checkpoint or a hub folder (its contract and the numbers of its run, :func:`run_metrics`,
    are used) or a module (``contract`` defaults to ``ModelContract.from_module``: its network and the data it was
    trained on, its ``data_settings``; ``metrics`` to its ``card_metrics``). Each file is written atomically.
    """
    if isinstance(source, (str, Path)):
        predictor = load_predictor(source, device="cpu")
        if not isinstance(predictor, ModulePredictor):
            raise BtsError(f"{source} is not a training checkpoint; save_pretrained needs a .ckpt or a module.")
        module, contract = predictor.module, contract or predictor.contract
        metrics = metrics if metrics is not None else run_metrics(Path(source))
    else:
        module, contract = source, contract or ModelContract.from_module(source)
        metrics = metrics if metrics is not None else source.card_metrics
    check_upload_folder(directory, (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME), "hub model")
    config = hub_config(module, contract, metrics)
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in module.net.state_dict().items()}
    weights = _safetensors().save(state, metadata={"format": "pt"})
    config[WEIGHTS_HASH_KEY] = hashlib.sha256(weights).hexdigest()
    # config.json renamed last, naming its weights: a kill between the renames leaves a folder that is refused, never
    # loaded as a mix of two models.
    return write_files_together(directory, {WEIGHTS_NAME: weights, CARD_NAME: model_card(config, metrics).encode(),
                                            CONFIG_NAME: json_bytes(config)})


def run_metrics(ckpt_path: Path) -> dict[str, Any] | None:
    """The numbers of the model's training run, if known: a hub folder's ``config.json`` ``metrics``, else the
    ``metrics.json`` of the checkpoint's run (``RUN/checkpoints/x.ckpt`` -> ``RUN/metrics.json``), if readable and
    ``x.ckpt`` is the run's ``best_checkpoint`` (the one its numbers score; ``last.ckpt``'s weights are others)."""
    if ckpt_path.is_dir():
        return read_config(ckpt_path).get("metrics")
    path = ckpt_path.resolve().parent.parent / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict):
        return None
    checkpoint = ckpt_path.resolve()  # a link to RUN/checkpoints/best.ckpt is best.ckpt
    scored = checkpoint.parent / Path(str(metrics.get("best_checkpoint") or "final.ckpt")).name  # final: no callback
    scored_step = _saved_at_step(scored) if scored.name != checkpoint.name else None
    if scored.name != checkpoint.name and (scored_step is None or scored_step != _saved_at_step(checkpoint)):
        log.info("The model card shows no run metrics: %s holds other weights than %s, which %s scores.", ckpt_path,
                 scored.name, path)
        return None
    return metrics


def _saved_at_step(path: Path) -> int | None:
    """The training step checkpoint ``path`` was saved at (None when unreadable): two of one run saved at the same
    step (``best.ckpt`` and ``last.ckpt`` of the best epoch) hold the same weights."""
    try:
        step = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("global_step")
    except Exception:  # noqa: BLE001 - a missing or foreign file: not known to be the same weights
        return None
    return step if isinstance(step, int) else None


def _metric_lines(metrics: Mapping[str, Any] | None) -> list[str]:
    """Markdown bullet lines of the numbers in ``metrics`` (a training run's ``metrics.json``): its top-level
    ones and its ``test`` scores; other nested records are left out."""
    shown = card_metrics(metrics)
    if not shown:
        return ["- No metrics recorded with this checkpoint (see `python -m bts_lightning.evaluate`)."]
    test = {key if key.startswith("test/") else f"test {key}": value for key, value in shown.pop("test", {}).items()}
    note = shown.pop("selection", {}).get("note")
    shown.pop("dataset", None)
    lines = [f"- {key}: {value}" if isinstance(value, int) else f"- {key}: {value:.4g}"
             for key, value in {**shown, **test}.items()]
    return (lines or ["- The run's metrics.json holds no numbers."]) + ([f"\n{note}"] if note else [])


CARD_FRONT_MATTER = ("library_name: bts_lightning", "tags:", "- image-segmentation", "- medical-imaging",
                     "- brain-tumor")


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
               front_matter: tuple[str, ...] = CARD_FRONT_MATTER) -> str:
    """The ``README.md`` model card of a folder with ``config`` (and the training run's ``metrics``),
    headed by the YAML ``front_matter`` lines."""
    net = json.loads(json.dumps(config.get("net", {}), sort_keys=True))  # as config.json holds it: one order
    data = (metrics or {}).get("dataset") or "not recorded"
    settings = ", ".join(f"{key}={value}" for key, value in net.items() if key not in ("_target_", "weights", "name"))
    size = f"{config['image_size']} px square slices" if config.get("image_size") else "a slice size it does not record"
    return "\n".join([
        "---", *front_matter, "---", "",
        f"# Brain tumor segmentation: {config.get('model') or 'network'}", "",
        "2-D tumor segmentation of single MRI slices, trained with bts_lightning (PyTorch Lightning + Hydra).", "",
        "## Architecture", "", f"`{net.get('name', config.get('model'))}`: {settings}.", "",
        "## Training data", "", f"Dataset: {data}.", "",
        "## Preprocessing", "",
        f"- Input: {config.get('input')}.",
        (f"- Channels: {config.get('channels')} ({config.get('in_channels')} channel(s)); "
         f"trained at {size}."),
        *([(f"- Scan neighbours: each input stacks those channels of the slice and the {config['neighbours']} "
           "slice(s) before and after it in its scan (data.neighbours), in scan order.")]
          if config.get("neighbours") else []),
        f"- Normalization: {config.get('normalization')} (inside the model).",
        (f"- Output: tumor probability per pixel (softmax channel {config.get('tumor_class')}); "
         "tumor where probability > threshold (0.5 by default)."),
        *_decision_lines(config.get("decision")), *_scan_context_lines(net), "",
        "## Metrics", "", *_metric_lines(metrics), "",
        "## Intended use", "",
        "Research and teaching only. **Not a medical device: not for diagnosis, treatment or any clinical decision.**",
        "",
        "## Usage", "",
        "```bash",
        "python -m bts_lightning.predict ckpt_path=THIS_FOLDER input=SLICES output=OUT",
        "python -m bts_lightning.demo ckpt_path=THIS_FOLDER",
        "```", "",
    ])


def _decision_lines(decision: Mapping[str, Any] | None) -> list[str]:
    """The model card's line on the stored slice-level decision (none without one)."""
    if not decision:
        return []
    described = SliceDecision.from_dict(decision).describe()
    return [(f"- Slice-level decision: tumor present when {described}; other slices get an empty mask "
             "(`slice_decision=off` turns it off in the bts_lightning apps).")]


def _scan_context_lines(net: Mapping[str, Any]) -> list[str]:
    """The model card's line on a cascade's scan context (none without one)."""
    if not net.get("context"):
        return []
    return [(f"- Scan context: `evaluate` and `predict` keep a slice's mask when its presence probability "
             f"averaged with the {net['context']} slice(s) either side in its scan (a folder of numbered slices) "
             f"is above {net['context_threshold']:.6g}; a slice without neighbours, and every slice of an "
             f"exported file or the demo, is judged alone (above {net['presence_threshold']:.6g}).")]


def _required(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        checkpoints = sorted((directory / "checkpoints").glob("*.ckpt"), key=lambda file: file.name != "best.ckpt")
        if checkpoints:  # a training run's folder
            raise CheckpointError(f"{directory} is a training run's folder, not a model file or hub model folder: "
                                  f"pass ckpt_path={checkpoints[0]}.")
        raise CheckpointError(f"Model folder {directory} has no {name}; a hub model folder holds {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} (python -m bts_lightning.export ckpt_path=CKPT format=hub output=DIR).")
    return path


def read_config(directory: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of model folder ``directory``; ``CheckpointError`` naming the file otherwise."""
    path = _required(Path(directory), CONFIG_NAME)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON: {first_line(error)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("net"), dict) or not isinstance(
        config.get("module"), dict
    ):
        raise CheckpointError(f"{path} is not a bts_lightning model config (expected 'net' and 'module' objects).")
    return config


def from_pretrained(directory: str | Path, device: str | torch.device | None = "cpu") -> SegmentationModule:
    """Rebuild the eval-mode module of hub folder ``directory`` on ``device``, offline.

    Its ``data_settings`` are those ``config.json`` records (``image_size``, ``channels``, ``neighbours``).
    Raises ``CheckpointError`` naming the file when ``config.json`` or ``model.safetensors`` is missing,
    unreadable, or they do not match.
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = _required(directory, WEIGHTS_NAME)
    hparams = copy.deepcopy(config["module"])
    hparams["net"] = config["net"]
    expected = config.get(WEIGHTS_HASH_KEY)  # absent in folders written before it was recorded
    if expected is not None and file_sha256(weights) != expected:
        raise CheckpointError(f"{weights} is not the file {directory / CONFIG_NAME} was written with ({WEIGHTS_HASH_KEY} "
                              "differs): an export into this folder was interrupted, or a file was replaced. Export "
                              "the model into it again.")
    try:
        state = _safetensors().load_file(str(weights))
    except Exception as error:  # noqa: BLE001 - truncated or foreign file
        raise CheckpointError(f"{weights} could not be read as safetensors: {first_line(error)}") from None
    module = load_module_from(hparams, state, weights)
    module.data_settings = {key: config[key] for key in ("image_size", "channels", "neighbours")
                            if config.get(key) is not None}
    module.card_metrics = config.get("metrics")
    module.decision = config.get("decision")
    return module.to(resolve_device(device)).eval()


def load_module_from(hparams: dict[str, Any], state: Mapping[str, torch.Tensor], source: Path) -> SegmentationModule:
    """A :class:`SegmentationModule` of ``hparams`` with network weights ``state`` (read from ``source``)."""
    config = source.parent / CONFIG_NAME
    try:
        module = SegmentationModule(**hparams)
    except Exception as error:  # noqa: BLE001 - whatever fails, config.json does not describe a module
        cause = user_error_of(error) or _innermost(error)
        raise CheckpointError(f"{config} does not build a model ({type(cause).__name__}): {first_line(cause).rstrip('.')}. "
                              "Export the model into the folder again.") from None
    expected = module.net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(key for key in set(expected) & set(state) if expected[key].shape != state[key].shape)
    if missing or unexpected or shapes:
        problems = [f"{len(keys)} {what} ({format_names(keys, 3)})" for keys, what in (
            (missing, "missing tensor(s)"), (unexpected, "unexpected tensor(s)"), (shapes, "tensor(s) of another shape"))
            if keys]
        raise CheckpointError(f"{source} does not hold the weights of the network {config} describes: "
                              f"{'; '.join(problems)}. Export the model into the folder again.")
    module.net.load_state_dict(state)
    return module


def _innermost(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain (Hydra wraps a constructor's error in its own)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def load_folder(directory: str | Path, device: str | torch.device | None = "auto") -> ModulePredictor:
    """The predictor of hub folder ``directory``, with the contract its ``config.json`` records."""
    resolved = resolve_device(device)
    config = read_config(directory)
    try:
        contract = ModelContract.from_json(json.dumps(config))
    except ValueError as error:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: invalid model contract ({error}).") from None
    return ModulePredictor(from_pretrained(directory, resolved), resolved, contract)

