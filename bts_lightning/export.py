"""Hydra app: ``python -m bts_lightning.export ckpt_path=PATH [format=onnx|torchscript|hub|space] [output=FILE]``.

``format=hub`` writes a hub-style model folder instead (``output=DIR``: ``config.json``,
``model.safetensors``, ``README.md`` model card; :mod:`bts_lightning.hub`), which ``predict``,
``evaluate`` and the demo take as ``ckpt_path=DIR``. ``format=space`` writes a Hugging Face Space bundle
(``output=DIR``: ``app.py``, ``requirements.txt`` without PyTorch, ``README.md``, ``model.onnx``, examples;
:mod:`bts_lightning.space`).

The exported model is self-contained: it takes a float32 (N, C, H, W) batch of slices (C = the
network's ``in_channels``: the file channels its contract names) of any intensity scale (the per-image standardization is part of the graph) and returns tumor
probabilities (N, H, W) (softmax channel 1). Batch size, height and width are dynamic (U-Net
needs H and W divisible by the product of its strides, 16 by default), except for networks marked
``dynamic_size = False`` (SwinUNETR): those are exported at ``image_size`` only, which the contract
records (``fixed_size``), and :class:`~bts_lightning.inference.ExportedModel` resizes slices to it.
Auxiliary heads are left out. A cascade also gives its parts (:class:`CascadeProbabilityModel`; ONNX outputs
``segmentation_probabilities`` and ``presence_gates`` after ``probabilities``, TorchScript method ``parts``;
contract ``cascade_parts``), which flip TTA needs to gate the averaged segmentation as the checkpoint does.

The file carries its preprocessing contract (:class:`bts_lightning.inference.ModelContract`: the
training ``image_size``, ``in_channels`` and which file channels they are, normalization, model name) as JSON: in the ONNX model's
``metadata_props`` (key ``bts_lightning.contract``) or as the TorchScript extra file
``bts_lightning_contract.json``. So ``predict``/``evaluate`` on a copied ``model.onnx`` use the size and
channels it was trained on.

This module only writes files; :func:`bts_lightning.inference.load_predictor` loads them (ONNX through
onnxruntime, TorchScript through ``torch.jit.load``), also for the check against PyTorch after export.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bts_lightning.errors import BtsError, ConfigError, first_line
from bts_lightning.hub import run_metrics, save_pretrained
from bts_lightning.inference import (
    EXPORT_FORMATS,
    INPUT_NAME,
    INSTALL_HINT,
    ONNX_CONTRACT_KEY,
    OUTPUT_NAME,
    PARTS_NAMES,
    TORCHSCRIPT_CONTRACT_FILE,
    ModelContract,
    ModulePredictor,
    contract_of,
    load_predictor,
    network_config,
)
from bts_lightning.models.cascade import cascade_of
from bts_lightning.models.presence import presence_logits
from bts_lightning.preprocessing import standardize
from bts_lightning.runtime import (
    as_number,
    flag_setting,
    hydra_app,
    make_directory,
    number_setting,
    output_error,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)


# format -> file suffixes it is written with (the first is the default).
FORMATS = EXPORT_FORMATS
HUB_FORMAT = "hub"  # a folder: config.json, model.safetensors, README.md (bts_lightning.hub)
SPACE_FORMAT = "space"  # a folder: Gradio Space over model.onnx, without PyTorch (bts_lightning.space)
FOLDER_FORMATS = (HUB_FORMAT, SPACE_FORMAT)
PER_SLICE_OUTPUTS = (PARTS_NAMES[1],)  # outputs with one value per slice (no height and width)
ONNX_EXPORTERS = ("legacy", "dynamo")
# Largest |exported - exact| probability the check after export accepts (twice PyTorch float32's own error if larger).
VERIFY_TOLERANCE = 1e-3
# Tracing size when neither image_size nor the checkpoint's training size is known.
DEFAULT_IMAGE_SIZE = 256


class ProbabilityModel(nn.Module):
    """Standardize, run the network, keep the tumor-class softmax: (N, C, H, W) -> (N, H, W)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(standardize(images))["out"].float().softmax(dim=1)[:, 1]


class CascadeProbabilityModel(ProbabilityModel):
    """:class:`ProbabilityModel` of a cascade (:mod:`bts_lightning.models.cascade`), which also gives its parts:
    ``parts(images)`` = (segmentation tumor probabilities (N, H, W), presence gates (N,)), whose ``min`` is
    ``forward``'s output (:class:`~bts_lightning.inference.ModelContract` ``cascade_parts``)."""

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.all_outputs(images)[1:]

    def all_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, segmentation probabilities, presence gates) from one run of the networks."""
        outputs = self.net(standardize(images))
        factors = outputs["factors"].float()
        return (outputs["out"].float().softmax(dim=1)[:, 1], factors[:, :2].softmax(dim=1)[:, 1],
                torch.sigmoid(presence_logits(factors)))


class _AllOutputs(nn.Module):
    """A cascade's three outputs as one ``forward``, for one ONNX graph."""

    def __init__(self, model: CascadeProbabilityModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.all_outputs(images)


def probability_model(module: nn.Module) -> ProbabilityModel:
    """An eval-mode, CPU :class:`ProbabilityModel` over a copy of ``module.net`` without auxiliary head.

    ``module`` is a :class:`~bts_lightning.segmentation_module.SegmentationModule` (or any module
    with a ``net`` attribute returning ``{"out": logits}``); it is left unchanged. A cascade's is a
    :class:`CascadeProbabilityModel`.
    """
    net = copy.deepcopy(module.net).cpu().float().eval()
    if getattr(net, "_compiled_call_impl", None) is not None:  # model.compile=true: export the eager network
        net._compiled_call_impl = None
    if getattr(net, "aux_classifier", None) is not None:  # torchvision DeepLabV3/FCN: only used for training
        net.aux_classifier = None
    model = (ProbabilityModel if cascade_of(module) is None else CascadeProbabilityModel)(net).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Hide tracer and deprecation chatter that says nothing about this model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message=r".*(legacy TorchScript-based ONNX export|will be removed|instance_norm).*"
        )
        yield


def resolve_format(format: str | None, output: str | Path | None) -> str:
    """``format`` checked, or inferred from ``output``'s suffix (else ``onnx``); ``hub``, ``space``: output is a folder."""
    if format in FOLDER_FORMATS:
        return format
    if format is None:
        suffix = Path(output).suffix.lower() if output else ""
        format = next((name for name, suffixes in FORMATS.items() if suffix in suffixes), "onnx")
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not supported; use {', '.join((*FORMATS, *FOLDER_FORMATS))}.")
    if output is not None and Path(output).suffix.lower() not in FORMATS[format]:
        raise ConfigError(
            f"output={output} does not end in {' or '.join(FORMATS[format])} for format={format} "
            "(load_predictor, predict and evaluate pick the runtime by suffix)."
        )
    return format


def _dynamic_axes(outputs: Sequence[str], dynamic_size: bool) -> dict[str, dict[int, str]]:
    """The legacy exporter's dynamic axes: batch everywhere, height and width of maps with ``dynamic_size``."""
    maps = {0: "batch", 1: "height", 2: "width"} if dynamic_size else {0: "batch"}
    return {INPUT_NAME: {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"},
            **{name: {0: "batch"} if name in PER_SLICE_OUTPUTS else maps for name in outputs}}


def _onnx_bytes(
    model: nn.Module, example: torch.Tensor, opset: int, exporter: str, dynamic_size: bool = True,
    outputs: Sequence[str] = (OUTPUT_NAME,),
) -> tuple[bytes, str, int]:
    """ONNX with dynamic batch (and height and width with ``dynamic_size``), in memory, its outputs named
    ``outputs``; returns it, the exporter and the opset used."""
    if exporter == "legacy":
        try:
            onnx_file = io.BytesIO()
            torch.onnx.export(
                model, (example,), onnx_file, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(outputs), dynamic_axes=_dynamic_axes(outputs, dynamic_size),
                do_constant_folding=True,
            )
            return onnx_file.getvalue(), "legacy", opset
        except (TypeError, NotImplementedError, AttributeError) as error:  # removed from a future PyTorch
            log.warning("Legacy ONNX exporter unavailable (%s); using the dynamo exporter.", error)
    opset = max(opset, 18)  # the dynamo exporter's oldest opset
    dynamic = torch.export.Dim.DYNAMIC
    chatty = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.WARNING)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_shapes={INPUT_NAME: {0: dynamic, 2: dynamic, 3: dynamic} if dynamic_size else {0: dynamic}},
            verbose=False,
        )
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    return program.model_proto.SerializeToString(), "dynamo", opset


def newest_opset(exporter: str) -> int:
    """The newest ONNX opset the installed PyTorch's ``exporter`` ("legacy" or "dynamo") writes."""
    from torch.onnx import _constants  # the exporters' own limits (no public name for them)

    name = "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET" if exporter == "legacy" else "ONNX_MAX_OPSET"
    return int(getattr(_constants, name, 20))


def exported_contract(module: nn.Module, image_size: int, contract: ModelContract | None = None) -> ModelContract:
    """The contract written with ``module`` exported at ``image_size`` (``contract``: its training contract).

    A fixed-size network (``module.net.dynamic_size`` false) records ``image_size`` and ``fixed_size``,
    with a warning when it differs from the training size. Raises ``ConfigError`` when ``contract``'s
    ``in_channels`` are not the network's.
    """
    contract = contract or ModelContract.from_module(module)
    in_channels = int(network_config(module).get("in_channels", 1))
    if contract.in_channels != in_channels:
        raise ConfigError(f"The contract to export says in_channels={contract.in_channels} "
                          f"({contract.describe_channels()}), but the network takes {in_channels} channel(s).")
    if getattr(module.net, "dynamic_size", True):
        return contract
    if contract.image_size not in (None, image_size):
        log.warning("Exporting at image_size=%d, but the model was trained at %d px; this fixed-size model runs "
                    "at %d px only (other slices are resized to it).", image_size, contract.image_size, image_size)
    return replace(contract, image_size=image_size, fixed_size=True)


def with_parts(contract: ModelContract, module: nn.Module) -> ModelContract:
    """``contract`` as an exported file of ``module`` carries it: ``cascade_parts`` exactly when it is a cascade."""
    return replace(contract, cascade_parts=cascade_of(module) is not None)


def export_model(
    module: nn.Module,
    output: str | Path,
    format: str | None = None,
    image_size: int = 256,
    opset: int = 17,
    onnx_exporter: str = "legacy",
    contract: ModelContract | None = None,
    name: str | None = None,
) -> Path:
    """Export ``module`` (a SegmentationModule) to ``output``; the file appears only when complete.

    The model is exported in memory, then written with :func:`~bts_lightning.runtime.write_bytes_atomic`:
    a crash or a full disk leaves ``output`` as it was, and an output folder that cannot be written
    raises :class:`~bts_lightning.errors.OutputError` before anything is exported.

    Args:
        module: the trained module (any device; it is copied to CPU, the original is untouched).
        output: file to write: ``.onnx`` for ONNX, ``.pt``/``.ts`` for TorchScript.
        format: ``onnx`` or ``torchscript``; None infers it from ``output``'s suffix.
        image_size: side of the square example input used for tracing (any size works afterwards), and
            the only size of a fixed-size network (``net.dynamic_size = False``), recorded in its contract.
        opset: ONNX opset (>= 17).
        onnx_exporter: ``legacy`` (TorchScript-based, fast) or ``dynamo`` (``torch.export``-based).
        contract: the preprocessing contract written into the file (see :func:`exported_contract`); None =
            ``ModelContract.from_module``: the network's facts and the module's ``data_settings`` (the training
            size, channels and scan neighbours of a fitted or loaded module; unknown: no size, the first
            ``in_channels`` file channels, gray for one, slices alone).
        name: what the log calls the file (default ``output``'s name; the export app's staged file is its output's).
    """
    output = Path(output)
    format = resolve_format(format, output)
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"onnx_exporter={onnx_exporter!r} is not supported; use {' or '.join(ONNX_EXPORTERS)}.")
    if int(opset) < 17:
        raise ConfigError(f"opset={opset} is too old; use 17 or newer.")
    if format == "onnx" and int(opset) > (newest := newest_opset(onnx_exporter)):
        raise ConfigError(f"opset={opset}: the {onnx_exporter} ONNX exporter of this PyTorch writes opsets up to "
                          f"{newest}; use opset=17 (the default) to {newest}.")
    make_directory(output.parent, "output")
    cascade = cascade_of(module)
    if cascade is not None and cascade.context:
        log.warning("The cascade's scan context (%d slice(s) either side) is not part of %s: the exported model judges "
                    "each slice alone (presence threshold %.6g). Evaluate or predict with the checkpoint for the scan "
                    "context.", cascade.context, name or output.name, cascade.presence_threshold)
    contract = exported_contract(module, int(image_size), contract)
    model = probability_model(module)
    contract = with_parts(contract, module)
    parts = contract.cascade_parts  # then model is a CascadeProbabilityModel
    example = _example_input(model, int(image_size), contract.in_channels)
    with _quiet_tracing(), torch.no_grad():
        if format == "onnx":
            try:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
            except ImportError:
                raise BtsError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
            graph, outputs = (_AllOutputs(model).eval(), (OUTPUT_NAME, *PARTS_NAMES)) if parts else (model, (OUTPUT_NAME,))
            data, used, used_opset = _onnx_bytes(graph, example, int(opset), onnx_exporter, not contract.fixed_size,
                                                 outputs)
            data = _with_onnx_metadata(data, {ONNX_CONTRACT_KEY: contract.to_json()})
            log.info("Exported with the %s ONNX exporter (opset %s)", used, used_opset)
        else:
            methods = {"forward": (example,), **({"parts": (example,)} if parts else {})}
            script_file = io.BytesIO()
            torch.jit.save(torch.jit.trace_module(model, methods, check_trace=False), script_file,
                           _extra_files={TORCHSCRIPT_CONTRACT_FILE: contract.to_json()})
            data = script_file.getvalue()
    write_bytes_atomic(output, data)
    return output


def _with_onnx_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The serialized ONNX model ``data`` with ``metadata`` set in its ``metadata_props`` (replacing same keys)."""
    import onnx

    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    kept = [(entry.key, entry.value) for entry in proto.metadata_props if entry.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _example_input(model: nn.Module, image_size: int, channels: int) -> torch.Tensor:
    """A random uint8-range batch of two ``channels``-channel slices, checked to run through ``model``."""
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be a positive number of pixels.")
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, channels, image_size, image_size, generator=generator) * 255
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:  # noqa: BLE001  (whatever the network raises for a shape it cannot take)
        raise ConfigError(
            f"The model does not run on {image_size}x{image_size} inputs ({type(error).__name__}: "
            f"{first_line(error)}); choose another image_size "
            "(U-Net needs a multiple of the product of its strides, 16 by default)."
        ) from None
    return example


@dataclass(frozen=True)
class Agreement:
    """How close an exported model's tumor probabilities are to PyTorch's on one random batch.

    ``difference``: largest |exported - PyTorch float32|. ``exported_error`` and ``float32_error``: the largest
    |exported - exact| and |PyTorch float32 - exact|, "exact" being PyTorch's run in float64. A network whose
    float32 result is itself far from exact (e.g. an undertrained one with large activations) is held to its own
    rounding, not to a fixed tolerance that PyTorch would fail too.
    """

    difference: float
    exported_error: float
    float32_error: float

    @property
    def tolerance(self) -> float:
        """The most ``exported_error`` may be: :data:`VERIFY_TOLERANCE`, or twice PyTorch's own float32 error."""
        return max(VERIFY_TOLERANCE, 2 * self.float32_error)

    @property
    def holds(self) -> bool:
        return self.exported_error <= self.tolerance


def agreement(module: nn.Module, exported: Any, image_size: int, batch_size: int = 2) -> Agreement:
    """:class:`Agreement` of ``exported`` with ``module`` on a random batch of ``batch_size`` slices (with the
    channel count of ``exported``'s contract)."""
    generator = torch.Generator().manual_seed(1)
    channels = contract_of(exported).in_channels
    images = torch.rand(batch_size, channels, image_size, image_size, generator=generator) * 255
    model = probability_model(module)
    float32 = model(images).double()
    exact = copy.deepcopy(model.net).double()(standardize(images).double())["out"].softmax(dim=1)[:, 1]
    output = exported(images).cpu().double()
    return Agreement(difference=float((output - float32).abs().max()), exported_error=float((output - exact).abs().max()),
                     float32_error=float((float32 - exact).abs().max()))


# ------------------------------------------------------------------------------------------- app


def export(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.ckpt_path``, export it, check it against PyTorch and return a summary."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m bts_lightning.export ckpt_path=RUN/checkpoints/best.ckpt")
    verify = flag_setting(cfg, "verify", True)
    output = cfg.get("output")
    format = resolve_format(cfg.get("format"), output)
    default_name = format if format in FOLDER_FORMATS else f"model{FORMATS[format][0]}"
    output = Path(str(output)) if output else Path(cfg.paths.output_dir) / default_name
    if format not in FOLDER_FORMATS and output.is_dir():
        raise ConfigError(f"output={output} is a folder; name the file to write, e.g. output={output / default_name}.")
    predictor = load_predictor(str(cfg.ckpt_path), device="cpu")
    if not isinstance(predictor, ModulePredictor):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is an exported model already; export the training checkpoint "
                          "(RUN/checkpoints/best.ckpt) it came from.")
    module, contract = predictor.module, predictor.contract
    image_size = cfg.get("image_size")
    image_size = (int(as_number("image_size", image_size, whole=True, minimum=1)) if image_size is not None
                  else contract.image_size or DEFAULT_IMAGE_SIZE)
    contract = exported_contract(module, image_size, contract)
    onnx = {"opset": int(number_setting(cfg, "opset", 17, whole=True)), "onnx_exporter": str(cfg.get("onnx_exporter", "legacy"))}
    checks: dict[str, Any] = {}

    def verified(exported: Path, staged: bool = True) -> None:
        """Check the model file ``exported`` (``staged``: not yet in its place) against PyTorch; BtsError when it
        disagrees."""
        check = agreement(module, load_predictor(exported, device="cpu"), image_size)
        checks["max_abs_difference"] = check.difference
        checks["max_abs_error_vs_float64"] = {"exported": check.exported_error, "pytorch": check.float32_error}
        if not check.holds:
            raise BtsError(
                f"Exported model {output} disagrees with PyTorch (max probability error {check.exported_error:.3g} "
                f"against PyTorch in float64 > {check.tolerance:.3g}; PyTorch's own in float32: "
                f"{check.float32_error:.3g}){f'; {output} was not replaced' if staged else ''}; try "
                "onnx_exporter=dynamo or format=torchscript."
            )

    if format == HUB_FORMAT:
        save_pretrained(module, output, contract, run_metrics(Path(str(cfg.ckpt_path))))
    elif format == SPACE_FORMAT:
        from bts_lightning.space import write_space  # space builds on export_model

        write_space(module, output, contract, image_size, run_metrics(Path(str(cfg.ckpt_path))),
                    check=verified if verify else None, **onnx)
    # A model file is checked before it takes the place of ``output``, so a failed check leaves the previous file.
    unverified = output.with_name(f".{output.stem}.unverified{output.suffix}")
    staging = unverified if verify and format in FORMATS else None
    if staging is None and unverified.is_file():  # a killed verified export's; a verified one replaces it itself
        with suppress(OSError):
            unverified.unlink()
    try:
        if format not in FOLDER_FORMATS:
            export_model(module, staging or output, format, image_size, contract=contract, name=output.name, **onnx)
            if staging is not None:
                verified(staging)
        if format != HUB_FORMAT:  # the file's own contract
            contract = with_parts(contract, module)
        if staging is not None:
            try:
                os.replace(staging, output)
            except OSError as error:
                raise output_error(output, error) from None
    finally:
        if staging is not None:
            with suppress(OSError):  # e.g. its folder could not be made: the error that says so stands
                staging.unlink(missing_ok=True)
    if verify and format == HUB_FORMAT:  # written whole by save_pretrained; checked as it loads
        verified(output, staged=False)
    summary: dict[str, Any] = {"output": str(output), "format": format, "model": contract.model,
                               "contract": contract.to_dict(), **checks}
    files = [path for path in output.rglob("*") if path.is_file() and not path.name.startswith(".")] \
        if output.is_dir() else [output]  # hidden: a killed export's temporary files, not the model's
    size_mb = sum(path.stat().st_size for path in files) / 2**20
    log.info(
        "Exported %s (%s) from %s to %s (%.1f MiB)%s", summary["model"], format, cfg.ckpt_path, output, size_mb,
        f"; max |difference| vs PyTorch {summary['max_abs_difference']:.2g}" if "max_abs_difference" in summary else "",
    )
    return summary


main = hydra_app("export", export)  # entry point: bts-export


if __name__ == "__main__":
    main()
