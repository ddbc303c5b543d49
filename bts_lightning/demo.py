"""Hydra app: ``python -m bts_lightning.demo ckpt_path=MODEL`` serves a Gradio page on ``host:port``.

``ckpt_path`` is anything :func:`bts_lightning.inference.load_predictor` takes (``.ckpt``, ``.onnx``,
``.pt``/``.ts``, a hub folder). The page takes one slice (PNG, JPEG, TIFF, BMP; any size, 8/16-bit,
gray or colour, read with the model's channels) and shows the overlay, the probability map, the
tumor area (pixels and % of the slice; "No tumor detected" with the slice score when the model's
calibrated slice decision rejects the slice, ``slice_decision=auto``) and a mask PNG to download. A model trained
with scan neighbours (``data.neighbours``) sees the lone slice's own planes in their place (``predict`` over a scan
folder gives it the real ones). Threshold, TTA and postprocessing
controls start at the config's values; each request runs :func:`bts_lightning.predict.segment`, the
same code as ``predict``. A few synthetic example slices are written to the run folder at start-up.
Bad uploads (not an image, empty, too large) show one message in the page. Needs the ``demo`` extra.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig

from bts_lightning.data.io import ChannelError, UnreadableImageError, read_channels
from bts_lightning.data.neighbours import stack_window, window_size
from bts_lightning.data.synthetic import generate_dataset
from bts_lightning.errors import ConfigError
from bts_lightning.inference import (
    InferenceOptions,
    Predictor,
    check_input_size,
    contract_of,
    load_predictor,
    resolve_device,
    with_model_decision,
)
from bts_lightning.models.cascade import cascade_of
from bts_lightning.predict import DEFAULT_IMAGE_SIZE, segment
from bts_lightning.runtime import as_number, flag_setting, hydra_app, number_setting, path_setting
from bts_lightning.visualize import overlay, write_png

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'bts_lightning[demo]'"
MAX_UPLOAD_BYTES = 50 * 2**20
MAX_PIXELS = 4096 * 4096
MAX_PORT = 65535
# Slices of any size fill their image boxes, small ones scaled up with visible pixels (no smoothing).
SLICE_VIEW = "slice-view"
CSS = f".{SLICE_VIEW} img {{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}}"


@dataclass(frozen=True)
class Result:
    """What the page shows for one slice: RGB overlay and probability map, mask (uint8 {0, 1}), area text."""

    overlay: np.ndarray
    probability: np.ndarray
    mask: np.ndarray
    area: str


def area_text(mask: np.ndarray) -> str:
    """Tumor area of a {0, 1} mask, e.g. ``Tumor area: 120 px (2.93 % of the slice)``."""
    pixels = int(np.count_nonzero(mask))
    return f"Tumor area: {pixels} px ({100.0 * pixels / mask.size:.2f} % of the slice)"


def check_upload(path: str | Path | None) -> Path:
    """``path`` when it is a non-empty file under :data:`MAX_UPLOAD_BYTES`; ``ValueError`` with the reason otherwise."""
    if not path:
        raise ValueError("No file: upload a slice (PNG, JPEG, TIFF or BMP) or pick an example.")
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise ValueError(f"{path.name} is empty: upload an image file.")
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.0f} MiB; the demo takes slices up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB.")
    dimensions = header_size(path)  # before decoding: a small compressed file can hold a huge image
    if dimensions is not None and dimensions[0] * dimensions[1] > MAX_PIXELS:
        raise ValueError(f"{path.name} is {dimensions[0]}x{dimensions[1]} px; the demo takes up to {MAX_PIXELS} "
                         "pixels.")
    return path


# How a TIFF file starts (little- and big-endian, classic and BigTIFF): the one format the page takes whose header
# Pillow may not read, left to the decoder.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, read by Pillow (gradio's dependency) without decoding its
    pixels; ``None`` for a TIFF Pillow cannot read (the full read then checks the size). ValueError for any other
    file Pillow cannot read (OpenCV would decode it whatever its name, e.g. a huge Radiance HDR named .png), and for
    an image over Pillow's own limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``), far over :data:`MAX_PIXELS`."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warning for large images: the caller checks the size
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError:
        raise ValueError(f"{path.name} holds over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; the demo takes up to "
                         f"{MAX_PIXELS} pixels.") from None
    except Exception:  # noqa: BLE001 - not a format Pillow reads: only a TIFF goes on to the decoder
        with path.open("rb") as stream:
            if stream.read(4) in TIFF_MAGIC:
                return None
        raise ValueError(f"{path.name}: not a readable image (PNG, JPEG, TIFF or BMP).") from None


def analyze(predictor: Predictor, path: str | Path | None, options: InferenceOptions,
            image_size: int | None = None) -> Result:
    """Segment the slice file ``path`` as ``predict`` does a slice without scan neighbours; ``ValueError`` with a
    message for bad uploads."""
    contract = contract_of(predictor)
    file = check_upload(path)
    try:
        image = read_channels(file, contract.channel_indices)
    except UnreadableImageError as error:
        reason = str(error).removeprefix(f"{file}: ")  # a stack of pages, NaN pixels; or no image at all
        if reason.startswith("not a readable image"):
            reason = "not a readable image (PNG, JPEG, TIFF or BMP)"
        raise ValueError(f"{file.name}: {reason}.") from None
    except ChannelError as error:
        raise ValueError(f"{file.name} has {error.count} channel(s), but the model takes "
                         f"{contract.describe_channels()}.") from None
    if image.shape[-2] * image.shape[-1] > MAX_PIXELS:
        raise ValueError(f"{file.name} is {image.shape[-1]}x{image.shape[-2]} px; the demo takes up to "
                         f"{MAX_PIXELS} pixels.")
    size = image_size or contract.image_size or DEFAULT_IMAGE_SIZE
    ((probability, mask),) = segment(predictor, [stack_window([image] * window_size(contract.neighbours))], size,
                                     options)
    return Result(overlay(image[0], mask), probability_colours(probability), mask, decision_text(options, probability) or area_text(mask))


# The colours probability_colours gives these probabilities (the page has no colour bar).
PROBABILITY_LABEL = "Tumor probability (black 0, purple 0.25, red 0.5, orange 0.75, pale yellow 1)"


def probability_colours(probability: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a probability map in [0, 1] on OpenCV's inferno scale, as :data:`PROBABILITY_LABEL`
    names it."""
    levels = np.round(np.clip(probability, 0, 1) * 255).astype(np.uint8)  # absolute: never stretched to the slice's range
    return cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def decision_text(options: InferenceOptions, probability: np.ndarray) -> str | None:
    """``No tumor detected (slice score S <= threshold T)`` when ``options.decision`` rejects the slice, else None."""
    decision = options.decision
    if decision is None:
        return None
    score = decision.score(probability)
    if decision.tumor_present(score):
        return None
    return f"No tumor detected (slice score {score:.4g} <= threshold {decision.threshold:.4g})"


# A PNG holds 1, 3 or 4 channels, so examples exist for models reading file channels 0 to 3.
PNG_PLANES = (3, 4)


def example_slices(folder: Path, count: int = 3, channels: Sequence[int] | None = None) -> list[Path]:
    """Write ``count`` synthetic slices (128 px, with tumors where the generator put them) under ``folder`` as PNGs a
    model reading file ``channels`` takes: gray for ``None`` (or ``[0]``), else the gray slice in every plane (3, or 4
    when it reads channel 3). No example when it reads a channel past 3, which no PNG has."""
    root = generate_dataset(folder / "synthetic", n=max(count, 5), size=128, seed=0, slices_per_patient=1)
    images = sorted((root / "images").iterdir())[:count]
    if not channels or max(channels) == 0:
        return images
    planes = next((planes for planes in PNG_PLANES if max(channels) < planes), None)
    if planes is None:
        log.info("No example slices: the model reads file channel %d, and a PNG has at most %d.", max(channels),
                 PNG_PLANES[-1])
        return []
    written = []
    for path in images:
        gray = read_channels(path, None)[0]
        written.append(folder / f"{planes}_planes" / path.name)
        write_png(written[-1], np.repeat(gray[..., None], planes, axis=2))
    return written


def keep_newest(folder: Path, count: int | None) -> None:
    """Delete all but the ``count`` most recently modified subfolders of ``folder`` (``None``: keep every one)."""
    if count is None:
        return
    requests = sorted((path for path in folder.iterdir() if path.is_dir()), key=lambda path: path.stat().st_mtime_ns)
    for old in requests[:max(len(requests) - count, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def build_demo(predictor: Predictor, options: InferenceOptions, output_dir: Path, examples: list[Path] | None = None,
               image_size: int | None = None, keep_masks: int | None = None) -> Any:
    """The Gradio ``Blocks`` page over ``predictor``, its controls starting at ``options``.

    API: ``/segment`` (file, threshold, tta, largest_component, min_size) -> (overlay, probability map,
    area text, mask PNG file). Each request's mask file is written to a folder of its own under ``output_dir``
    (created; serve it with ``allowed_paths``), of which the newest ``keep_masks`` are kept (``None``: all).
    Gradio's own copies of uploads and results are deleted after a day. Bad uploads raise ``gr.Error`` with one
    message.
    """
    gr = require_gradio()
    output_dir.mkdir(parents=True, exist_ok=True)

    def run(file: str | None, threshold: float, tta: bool, largest: bool, min_size: float) -> tuple[Any, ...]:
        try:
            chosen = replace(options, threshold=float(threshold), tta=bool(tta), largest_component=bool(largest),
                             min_size=int(min_size or 0))
            result = analyze(predictor, file, chosen, image_size)
        except (ValueError, ConfigError) as error:
            raise gr.Error(str(error)) from None
        mask_path = Path(tempfile.mkdtemp(dir=output_dir)) / f"{Path(str(file)).stem}_mask.png"
        write_png(mask_path, result.mask * 255)
        keep_newest(output_dir, keep_masks)
        return result.overlay, result.probability, result.area, str(mask_path)

    with gr.Blocks(title="Brain tumor segmentation", delete_cache=(3600, 86400)) as page:
        gr.Markdown("# Brain tumor segmentation\nResearch demo: **not for diagnosis.** Upload one MRI slice.")
        with gr.Row():
            with gr.Column():
                file = gr.File(label="Slice (PNG, JPEG, TIFF, BMP)", file_types=["image", ".tif", ".tiff"],
                               type="filepath")
                threshold = gr.Slider(0.0, max(0.99, options.threshold), value=options.threshold, step=0.01,
                                      label="Threshold")
                tta = gr.Checkbox(value=options.tta, label="Flip test-time augmentation")
                largest = gr.Checkbox(value=options.largest_component, label="Keep largest component only")
                min_size = gr.Number(value=options.min_size, precision=0, minimum=0, label="Minimum component (px)")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                # PNG: Gradio's default WebP is lossy (it smeared the 1-px outline and filled small mask holes)
                shown = gr.Image(label="Overlay (prediction in red)", type="numpy", height=320, format="png",
                                 elem_classes=SLICE_VIEW)
                heat = gr.Image(label=PROBABILITY_LABEL, type="numpy", height=320, format="png", elem_classes=SLICE_VIEW)
                area = gr.Textbox(label="Area")
                mask = gr.File(label="Mask PNG (0/255)")
        inputs, outputs = [file, threshold, tta, largest, min_size], [shown, heat, area, mask]
        if examples:
            gr.Examples([[str(path)] for path in examples], inputs=[file])
        button.click(run, inputs, outputs, api_name="segment")
    return page


def require_gradio() -> Any:
    """The gradio module; ``ConfigError`` with the install command when it is missing."""
    try:
        import gradio
    except ImportError:
        raise ConfigError(f"The demo needs gradio: {INSTALL_HINT}") from None
    return gradio


def serving_address(cfg: DictConfig) -> tuple[str, int]:
    """``(host, port)`` the page can be served on: ``ConfigError`` naming them when the port is out of range, the host
    unknown, or the address taken (checked by binding it, before the model is loaded)."""
    host, port = str(cfg.get("host", "127.0.0.1")), int(number_setting(cfg, "port", 7860, whole=True, minimum=1))
    if port > MAX_PORT:
        raise ConfigError(f"port={port} must be at most {MAX_PORT}.")
    address = host.removeprefix("[").removesuffix("]")  # an IPv6 address, bare or bracketed as in URLs
    try:
        with socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else socket.AF_INET):
            pass
    except OSError as error:
        raise ConfigError(f"Cannot serve on host={host} port={port} ({error.strerror or error}): pass a free port=N, "
                          "or host=127.0.0.1 (this machine) / host=0.0.0.0 (every interface).") from None
    return (f"[{address}]" if ":" in address else address), port  # Gradio builds its URL from it: brackets


def demo(cfg: DictConfig) -> None:
    """Load ``cfg.ckpt_path`` and serve the page until interrupted."""
    require_gradio()  # before loading the model: fail fast
    ckpt_path = path_setting(cfg, "ckpt_path", "python -m bts_lightning.demo ckpt_path=MODEL")
    options = InferenceOptions.from_config(cfg)
    image_size = cfg.get("image_size")
    if image_size is not None:
        image_size = int(as_number("image_size", image_size, whole=True, minimum=1))
    count = int(number_setting(cfg, "examples", 3, whole=True, minimum=0))
    keep_masks = cfg.get("keep_masks")
    if keep_masks is not None:
        keep_masks = int(as_number("keep_masks", keep_masks, whole=True, minimum=1))
    host, port = serving_address(cfg)
    predictor = load_predictor(ckpt_path, resolve_device(cfg.get("device", "auto")))
    if image_size is not None:
        check_input_size(predictor, image_size, "image_size")  # else every upload would fail on the page
    contract = contract_of(predictor)
    options = with_model_decision(options, cfg, contract)
    if contract.neighbours:
        log.info("The demo takes one slice at a time: this model, trained with %d slice(s) either side in the scan "
                 "(data.neighbours), sees the slice's own planes in their place. Predict over a scan folder for them.",
                 contract.neighbours)
    cascade = cascade_of(predictor)
    if cascade is not None and cascade.context:
        log.info("The demo takes one slice at a time, so this cascade's scan context (%d slice(s) either side) is not "
                 "applied: each slice is judged alone (presence threshold %.6g). Predict over a scan folder for it.",
                 cascade.context, cascade.presence_threshold)
    run_dir = Path(cfg.paths.output_dir)
    examples = example_slices(run_dir / "examples", count, contract.channel_indices) if count else []
    page = build_demo(predictor, options, run_dir / "masks", examples, image_size, keep_masks)
    served = [run_dir / "masks", *([examples[0].parent] if examples else [])]
    page.launch(server_name=host, server_port=port, share=flag_setting(cfg, "share", False), css=CSS,
                max_file_size=MAX_UPLOAD_BYTES, allowed_paths=[str(path) for path in served])
    log.info("Demo stopped")


main = hydra_app("demo", demo)  # entry point: bts-demo


if __name__ == "__main__":
    main()
