"""Gradio Space: tumor segmentation of one MRI slice with ``model.onnx``, without PyTorch or bts_lightning.

Copied as ``app.py`` into the Space bundle by ``python -m bts_lightning.export format=space``. It needs only
onnxruntime, OpenCV, NumPy and Gradio, and repeats bts_lightning's predict path in NumPy (read the
model's channels, resize each to the trained size with area/linear interpolation, flip TTA (for a cascade, of its
segmentation alone, gated by the presence of the slice as given), resize the
probabilities back bilinearly, threshold, drop small components / keep the largest, and the model's
calibrated slice decision: an empty mask when the slice score is at most its threshold); the bundle's
test checks its masks equal ``predict``'s. A model trained with scan neighbours (``data.neighbours``) gets the lone
slice's own planes in their place, as bts_lightning does for a slice without neighbours. Research demo only: not for diagnosis.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime

HERE = Path(__file__).resolve().parent
CONTRACT_KEY = "bts_lightning.contract"
MAX_PIXELS = 4096 * 4096
MAX_UPLOAD_BYTES = 50 * 2**20
_TO_GRAY = {3: cv2.COLOR_RGB2GRAY, 4: cv2.COLOR_RGBA2GRAY}


@dataclass(frozen=True)
class Model:
    """An onnxruntime session and its bts_lightning contract (image_size, channels, slice decision)."""

    session: Any
    image_size: int
    channels: list[int] | None  # None = gray
    decision: dict[str, Any] | None = None  # rule, threshold, pixel_threshold (bts_lightning.decision)
    neighbours: int = 0  # scan slices either side the input stacks (bts_lightning.data.neighbours)
    cascade_parts: bool = False  # a cascade that also outputs its segmentation and presence gates (flip TTA)

    @classmethod
    def load(cls, path: str | Path = HERE / "model.onnx") -> Model:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        contract = json.loads(session.get_modelmeta().custom_metadata_map.get(CONTRACT_KEY) or "{}")
        channels = contract.get("channels", "gray")
        return cls(session, int(contract.get("image_size") or 256), None if channels == "gray" else list(channels),
                   contract.get("decision"), int(contract.get("neighbours") or 0), bool(contract.get("cascade_parts")))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.session.get_inputs()[0].name: batch.astype(np.float32)})[0]

    def parts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A cascade's segmentation probabilities (N, H, W) and presence gates (N,); its output is their minimum."""
        outputs = self.session.run(None, {self.session.get_inputs()[0].name: batch.astype(np.float32)})
        return outputs[1], outputs[2]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, np.uint8)
    return np.round((image - low) * (255.0 / (high - low))).astype(np.uint8)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, read by Pillow (gradio's dependency) without decoding its
    pixels; ``None`` for a TIFF Pillow cannot read (left to the decoder). ValueError for any other file Pillow cannot
    read (OpenCV decodes by content, whatever the name) and for an image over Pillow's own limit."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError:
        raise ValueError(f"{path.name} is too large (up to {MAX_PIXELS} pixels).") from None
    except Exception:  # noqa: BLE001 - not a format Pillow reads: only a TIFF goes on to the decoder
        with path.open("rb") as stream:
            if stream.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        raise ValueError(f"{path.name}: not a readable image (PNG, JPEG, TIFF or BMP).") from None


def read_slice(path: str | Path, channels: list[int] | None) -> np.ndarray:
    """(C, H, W) uint8 of an image file: gray, or the file-order ``channels``; ValueError with the reason."""
    dimensions = header_size(Path(path))  # before decoding: a small compressed file can hold a huge image
    if dimensions is not None and dimensions[0] * dimensions[1] > MAX_PIXELS:
        raise ValueError(f"{Path(path).name} is too large ({dimensions[0]}x{dimensions[1]} px; up to {MAX_PIXELS} "
                         "pixels).")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(f"{Path(path).name}: not a readable image (PNG, JPEG, TIFF or BMP).")
    if Path(path).suffix.lower() in (".tif", ".tiff") and (pages := cv2.imcount(str(path))) > 1:
        raise ValueError(f"{Path(path).name}: holds {pages} pages (a volume or a stack), not one slice; save each "
                         "slice as its own image file.")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{Path(path).name}: holds NaN or infinite pixel values.")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., [2, 1, 0, 3][: image.shape[2]]]  # OpenCV BGR(A) -> file RGB(A)
    if channels is None:
        if image.ndim == 3 and image.shape[2] in _TO_GRAY:
            if image.dtype not in (np.uint8, np.uint16, np.float32):  # int16, float64, ...: OpenCV converts none
                image = image.astype(np.float32)
            image = cv2.cvtColor(np.ascontiguousarray(image), _TO_GRAY[image.shape[2]])
        elif image.ndim == 3:
            image = image.mean(axis=2).astype(image.dtype)
        planes = image[None]
    else:
        stack = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        if max(channels) >= len(stack):
            raise ValueError(f"{Path(path).name} has {len(stack)} channel(s); the model takes channels {channels}.")
        planes = stack[channels]
    if planes.shape[-2] * planes.shape[-1] > MAX_PIXELS:
        raise ValueError(f"{Path(path).name} is too large (up to {MAX_PIXELS} pixels).")
    return np.ascontiguousarray(planes if planes.dtype == np.uint8 else _to_uint8(planes))


def probabilities(model: Model, image: np.ndarray, tta: bool) -> np.ndarray:
    """Tumor probabilities (H, W) of a (C, H, W) slice, at its own size."""
    size, (height, width) = model.image_size, image.shape[-2:]
    interpolation = cv2.INTER_AREA if height > size else cv2.INTER_LINEAR
    resized = np.stack([c if c.shape == (size, size) else cv2.resize(c, (size, size), interpolation=interpolation)
                        for c in image])[None].astype(np.float32)
    if (np.ptp(resized.reshape(len(resized[0]), -1), axis=1) == 0).all():  # a blank slice: nothing to segment
        return np.zeros((height, width), np.float32)  # (as bts_lightning.preprocessing.blank)
    if not tta:
        result = model(resized)
    elif model.cascade_parts:  # the segmentation flip-averaged, gated by the presence of the slice as given
        segmentation, gates = model.parts(resized)
        segmentation = segmentation + model.parts(resized[..., ::-1])[0][..., ::-1]
        segmentation = segmentation + model.parts(resized[..., ::-1, :])[0][..., ::-1, :]
        result = np.minimum(segmentation / 3, gates[:, None, None])
    else:
        result = model(resized) + model(resized[..., ::-1])[..., ::-1]
        result = (result + model(resized[..., ::-1, :])[..., ::-1, :]) / 3
    probability = np.ascontiguousarray(result[0], dtype=np.float32)
    if probability.shape != (height, width):
        probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
    return probability


def clean(mask: np.ndarray, largest_component: bool, min_size: int) -> np.ndarray:
    """Drop 8-connected components under ``min_size`` px, then keep the largest (as bts_lightning.postprocess)."""
    if not largest_component and min_size <= 1:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = areas >= min_size
    if largest_component and keep.any():
        largest = int(np.argmax(np.where(keep, areas, -1)))
        keep = np.zeros_like(keep)
        keep[largest] = True
    return np.concatenate([[0], keep]).astype(np.uint8)[labels]


def slice_score(probability: np.ndarray, rule: str, pixel_threshold: float) -> float:
    """As bts_lightning.decision.slice_score: the largest 8-connected component of probability > pixel_threshold
    as a fraction of the slice (``component_fraction``), or the largest probability (``max_probability``)."""
    if probability.size == 0:
        return 0.0
    if rule == "max_probability":
        return float(probability.max())
    count, _, stats, _ = cv2.connectedComponentsWithStats((probability > pixel_threshold).astype(np.uint8),
                                                          connectivity=8)
    return (int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0) / probability.size


def segment(model: Model, path: str | Path, threshold: float = 0.5, tta: bool = False,
            largest_component: bool = False, min_size: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(RGB overlay, mask 0/255, area text) of the slice file ``path``; ValueError for bad files.

    With the model's slice decision, a slice scoring at most its threshold gets an empty mask.
    """
    image = read_slice(path, model.channels)
    probability = probabilities(model, np.concatenate([image] * (2 * model.neighbours + 1)), tta)
    mask = clean((probability > threshold).astype(np.uint8), largest_component, int(min_size))
    area = None
    if model.decision is not None:
        score = slice_score(probability, model.decision["rule"], model.decision["pixel_threshold"])
        if score <= model.decision["threshold"]:
            mask = np.zeros_like(mask)
            area = f"No tumor detected (slice score {score:.4g} <= threshold {model.decision['threshold']:.4g})"
    rgb = cv2.cvtColor(_to_uint8(image[0]), cv2.COLOR_GRAY2RGB)
    rgb[mask > 0] = (0.65 * rgb[mask > 0] + 0.35 * np.array([255, 0, 0], np.float32)).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, (255, 0, 0), 1)  # outlined in red, as predict's overlays
    pixels = int(mask.sum())
    return rgb, mask * 255, area or f"Tumor area: {pixels} px ({100.0 * pixels / mask.size:.2f} % of the slice)"


def build(model: Model) -> Any:
    """The Gradio page over ``model``; bad uploads show one message."""
    import gradio as gr

    def run(file: str | None, threshold: float, tta: bool, largest: bool, min_size: float) -> tuple[Any, ...]:
        if not file or not Path(file).is_file() or Path(file).stat().st_size == 0:
            raise gr.Error("Upload a non-empty slice (PNG, JPEG, TIFF or BMP).")
        if not 0.0 <= float(threshold) < 1.0 or float(min_size or 0) < 0:  # the API is not held by the controls
            raise gr.Error(f"threshold={threshold} must be in [0, 1) and min_size={min_size} >= 0.")
        try:
            overlay, mask, area = segment(model, file, threshold, tta, largest, int(min_size or 0))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        mask_path = Path(file).with_name(f"{Path(file).stem}_mask.png")
        if not cv2.imwrite(str(mask_path), mask):
            raise gr.Error(f"Could not write the mask file {mask_path.name} (is the disk full?).")
        return overlay, area, str(mask_path)

    # The controls start where the slice decision was calibrated (its pixel threshold, with or without TTA).
    decision = model.decision or {}
    threshold = float(decision.get("pixel_threshold", 0.5))
    tta = bool((decision.get("calibration") or {}).get("tta", False))
    with gr.Blocks(title="Brain tumor segmentation", delete_cache=(3600, 86400)) as page:  # uploads: a day
        gr.Markdown("# Brain tumor segmentation\nResearch demo: **not for diagnosis.**")
        file = gr.File(label="Slice", file_types=["image", ".tif", ".tiff"], type="filepath")
        controls = [gr.Slider(0.0, max(0.99, threshold), value=threshold, step=0.01, label="Threshold"),
                    gr.Checkbox(value=tta, label="Flip TTA"),
                    gr.Checkbox(label="Largest component only"), gr.Number(0, precision=0, label="Minimum component (px)")]
        outputs = [gr.Image(label="Overlay (prediction in red)", format="png"), gr.Textbox(label="Area"),
                   gr.File(label="Mask PNG (0/255)")]
        examples = sorted((HERE / "examples").glob("*.png"))
        if examples:
            gr.Examples([[str(path)] for path in examples], inputs=[file])
        gr.Button("Segment", variant="primary").click(run, [file, *controls], outputs, api_name="segment")
    return page


if __name__ == "__main__":
    build(Model.load()).launch(max_file_size=MAX_UPLOAD_BYTES)
