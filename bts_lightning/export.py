"""Hydra app: ``python -m bts_lightning.export ckpt_path=PATH [format=onnx|torchscript] [output=FILE]``.

The exported model is self-contained: it takes a float32 (N, 1, H, W) batch of slices of any
intensity scale (the per-image standardization is part of the graph) and returns tumor
probabilities (N, H, W) (softmax channel 1). Batch size, height and width are dynamic (U-Net
needs H and W divisible by the product of its strides, 16 by default). Auxiliary heads are left out.

:func:`load_exported` turns an exported file back into a callable ``images -> probabilities``
(ONNX through onnxruntime, TorchScript through ``torch.jit.load``).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bts_lightning.checkpoint import load_module
from bts_lightning.errors import BtsError, ConfigError
from bts_lightning.preprocessing import standardize
from bts_lightning.runtime import hydra_app, make_directory, write_bytes_atomic

log = logging.getLogger(__name__)


# format -> file suffixes it is written with (the first is the default).
FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "height", 2: "width"}}
ONNX_EXPORTERS = ("legacy", "dynamo")
# Largest |exported - PyTorch| probability accepted by the check after export.
VERIFY_TOLERANCE = 1e-3
INSTALL_HINT = 'pip install -e ".[export]"'


class ProbabilityModel(nn.Module):
    """Standardize, run the network, keep the tumor-class softmax: (N, 1, H, W) -> (N, H, W)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(standardize(images))["out"].float().softmax(dim=1)[:, 1]


def probability_model(module: nn.Module) -> ProbabilityModel:
    """An eval-mode, CPU :class:`ProbabilityModel` over a copy of ``module.net`` without auxiliary head.

    ``module`` is a :class:`~bts_lightning.segmentation_module.SegmentationModule` (or any module
    with a ``net`` attribute returning ``{"out": logits}``); it is left unchanged.
    """
    net = copy.deepcopy(module.net).cpu().float().eval()
    if getattr(net, "_compiled_call_impl", None) is not None:  # model.compile=true: export the eager network
        net._compiled_call_impl = None
    if getattr(net, "aux_classifier", None) is not None:  # torchvision DeepLabV3/FCN: only used for training
        net.aux_classifier = None
    model = ProbabilityModel(net).eval()
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
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX export|will be removed|instance_norm).*")
        yield


def resolve_format(format: str | None, output: str | Path | None) -> str:
    """``format`` checked, or inferred from ``output``'s suffix (else ``onnx``)."""
    if format is None:
        suffix = Path(output).suffix.lower() if output else ""
        format = next((name for name, suffixes in FORMATS.items() if suffix in suffixes), "onnx")
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not supported; use {' or '.join(FORMATS)}.")
    if output is not None and Path(output).suffix.lower() not in FORMATS[format]:
        raise ConfigError(
            f"output={output} does not end in {' or '.join(FORMATS[format])} for format={format} "
            "(load_exported, predict and evaluate pick the runtime by suffix)."
        )
    return format


def _onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, exporter: str) -> tuple[bytes, str, int]:
    """ONNX with dynamic batch, height and width, in memory; returns it, the exporter and the opset used."""
    if exporter == "legacy":
        try:
            onnx_file = io.BytesIO()
            torch.onnx.export(
                model, (example,), onnx_file, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_AXES, do_constant_folding=True,
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
            output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: dynamic, 2: dynamic, 3: dynamic}},
            verbose=False,
        )
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    return program.model_proto.SerializeToString(), "dynamo", opset


def export_model(
    module: nn.Module,
    output: str | Path,
    format: str | None = None,
    image_size: int = 256,
    opset: int = 17,
    onnx_exporter: str = "legacy",
) -> Path:
    """Export ``module`` (a SegmentationModule) to ``output``; the file appears only when complete.

    The model is exported in memory, then written with :func:`~bts_lightning.runtime.write_bytes_atomic`:
    a crash or a full disk leaves ``output`` as it was, and an output folder that cannot be written
    raises :class:`~bts_lightning.errors.OutputError` before anything is exported.

    Args:
        module: the trained module (any device; it is copied to CPU, the original is untouched).
        output: file to write: ``.onnx`` for ONNX, ``.pt``/``.ts`` for TorchScript.
        format: ``onnx`` or ``torchscript``; None infers it from ``output``'s suffix.
        image_size: side of the square example input used for tracing (any size works afterwards).
        opset: ONNX opset (>= 17).
        onnx_exporter: ``legacy`` (TorchScript-based, fast) or ``dynamo`` (``torch.export``-based).
    """
    output = Path(output)
    format = resolve_format(format, output)
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"onnx_exporter={onnx_exporter!r} is not supported; use {' or '.join(ONNX_EXPORTERS)}.")
    if int(opset) < 17:
        raise ConfigError(f"opset={opset} is too old; use 17 or newer.")
    make_directory(output.parent, "output")
    model = probability_model(module)
    example = _example_input(model, int(image_size))
    with _quiet_tracing(), torch.no_grad():
        if format == "onnx":
            try:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
            except ImportError:
                raise BtsError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
            data, used, used_opset = _onnx_bytes(model, example, int(opset), onnx_exporter)
            log.info("Exported with the %s ONNX exporter (opset %s)", used, used_opset)
        else:
            script_file = io.BytesIO()
            torch.jit.save(torch.jit.trace(model, (example,), check_trace=False), script_file)
            data = script_file.getvalue()
    write_bytes_atomic(output, data)
    return output


def _example_input(model: nn.Module, image_size: int) -> torch.Tensor:
    """A random uint8-range batch of two slices, checked to run through ``model``."""
    if image_size < 1:
        raise ConfigError(f"image_size={image_size} must be a positive number of pixels.")
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 1, image_size, image_size, generator=generator) * 255
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:
        raise ConfigError(
            f"The model does not run on {image_size}x{image_size} inputs ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'}); choose another image_size "
            "(U-Net needs a multiple of the product of its strides, 16 by default)."
        ) from None
    return example


def max_difference(module: nn.Module, exported: Any, image_size: int, batch_size: int = 2) -> float:
    """Largest |exported - PyTorch| tumor probability on a random batch of ``batch_size`` slices."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch_size, 1, image_size, image_size, generator=generator) * 255
    expected = probability_model(module)(images)
    return float((exported(images).cpu() - expected).abs().max())


# ---------------------------------------------------------------------------------------- loading


class ExportedModel:
    """Callable over an exported file: float (N, 1, H, W) images -> tumor probabilities (N, H, W).

    Returns a float32 tensor on the input's device (computation runs where the runtime does:
    onnxruntime's CUDA provider when installed and available, else CPU; TorchScript on the input's device).
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            where = "is a directory" if self.path.is_dir() else "does not exist"
            raise BtsError(f"Exported model {self.path} {where}.")
        suffix = self.path.suffix.lower()
        self.format = next((name for name, suffixes in FORMATS.items() if suffix in suffixes), None)
        if self.format is None:
            known = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
            raise BtsError(f"Exported model {self.path}: unknown format {suffix or '(no suffix)'!r}; expected {known}.")
        use_cuda = _wants_cuda(device)
        if self.format == "onnx":
            self._session, self._input_name, self.providers = _onnx_session(self.path, use_cuda)
        else:
            self.providers = []
            self._device = torch.device("cuda" if use_cuda else "cpu")
            try:
                with _quiet_tracing():
                    self._module = torch.jit.load(str(self.path), map_location=self._device).eval()
            except Exception as error:
                raise BtsError(f"Exported model {self.path} could not be loaded as TorchScript: {_first_line(error)}") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected an (N, 1, H, W) batch, got shape {tuple(images.shape)}")
        if self.format == "onnx":
            array = images.detach().to("cpu", torch.float32).contiguous().numpy()
            (probabilities,) = self._session.run([OUTPUT_NAME], {self._input_name: array})
            return torch.from_numpy(probabilities).to(images.device)
        with torch.no_grad():
            return self._module(images.to(self._device, torch.float32)).float().to(images.device)

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, format={self.format!r})"


def _wants_cuda(device: str | torch.device | None) -> bool:
    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    try:
        wanted = torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        raise BtsError(f"device={device!r} is not a device name (use auto, cpu or cuda).") from None
    if wanted and not torch.cuda.is_available():
        raise BtsError(f"device={device} was asked for but CUDA is not available here; use auto or cpu.")
    return wanted


def _onnx_session(path: Path, use_cuda: bool) -> tuple[Any, str, list[str]]:
    try:
        import onnxruntime
    except ImportError:
        raise BtsError(f"Running ONNX model {path} needs onnxruntime: {INSTALL_HINT}") from None
    available = onnxruntime.get_available_providers()
    wanted = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    providers = [p for p in wanted if p in available] or available
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        raise BtsError(f"Exported model {path} could not be loaded by onnxruntime: {_first_line(error)}") from None
    return session, session.get_inputs()[0].name, session.get_providers()


def load_exported(path: str | Path, device: str | torch.device | None = "auto") -> ExportedModel:
    """A callable images (N, 1, H, W) float tensor -> tumor probabilities (N, H, W) for an exported file.

    ``.onnx`` runs in onnxruntime (CUDA provider when available, else CPU), ``.pt``/``.ts`` through
    ``torch.jit.load``. ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        BtsError: the file is missing, its suffix unknown, unreadable, or onnxruntime is not installed.
    """
    return ExportedModel(path, device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ------------------------------------------------------------------------------------------- app


def export(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.ckpt_path``, export it, check it against PyTorch and return a summary."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m bts_lightning.export ckpt_path=RUN/checkpoints/best.ckpt")
    output = cfg.get("output")
    format = resolve_format(cfg.get("format"), output)
    output = Path(str(output)) if output else Path(cfg.paths.output_dir) / f"model{FORMATS[format][0]}"
    module = load_module(str(cfg.ckpt_path), map_location="cpu")
    image_size = int(cfg.get("image_size", 256))
    export_model(module, output, format, image_size, int(cfg.get("opset", 17)), str(cfg.get("onnx_exporter", "legacy")))
    summary: dict[str, Any] = {"output": str(output), "format": format, "model": module.hparams.model.get("name")}
    if cfg.get("verify", True):
        difference = max_difference(module, load_exported(output, device="cpu"), image_size)
        summary["max_abs_difference"] = difference
        if not difference <= VERIFY_TOLERANCE:
            raise BtsError(
                f"Exported model {output} disagrees with PyTorch (max probability difference {difference:.3g} > "
                f"{VERIFY_TOLERANCE}); try onnx_exporter=dynamo or format=torchscript."
            )
    size_mb = output.stat().st_size / 2**20
    log.info(
        "Exported %s (%s) from %s to %s (%.1f MiB)%s", summary["model"], format, cfg.ckpt_path, output, size_mb,
        f"; max |difference| vs PyTorch {summary['max_abs_difference']:.2g}" if "max_abs_difference" in summary else "",
    )
    return summary


main = hydra_app("export", export)  # entry point: bts-export


if __name__ == "__main__":
    main()
