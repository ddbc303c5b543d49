"""Hydra app: ``python -m bts_lightning.predict ckpt_path=PATH input=DIR_OR_FILE output=DIR``.

Every image in ``input`` (a file, or the image files directly inside a folder: PNG, JPEG, TIFF,
BMP; 8/16-bit, gray or colour, any size) gets ``<stem>_mask.png`` (0/255, at the image's original
resolution) and ``<stem>_overlay.png`` (prediction tinted and outlined in red) in ``output``, and
``slices.csv`` one row per slice: file, mask, tumor_present, tumor_area_px, score (of the slice decision).

Each slice is read with the channels the model was trained on (its contract's ``channels``, as
``data.channels``: grayscale, or channel indices in file order such as ``[1]``, FLAIR of an LGG
TIFF), each channel resized to ``image_size`` x ``image_size`` for the network (as in training), and
its tumor probabilities are resized back to the original size (bilinear) before thresholding and
postprocessing, so ``postprocess.min_size`` counts original pixels. Overlays are drawn on the first
channel read. Options: ``tta=true`` (flip averaging), ``threshold=0.5``,
``postprocess.largest_component=true``, ``postprocess.min_size=N``, ``channels=[2]`` (other file
channels than the model's, as many as it takes; with a warning), ``slice_decision=auto|off`` (the
model's calibrated slice decision, :mod:`bts_lightning.decision`: an empty mask for a slice it judges
tumor-free; ``slices.csv`` has each slice's ``score``), ``scan_context=auto|off`` (a cascade built with a
scan context, :mod:`bts_lightning.scan_context`, judges each slice with its neighbours: the input folder is
taken as one scan, each file's slice number the number its name ends with; ``score`` is then the presence
averaged over the slice's window). A model trained with scan neighbours (``data.neighbours=K``) gets each file
stacked with the files K slices before and after it among the inputs (:class:`InputReader`: the input folder
is one scan; a lone file gets its own planes in their place, with a warning). ``ckpt_path`` may be a training
checkpoint (``.ckpt``) or an exported model (``.onnx``, ``.pt``, ``.ts``), loaded by
:func:`bts_lightning.inference.load_predictor`.

``image_size`` defaults to the size the model was trained at, from the model file's contract
(:class:`bts_lightning.inference.ModelContract`: the checkpoint's data settings, or the contract
embedded in an exported file, so a ``model.onnx`` copied anywhere keeps it); 256 when the file does
not record it (exports older than the contract). An explicit ``image_size`` wins, with a warning
when it differs from the trained size.

Unreadable files, and files lacking a channel the model takes (a grayscale file for a 3-channel
model), get one warning each and a summary, and are skipped; the exit status is 0 when
at least one image was written, 2 (one ``error:`` line) when the input is missing, holds no
image files, or nothing could be read. Files in ``input`` are only read, never written.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bts_lightning.data.channels import Channels, channels_setting, describe_channels, parse_channels
from bts_lightning.data.dataset import resize_image
from bts_lightning.data.discovery import IMAGE_SUFFIXES
from bts_lightning.data.figshare_layout import MAT_SUFFIX, read_mat_slice
from bts_lightning.data.figshare_metadata import SLICE_NAME
from bts_lightning.data.io import ChannelError, UnreadableImageError, read_channels, to_channels
from bts_lightning.data.neighbours import (
    neighbour_windows,
    own_channel,
    slice_position,
    stack_window,
    window_size,
)
from bts_lightning.data.suffix_layout import MASK_SUFFIX
from bts_lightning.errors import ConfigError, DataError, format_names
from bts_lightning.inference import (
    InferenceOptions,
    ModelContract,
    Predictor,
    check_input_size,
    contract_of,
    load_predictor,
    predict_probabilities,
    resolve_device,
)
from bts_lightning.models.cascade import cascade_of
from bts_lightning.runtime import as_number, hydra_app, make_directory, number_setting, write_staged
from bts_lightning.scan_context import (
    ScanContext,
    SegmentationPredictor,
    decision_or_context,
    presence_probabilities,
)
from bts_lightning.visualize import encode_png, overlay, write_png

log = logging.getLogger(__name__)


DEFAULT_IMAGE_SIZE = 256
SLICES_CSV = "slices.csv"
SLICE_COLUMNS = ("file", "mask", "tumor_present", "tumor_area_px", "score")


def list_inputs(source: str | Path) -> list[Path]:
    """The file ``source``, or the image files directly inside folder ``source``, in slice order: by name, the
    numbers names end with compared as numbers (``scan_2`` before ``scan_10``). In a folder, the masks of its
    images (``X_mask.tif`` beside ``X.tif``: an LGG patient folder) are left out, and the log says how many."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"Input {path} does not exist; pass input=IMAGE_FILE or input=FOLDER_OF_IMAGES.")
    images = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and (
        p.suffix.lower() in IMAGE_SUFFIXES or SLICE_NAME.match(p.name))]  # Figshare slice files N.mat, not cvind.mat
    stems = {p.stem for p in images}
    masks = [p for p in images if p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in stems]
    if masks:
        log.info("Left out %d mask file(s) of the images beside them (X%s next to X) in %s", len(masks), MASK_SUFFIX,
                 path)
    files = sorted(set(images) - set(masks), key=_slice_order)
    if not files:
        folders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        inside = (f" Only the files directly inside it are read, not its {len(folders)} folder(s) ("
                  f"{format_names(folders, 3)}): pass one of them, e.g. input={path / folders[0]}." if folders else "")
        raise DataError(f"No image files ({', '.join(sorted(IMAGE_SUFFIXES))}, or Figshare slice files N.mat) in "
                        f"{path}.{inside}")
    return files


def read_input(path: Path, channels: Channels) -> np.ndarray:
    """(C, H, W) uint8 ``channels`` of an image file, or of a Figshare slice file's ``cjdata.image`` (``.mat``),
    read as training reads them; raises what :func:`read_channels` raises."""
    if path.suffix.lower() == MAT_SUFFIX:
        return to_channels(read_mat_slice(path)[0], channels)
    return read_channels(path, channels)


def _slice_order(path: Path) -> tuple[str, int, str]:
    """Sort key: the stem without its trailing number, that number (-1 without one), the file name."""
    found = re.search(r"\d+$", path.stem)
    if found is None:
        return path.stem, -1, path.name
    return path.stem[: found.start()], int(found.group()), path.name


def output_names(files: list[Path]) -> dict[Path, str]:
    """Output name stem per input, unique also ignoring case (as a case-insensitive disk stores them): its file stem,
    ``<stem>_<ext>`` when stems collide (a.png, a.jpg), then ``_2``, ``_3``, ... in ``files`` order for what still
    collides (``a_png.bmp`` beside those, ``b.tif`` beside ``b.TIF``)."""
    stems = Counter(path.stem.casefold() for path in files)
    first = {path: path.stem if stems[path.stem.casefold()] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
             for path in files}
    counts = Counter(name.casefold() for name in first.values())
    taken = {name.casefold() for name in first.values() if counts[name.casefold()] == 1}
    names: dict[Path, str] = {}
    for path in files:
        name = candidate = first[path]
        if counts[name.casefold()] > 1:
            number = 1
            while candidate.casefold() in taken:
                number += 1
                candidate = f"{name}_{number}"
            taken.add(candidate.casefold())
        names[path] = candidate
    return names


class InputReader:
    """Reads each of ``files`` as the model's input: its ``channels``, stacked with those of its ``neighbours``
    slices either side among ``files`` (:mod:`bts_lightning.data.neighbours`: a folder is one scan, a slice's
    number the one its name ends with; the nearest slice stands in for a missing neighbour, the slice itself for
    an unreadable one). ``own_channel`` is the slice's own first channel in what :meth:`read` returns.

    With neighbours, the planes of the last two windows' files are kept, so a scan read in order decodes each
    file once, not once per window it is in."""

    def __init__(self, files: list[Path], channels: Channels, neighbours: int = 0) -> None:
        self.channels, self.neighbours = channels, neighbours
        self.own_channel = own_channel(neighbours, 1 if channels is None else len(channels))
        self.windows: dict[Path, list[Path]] = {}
        self._recent: OrderedDict[Path, np.ndarray] = OrderedDict()
        if neighbours:
            positions = [slice_position(path) for path in files]
            windows = neighbour_windows(positions, neighbours, fix="predict each scan's folder on its own")
            self.windows = {path: [files[i] for i in window] for path, window in zip(files, windows)}
            alone = [path.name for path, position in zip(files, positions) if position is None]
            if alone or len(files) == 1:
                log.warning("%d input slice(s) have no scan neighbours among the inputs (%s): the model, trained on "
                            "%d slice(s) either side, sees their own planes in their place. Pass a scan's folder as "
                            "input, its files named <scan>_<n>.", max(len(alone), 1),
                            format_names(alone or [files[0].name]), neighbours)

    def read(self, path: Path) -> np.ndarray:
        """(C, H, W) uint8 input of ``path``; raises what :func:`read_input` raises for ``path`` itself."""
        if not self.neighbours:
            return read_input(path, self.channels)
        image = self._plane(path)
        planes: dict[Path, np.ndarray] = {path: image}
        for other in self.windows[path]:
            if other not in planes:
                try:
                    planes[other] = self._plane(other)
                except (UnreadableImageError, ChannelError, OSError):
                    planes[other] = image
                if planes[other].shape != image.shape:
                    raise ValueError(f"its scan neighbour {other.name} is {planes[other].shape[2]}x"
                                     f"{planes[other].shape[1]} px, not {image.shape[2]}x{image.shape[1]} like it")
        return stack_window([planes[other] for other in self.windows[path]])

    def _plane(self, path: Path) -> np.ndarray:
        """``read_input`` of ``path``, from the recent planes when it is one of them."""
        if path in self._recent:
            self._recent.move_to_end(path)
            return self._recent[path]
        plane = read_input(path, self.channels)
        self._recent[path] = plane
        if len(self._recent) > 2 * window_size(self.neighbours):
            self._recent.popitem(last=False)
        return plane


def input_channels(setting: Any, contract: ModelContract) -> Channels:
    """The channels to read of each file: the model's (``setting`` null) or ``setting`` (the ``channels`` option).

    Logs which ones once, with a warning when they are not the model's. Raises ``ConfigError`` naming
    ``channels`` when ``setting`` is invalid or gives another count than the model's ``in_channels``.
    """
    model = contract.channel_indices
    if setting is None:
        channels = model
    else:
        channels = parse_channels(OmegaConf.to_container(setting) if OmegaConf.is_config(setting) else setting,
                                  "channels")
        count = 1 if channels is None else len(channels)
        if count != contract.slice_channels:
            raise ConfigError(
                f"channels={channels_setting(channels)} gives {count} channel(s) of each slice, but the model takes "
                f"{contract.slice_channels} ({contract.describe_channels()}); give {contract.slice_channels} "
                "channel(s) (gray counts as one), or channels=null for the model's own."
            )
    if channels == model:
        log.info("The model takes %s", contract.describe_channels())
    else:
        log.warning("Reading %s (channels=%s), but the model was trained on %s.", describe_channels(channels),
                    channels_setting(channels), contract.describe_channels())
    return channels


def segment(
    predictor: Predictor, images: list[np.ndarray], image_size: int, options: InferenceOptions
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probabilities, mask) of each (C, H, W) image, at its own resolution: the one per-image path of
    ``predict`` and the demo.

    Each image is resized to ``image_size`` for the network; its float32 probabilities are resized back
    (bilinear), then thresholded and postprocessed by ``options`` into a uint8 {0, 1} mask.
    """
    if not images:
        return []
    batch = np.stack([resize_image(image, image_size) for image in images])
    results = []
    for image, probability in zip(images, predict_probabilities(predictor, batch, options.tta).numpy()):
        height, width = image.shape[-2:]
        if probability.shape != (height, width):
            probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
        results.append((probability, options.mask(probability)))
    return results


def predict_files(
    predictor: Predictor,
    files: list[Path],
    output_dir: Path,
    image_size: int,
    options: InferenceOptions,
    batch_size: int = 16,
    channels: Channels = None,
    decisions: list[dict[str, Any]] | None = None,
    scan_decisions: Mapping[Path, tuple[float, bool]] | None = None,
    reader: InputReader | None = None,
    staged: ExitStack | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Write mask and overlay of every readable file; returns (written masks, (skipped file, reason)).

    ``channels``: which channels of each file the predictor takes (``None`` = grayscale), read by ``reader``
    (default: each file alone, :class:`InputReader`); a file lacking one of them is skipped with its reason. ``decisions`` (when given) gets one row per written
    file (:data:`SLICE_COLUMNS`): ``tumor_present`` = the final mask has a tumor pixel; ``score`` =
    the slice decision's score (``None`` without ``options.decision``). ``scan_decisions`` (score, tumor
    present) by file, decided for all files together (:func:`scan_presence`), replace the slice decision. With
    ``staged`` every file is staged on it (:func:`~bts_lightning.runtime.write_staged`), taking its place when it
    closes; else each is written at once.
    """

    def save(path: Path, image: np.ndarray) -> None:
        if staged is None:
            write_png(path, image)
        else:
            write_staged(staged, path, encode_png(image))

    names = output_names(files)
    reader = reader or InputReader(files, channels)
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with tqdm(total=len(files), desc="predict", unit="image", disable=None) as bar:
        for start in range(0, len(files), batch_size):
            loaded: list[tuple[Path, np.ndarray]] = []
            for path in files[start : start + batch_size]:
                try:
                    loaded.append((path, reader.read(path)))
                except (UnreadableImageError, ChannelError, OSError, ValueError) as error:
                    reason = _reason(error, channels)
                    log.warning("Skipping %s: %s", path.name, reason)
                    skipped.append((path, reason))
            if loaded:
                results = segment(predictor, [image for _, image in loaded], image_size, options)
                for (path, image), (probability, mask) in zip(loaded, results):
                    mask_path = output_dir / f"{names[path]}_mask.png"
                    score = None if options.decision is None else options.decision.score(probability)
                    if scan_decisions is not None:
                        score, present = scan_decisions[path]
                        mask = mask if present else np.zeros_like(mask)
                    if decisions is not None:
                        decisions.append({"file": path.name, "mask": mask_path.name,
                                          "tumor_present": bool(mask.any()), "tumor_area_px": int(mask.sum()),
                                          "score": score})
                    save(mask_path, mask * 255)
                    save(output_dir / f"{names[path]}_overlay.png",
                         cv2.cvtColor(overlay(image[reader.own_channel], mask), cv2.COLOR_RGB2BGR))
                    written.append(mask_path)
            bar.update(min(batch_size, len(files) - start))
    return written, skipped


def scan_presence(predictor: Predictor, files: list[Path], image_size: int, reader: InputReader,
                  context: ScanContext, batch_size: int = 16) -> dict[Path, tuple[float, bool]]:
    """(score, tumor present) of every readable file under the cascade's scan ``context``, the files taken as one
    scan (:meth:`ScanContext.decide`); unreadable files are left out (:func:`predict_files` reports them)."""
    cascade = cascade_of(predictor)
    readable: list[Path] = []
    probabilities: list[float] = []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                batch.append((path, resize_image(reader.read(path), image_size)))
            except (UnreadableImageError, ChannelError, OSError, ValueError):
                continue
        if batch:
            readable.extend(path for path, _ in batch)
            probabilities.extend(presence_probabilities(cascade, np.stack([image for _, image in batch])))
    return dict(zip(readable, context.decide(probabilities, [slice_position(path) for path in readable])))


def _reason(error: Exception, channels: Channels) -> str:
    """Why a file was skipped, in one phrase."""
    if isinstance(error, ChannelError):
        return f"has {error.count} channel(s), but the model takes {describe_channels(channels)}"
    if isinstance(error, UnreadableImageError):  # its message after the file's path, which the caller names
        return str(error).split(": ", 1)[-1]
    return str(error)


def unreadable_inputs(skipped: list[tuple[Path, str]], channels: Channels) -> str:
    """The error when none of the input files could be read: each reason once, with the files it holds for, and
    what to do when the reason is the channels."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path.name)
    reasons = "; ".join(f"{format_names(names)}: {reason}" for reason, names in by_reason.items())
    advice = ""
    if any(reason.startswith("has ") and "channel(s)" in reason for reason in by_reason):
        advice = (" The model takes one channel: pass channels=gray (each file converted to grayscale) or "
                  "channels=[K] with K a channel these files have, counted from 0." if channels is None or
                  len(channels) == 1 else
                  f" The model takes {len(channels)} channels of each file: pass files that have them (e.g. the "
                  "multi-channel originals it was trained on).")
    return f"None of the {len(skipped)} input file(s) could be read as the model's input: {reasons}.{advice}"


def slices_csv(rows: list[dict[str, Any]]) -> bytes:
    """The ``slices.csv`` of the per-slice rows of :func:`predict_files` (:data:`SLICE_COLUMNS`)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SLICE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "score": "" if row["score"] is None else f"{row['score']:.6g}"} for row in rows)
    return text.getvalue().encode()


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Check the options, load the model and write masks and overlays; returns a summary."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m bts_lightning.predict ckpt_path=MODEL input=DIR output=DIR")
    if not cfg.get("input"):
        raise ConfigError("input is required: input=IMAGE_FILE or input=FOLDER_OF_IMAGES")
    ckpt_path, source, output_dir = Path(str(cfg.ckpt_path)), Path(str(cfg.input)), Path(str(cfg.output))
    options = InferenceOptions.from_config(cfg)
    files = list_inputs(source)
    input_dir = source if source.is_dir() else source.parent
    if output_dir.resolve() == input_dir.resolve():
        raise ConfigError(f"output={output_dir} is the input folder; choose another folder so inputs stay untouched.")
    batch_size = int(number_setting(cfg, "batch_size", 16, whole=True, minimum=1))
    predictor = load_predictor(ckpt_path, resolve_device(cfg.get("device", "auto")))
    trained_at = contract_of(predictor).image_size
    image_size = cfg.get("image_size")
    if image_size is not None:
        image_size = int(as_number("image_size", image_size, whole=True, minimum=1))
    if image_size is None:
        image_size = trained_at or DEFAULT_IMAGE_SIZE
        source_of_size = "the size it was trained at" if trained_at else "default; the model file does not record it"
        log.info("Network input size %d px (%s)", image_size, source_of_size)
    elif trained_at is not None and trained_at != image_size:
        log.warning("The model was trained at %d px but image_size=%s; pass image_size=%d to match.",
                    trained_at, image_size, trained_at)
    check_input_size(predictor, image_size, "image_size")
    channels = input_channels(cfg.get("channels"), contract_of(predictor))
    reader = InputReader(files, channels, contract_of(predictor).neighbours)
    options, context = decision_or_context(options, cfg, predictor)
    created = not output_dir.exists()
    make_directory(output_dir, "output")
    try:
        return _predict_into(predictor, files, output_dir, image_size, options, batch_size, channels, reader, context)
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a failed run leaves no empty folder behind
        raise


def _predict_into(predictor: Predictor, files: list[Path], output_dir: Path, image_size: int,
                  options: InferenceOptions, batch_size: int, channels: Channels, reader: InputReader,
                  context: ScanContext | None) -> dict[str, Any]:
    """The work of :func:`predict` once its settings are checked and ``output_dir`` exists; its summary."""
    scan_decisions = None
    if context is not None:
        log.info("Scan context: the %d input slice(s) are one scan, in the order of the numbers their file names end "
                 "with (scan_context=off for unrelated slices); tumor present iff %s.", len(files), context.describe())
        scan_decisions = scan_presence(predictor, files, image_size, reader, context, batch_size)
        predictor = SegmentationPredictor(predictor)  # decision_or_context left options without a slice decision
    decisions: list[dict[str, Any]] = []
    # Every output is staged beside its place and all take their places at the end, slices.csv last (staged first):
    # a failed or killed run (a full disk, SIGKILL) leaves an earlier run's files in output as they were, never new
    # masks beside an old slices.csv.
    with ExitStack() as staged:
        table = write_staged(staged, output_dir / SLICES_CSV)
        written, skipped = predict_files(predictor, files, output_dir, image_size, options, batch_size, channels,
                                         decisions, scan_decisions, reader, staged)
        if not written:
            raise DataError(unreadable_inputs(skipped, channels))
        table.write_bytes(slices_csv(decisions))
    skipped_names = [path.name for path, _ in skipped]
    if skipped:
        log.warning("Skipped %d unreadable file(s) of %d: %s", len(skipped), len(files), format_names(skipped_names))
    empty = sum(not entry["tumor_present"] for entry in decisions)
    how = f" (slice decision: {options.decision.describe()})" if options.decision is not None else ""
    how = f" (scan context: {context.describe()})" if context is not None else how
    log.info("%d of %d slice(s) without tumor%s; per slice: %s", empty, len(decisions), how, SLICES_CSV)
    log.info("Wrote %d mask(s) and overlay(s) to %s", len(written), output_dir)
    if earlier := sorted(set(output_dir.glob("*_mask.png")) - set(written)):
        log.warning("%s also holds %d mask(s) this run did not write (an earlier run's, e.g. %s); %s lists this run's "
                    "slices. Use a new output folder to keep runs apart.", output_dir, len(earlier),
                    format_names([path.name for path in earlier], 3), SLICES_CSV)
    return {"written": [str(p) for p in written], "skipped": skipped_names, "output": str(output_dir),
            "image_size": image_size, "channels": channels_setting(channels),
            "decision": None if options.decision is None else options.decision.to_dict(),
            "scan_context": None if context is None else context.to_dict(),
            "slices": decisions}


main = hydra_app("predict", predict)  # entry point: bts-predict


if __name__ == "__main__":
    main()
