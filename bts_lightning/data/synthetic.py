"""Synthetic MRI-like brain slices with tumor masks, written in the Kaggle layout.

``OUT/images/<index>.png`` (8-bit slice), ``OUT/masks/<index>.png`` (0 background, 255 tumor),
``OUT/metadata.csv`` (``index,label,fold,pid``; label 1 meningioma, 2 glioma, 3 pituitary; folds are
assigned per patient) and ``OUT/synthetic.json`` (the generator arguments, checked on reuse). Every
slice is drawn from its own seeded generator, so the output is byte-identical for the same arguments
and independent of generation order. With ``empty_fraction`` > 0 that share of each patient's slices has
no tumor (all-zero masks), for training and measuring on tumor-free slices.

CLI (a Hydra app, ``conf/synthetic.yaml``): ``python -m bts_lightning.data.synthetic out=DIR [n=400]
[size=128] [seed=0] [slices_per_patient=4] [num_folds=5] [empty_fraction=0.0]`` (or ``bts-synthetic ...``)
prints the folder; reusing ``out`` generated with other arguments is an error.
"""

from __future__ import annotations

import csv
import glob
import inspect
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig

from bts_lightning.errors import ConfigError, DataError
from bts_lightning.runtime import STALE_SECONDS, hydra_app, make_directory, output_error, path_setting
from bts_lightning.visualize import encode_png, to_uint8

logger = logging.getLogger(__name__)

MENINGIOMA, GLIOMA, PITUITARY = 1, 2, 3
LABEL_PROBS = (0.23, 0.45, 0.32)  # label frequencies of the Kaggle/figshare set
# Tumor area as a fraction of the image, per label (log-uniform per patient).
AREA_RANGE = {MENINGIOMA: (0.015, 0.07), GLIOMA: (0.015, 0.07), PITUITARY: (0.007, 0.025)}
BRAIN_RHO = 0.84  # head-normalised radius of the brain surface (1.0 = outer scalp)

# Tags keep the seed sequences of folds, patients and slices apart.
_FOLD_TAG, _PATIENT_TAG, _SLICE_TAG = 0, 1, 2

CLI_KEYS = ("out", "n", "size", "seed", "slices_per_patient", "num_folds", "empty_fraction")
USAGE = ("python -m bts_lightning.data.synthetic out=DIR [n=400] [size=128] [seed=0] [slices_per_patient=4] "
         "[num_folds=5] [empty_fraction=0.0]")
MANIFEST = "synthetic.json"


@dataclass(frozen=True)
class _Lobe:
    """One ellipse of a tumor, in units of the tumor radius relative to its center."""

    du: float
    dv: float
    axis_u: float
    axis_v: float
    angle: float
    harmonics: np.ndarray  # rows of (order, amplitude, phase) that make the outline irregular


@dataclass(frozen=True)
class _Patient:
    """Anatomy and tumor of one patient; slices vary pose, texture and tumor cut around it."""

    label: int
    head_axes: tuple[float, float]
    head_harmonics: np.ndarray
    scalp: float
    skull: float
    csf: float
    tissue: float
    ventricle_size: float
    tumor_center: tuple[float, float]
    tumor_radius: float
    lobes: tuple[_Lobe, ...]
    style: str  # "solid", "faint", "ring" or "mixed"
    contrast: float
    core_drop: float
    edema: float  # halo width in tumor radii (0: none)
    edema_drop: float


def _harmonics(rng: np.random.Generator, orders: range, amplitude: float) -> np.ndarray:
    """Random (order, amplitude, phase) rows for an angular outline perturbation."""
    amps = rng.uniform(0.0, amplitude, len(orders)) / np.sqrt(np.arange(1, len(orders) + 1))
    return np.stack([np.array(orders, dtype=float), amps, rng.uniform(0, 2 * np.pi, len(orders))], axis=1)


def _wobble(phi: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    """1 + sum of the cosine harmonics at angles ``phi``."""
    out = np.ones_like(phi)
    for order, amp, phase in harmonics:
        out += np.float32(amp) * np.cos(np.float32(order) * phi + np.float32(phase))
    return out


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 (x <= edge0) to 1 (x >= edge1)."""
    t = (x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about unit variance): a ``cells`` grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _to_pixel(pu: float, pv: float, pose: tuple[float, float, float, float], size: int) -> tuple[float, float]:
    """Image (column, row) of the anatomical point (pu, pv) under ``pose`` (scale, angle, shift_x, shift_y)."""
    scale, angle, shift_x, shift_y = pose
    x = shift_x + scale * (pu * math.cos(angle) - pv * math.sin(angle))
    y = shift_y + scale * (pu * math.sin(angle) + pv * math.cos(angle))
    return (x + 1) * size / 2 - 0.5, (y + 1) * size / 2 - 0.5


def _make_patient(seed: int, patient: int) -> _Patient:
    """Draw the anatomy, label and tumor of one patient."""
    rng = np.random.default_rng([seed, _PATIENT_TAG, patient])
    label = int(rng.choice([MENINGIOMA, GLIOMA, PITUITARY], p=LABEL_PROBS))
    head_axes = (float(rng.uniform(0.68, 0.78)), float(rng.uniform(0.82, 0.92)))
    brain_u, brain_v = head_axes[0] * BRAIN_RHO, head_axes[1] * BRAIN_RHO

    lo, hi = AREA_RANGE[label]
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    radius = math.sqrt(area * 4.0 / math.pi) / 1.15  # image spans 2 units; extra lobes add ~30% area

    if label == MENINGIOMA:  # extra-axial: round, abutting the brain surface anywhere
        theta = rng.uniform(0, 2 * np.pi)
        inset = 1.0 - 0.7 * radius / min(brain_u, brain_v)
        center = (brain_u * inset * math.cos(theta), brain_v * inset * math.sin(theta))
        n_lobes, spread, irregular = int(rng.integers(1, 3)), 0.35, 0.08
        style = "solid" if rng.random() < 0.8 else "mixed"
        contrast = rng.uniform(0.22, 0.42)
        edema = rng.uniform(0.3, 0.7) if rng.random() < 0.3 else 0.0
    elif label == GLIOMA:  # intra-axial in one hemisphere: irregular, often necrotic, with edema
        phi = rng.uniform(-1.1, 1.1) + (np.pi if rng.random() < 0.5 else 0.0)
        depth = math.sqrt(rng.uniform(0.08, 0.5))  # fraction of the brain radius
        center = (brain_u * depth * math.cos(phi), brain_v * depth * math.sin(phi))
        n_lobes, spread, irregular = int(rng.integers(2, 5)), 0.6, 0.18
        style = str(rng.choice(["ring", "faint", "mixed"], p=[0.5, 0.25, 0.25]))
        contrast = rng.uniform(*{"ring": (0.25, 0.45), "faint": (0.05, 0.12), "mixed": (0.12, 0.3)}[style])
        edema = rng.uniform(0.4, 1.2) if rng.random() < 0.85 else 0.0
    else:  # pituitary: small, lower midline (sella)
        center = (rng.normal(0.0, 0.03), brain_v * rng.uniform(0.45, 0.62))
        n_lobes, spread, irregular = int(rng.integers(1, 3)), 0.3, 0.06
        style = "solid" if rng.random() < 0.75 else "mixed"
        contrast = rng.uniform(0.15, 0.38)
        edema = 0.0

    lobes = []
    for i in range(n_lobes):
        scale = 1.0 if i == 0 else rng.uniform(0.4, 0.8)
        offset = (0.0, 0.0) if i == 0 else rng.normal(0.0, spread, 2)
        aspect = rng.uniform(0.65, 1.0)
        lobes.append(
            _Lobe(
                du=float(offset[0]),
                dv=float(offset[1]),
                axis_u=float(scale),
                axis_v=float(scale * aspect),
                angle=float(rng.uniform(0, np.pi)),
                harmonics=_harmonics(rng, range(2, 6), irregular),
            )
        )
    return _Patient(
        label=label,
        head_axes=head_axes,
        head_harmonics=_harmonics(rng, range(2, 5), 0.03),
        scalp=float(rng.uniform(0.65, 0.85)),
        skull=float(rng.uniform(0.04, 0.12)),
        csf=float(rng.uniform(0.08, 0.16)),
        tissue=float(rng.uniform(0.38, 0.46)),
        ventricle_size=float(rng.uniform(0.7, 1.3)),
        tumor_center=(float(center[0]), float(center[1])),
        tumor_radius=radius,
        lobes=tuple(lobes),
        style=style,
        contrast=float(contrast),
        core_drop=float(rng.uniform(0.08, 0.25)),
        edema=float(edema),
        edema_drop=float(rng.uniform(0.05, 0.14)),
    )


def _render_slice(
    patient: _Patient, seed: int, patient_id: int, slice_id: int, size: int, tumor: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slice of ``patient``: (uint8 image min-max scaled to 0..255, uint8 mask in {0, 255}).

    Without ``tumor`` the same slice is rendered without its lesion (an all-zero mask): every random draw
    is made as with it, so anatomy, pose, distractors and noise are those of the tumor slice.
    """
    rng = np.random.default_rng([seed, _SLICE_TAG, patient_id, slice_id])
    f32 = np.float32

    # Pose: anatomical coordinates (u, v) of every pixel after scale, rotation and shift.
    scale, angle = rng.uniform(0.9, 1.04), rng.uniform(-0.2, 0.2)
    shift_x, shift_y = rng.uniform(-0.05, 0.05, 2)
    pose = (scale, angle, shift_x, shift_y)
    grid = (np.arange(size, dtype=f32) + 0.5) * f32(2.0 / size) - 1
    x, y = grid[None, :], grid[:, None]
    cos, sin = f32(math.cos(angle) / scale), f32(math.sin(angle) / scale)
    u = (x - f32(shift_x)) * cos + (y - f32(shift_y)) * sin
    v = (y - f32(shift_y)) * cos - (x - f32(shift_x)) * sin
    pixel = 2.0 / (size * scale)  # one pixel in anatomical units

    # Head: scalp, dark skull, CSF rim, brain (soft-edged layers of a wobbly ellipse).
    axis_u, axis_v = patient.head_axes
    rho = np.sqrt((u / f32(axis_u)) ** 2 + (v / f32(axis_v)) ** 2)
    rho /= _wobble(np.arctan2(v, u), patient.head_harmonics)
    edge = pixel / axis_u

    def inside(radius: float) -> np.ndarray:
        return 1.0 - _smoothstep(radius - edge, radius + edge, rho)

    head, skull, brain, tissue_mask = inside(1.0), inside(0.92), inside(BRAIN_RHO + 0.02), inside(BRAIN_RHO)
    fine = _smooth_noise(rng, size, max(4, size // 10))
    scalp = f32(patient.scalp) * (1 + 0.12 * _smooth_noise(rng, size, 8))
    scalp *= 0.85 + 0.15 * _smoothstep(0.93, 0.98, rho)

    # Brain tissue: bright white matter centre, darker cortex with winding sulci, ventricles, fissure.
    tissue = f32(patient.tissue) + 0.04 * _smooth_noise(rng, size, 5) + 0.015 * fine
    tissue += 0.06 * (1 - _smoothstep(0.35, 0.75, rho))
    cortex = _smoothstep(0.45, 0.75, rho)
    tissue -= 0.22 * cortex * np.exp(-((_smooth_noise(rng, size, max(4, size // 8)) / 0.25) ** 2))
    tissue -= 0.18 * np.exp(-((u / f32(1.3 * pixel)) ** 2)) * _smoothstep(0.25, 0.4, np.abs(v) / axis_v)
    ventricle_scale = patient.ventricle_size * rng.uniform(0.2, 1.2)
    if ventricle_scale > 0.4:
        ventricles = np.zeros_like(u)
        for side in (-1.0, 1.0):
            du, dv = u - f32(side * 0.08 * ventricle_scale), v + f32(0.03)
            c, s = f32(math.cos(side * 0.35)), f32(math.sin(side * 0.35))
            ru, rv = (du * c + dv * s) / f32(0.04 * ventricle_scale), (dv * c - du * s) / f32(0.15 * ventricle_scale)
            r = np.sqrt(ru * ru + rv * rv)
            ventricles = np.maximum(ventricles, 1 - _smoothstep(0.8, 1.2, r))
        tissue = tissue * (1 - ventricles) + f32(patient.csf) * ventricles

    # Tumor field f: > 0 inside (the mask), ~ -distance in tumor radii outside; only in a crop around it.
    radius = max(patient.tumor_radius * rng.uniform(0.7, 1.1), 5.0 / size)
    tu, tv = patient.tumor_center
    centers = [
        (tu + (lobe.du + rng.normal(0, 0.05)) * radius, tv + (lobe.dv + rng.normal(0, 0.05)) * radius)
        for lobe in patient.lobes
    ]
    reach = max(
        math.hypot(cu - tu, cv - tv) + radius * lobe.axis_u * (1.3 + patient.edema) * (1 + lobe.harmonics[:, 1].sum())
        for lobe, (cu, cv) in zip(patient.lobes, centers)
    )
    col, row = _to_pixel(tu, tv, pose, size)
    half = reach * scale * size / 2 + 2
    r0, c0 = max(0, int(row - half)), max(0, int(col - half))
    crop = (slice(r0, min(size, int(row + half) + 2)), slice(c0, min(size, int(col + half) + 2)))
    uc, vc = u[crop], v[crop]
    field = np.full_like(uc, -np.inf)
    for lobe, (cu, cv) in zip(patient.lobes, centers):
        du, dv = uc - f32(cu), vc - f32(cv)
        c, s = f32(math.cos(lobe.angle)), f32(math.sin(lobe.angle))
        ru, rv = (du * c + dv * s) / f32(lobe.axis_u * radius), (dv * c - du * s) / f32(lobe.axis_v * radius)
        field = np.maximum(field, 1 - np.sqrt(ru * ru + rv * rv) / _wobble(np.arctan2(rv, ru), lobe.harmonics))
    field += 0.06 * fine[crop]
    in_brain = tissue_mask[crop] > 0.5
    mask = np.zeros((size, size), dtype=bool)
    mask[crop] = (field > 0) & in_brain
    if not mask.any():  # tiny tumor between pixel centres: keep its strongest pixel
        rr, cc = np.unravel_index(np.argmax(np.where(in_brain, field, -np.inf)), field.shape)
        mask[r0 + rr, c0 + cc] = True

    ramp = rng.uniform(0.15, 0.4)  # edge softness in tumor radii
    inner = _smoothstep(0.0, ramp, field)
    texture = 1 + 0.25 * _smooth_noise(rng, size, max(6, size // 6))[crop]
    lesion = f32(patient.contrast) * inner * texture
    if patient.style == "ring":
        core = _smoothstep(ramp + 0.1, ramp + 0.35, field)
        lesion -= f32(patient.contrast + patient.core_drop) * core * (0.8 + 0.2 * texture)
    elif patient.style == "mixed":
        lesion *= 0.6 + 0.6 * _smoothstep(-0.8, 0.8, _smooth_noise(rng, size, max(6, size // 8))[crop])
    if patient.edema:
        halo = _smoothstep(-patient.edema, -0.3 * patient.edema, field) * (1 - inner)
        lesion -= f32(patient.edema_drop) * halo * (0.7 + 0.3 * texture)
    if tumor:
        tissue[crop] += lesion
    else:
        mask[:] = False

    # Distractors: bright vessels and spots in the brain, drawn in pixels and blurred, some elongated.
    vessels = np.zeros_like(u)
    zoom = size / 128
    for _ in range(int(rng.integers(3, 9))):
        theta, r = rng.uniform(0, 2 * np.pi), BRAIN_RHO * math.sqrt(rng.uniform(0.05, 0.9))
        pu, pv = axis_u * r * math.cos(theta), axis_v * r * math.sin(theta)
        col, row = _to_pixel(pu, pv, pose, size)
        half_width = rng.uniform(0.4, 1.3) * zoom
        axes = (round(16 * half_width * rng.uniform(1.0, 4.0)), round(16 * half_width))
        center = (round(16 * col), round(16 * row))  # 4 fractional bits (shift=4)
        cv2.ellipse(vessels, center, axes, rng.uniform(0, 180), 0, 360, rng.uniform(0.2, 0.6), -1, cv2.LINE_8, 4)
    tissue += cv2.GaussianBlur(vessels, (0, 0), max(0.6, 0.8 * zoom))

    image = scalp * (head - skull) + f32(patient.skull) * (skull - brain)
    image += f32(patient.csf) * (brain - tissue_mask) + tissue * tissue_mask
    image = cv2.GaussianBlur(np.clip(image, 0, None), (0, 0), 0.7)

    # Acquisition: smooth multiplicative bias field, then Rician noise.
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    image *= np.exp(f32(gx) * x + f32(gy) * y + 0.08 * _smooth_noise(rng, size, 3))
    sigma = f32(rng.uniform(0.012, 0.035))
    noise = rng.standard_normal((2, size, size), dtype=np.float32) * sigma
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)

    return to_uint8(image), mask.astype(np.uint8) * 255


def _validate(params: dict[str, Any]) -> None:
    """Raise TypeError or ValueError, naming the argument and its value, for :func:`generate_dataset`
    arguments (``params``: all of them) that cannot produce a dataset."""
    empty = params.get("empty_fraction", 0.0)
    if isinstance(empty, bool) or not isinstance(empty, numbers.Real):
        raise TypeError(f"empty_fraction must be a number in [0, 1), got {empty!r}.")
    if not 0 <= empty < 1:
        raise ValueError(f"empty_fraction must be in [0, 1) (the share of each patient's slices without tumor), "
                         f"got {empty}.")
    for key, value in params.items():
        if key == "empty_fraction":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{key} must be a whole number, got {value!r}.")
    n, size, seed = params["n"], params["size"], params["seed"]
    slices_per_patient, num_folds = params["slices_per_patient"], params["num_folds"]
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of slices), got {n}.")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    if slices_per_patient < 1:
        raise ValueError(f"slices_per_patient must be >= 1, got {slices_per_patient}.")
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}.")
    if num_folds > n:
        raise ValueError(
            f"num_folds={num_folds} needs at least one patient per fold, but n={n} slices give at most {n} patients."
        )


def _effective_slices_per_patient(n: int, slices_per_patient: int, num_folds: int) -> int:
    """Slices per patient, lowered when ``n`` would otherwise give fewer patients than folds."""
    if math.ceil(n / slices_per_patient) < num_folds:
        return n // num_folds
    return slices_per_patient


def _assign_folds(labels: list[int], num_folds: int, seed: int) -> list[int]:
    """Folds 1..num_folds per patient: round-robin over patients shuffled within label (stratified)."""
    order = np.random.default_rng([seed, _FOLD_TAG]).permutation(len(labels))
    ranked = sorted(range(len(labels)), key=lambda p: (labels[p], order[p]))
    folds = [0] * len(labels)
    for rank, patient in enumerate(ranked):
        folds[patient] = rank % num_folds + 1
    return folds


def _tumor_slices(count: int, empty_fraction: float) -> int:
    """How many of a patient's ``count`` slices keep their tumor: all but ``empty_fraction`` of them, rounded."""
    return count - math.floor(empty_fraction * count + 0.5)


def _remove_stale_folders(out: Path) -> None:
    """Remove the ``.NAME.tmp-*`` folders beside ``out`` that a killed generation left: none of their folders changed
    for ``STALE_SECONDS`` (a generation in progress keeps adding slices)."""
    now = time.time()
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        with suppress(OSError):
            # A folder that vanished meanwhile (a concurrent generation renamed it into place) counts as fresh.
            touched = max((path.stat().st_mtime for path in (leftover, leftover / "images", leftover / "masks")
                           if path.exists()), default=now)
            if leftover.is_dir() and not leftover.is_symlink() and now - touched > STALE_SECONDS:
                shutil.rmtree(leftover)


def generate_dataset(
    out: str | Path,
    n: int = 400,
    size: int = 128,
    seed: int = 0,
    slices_per_patient: int = 4,
    num_folds: int = 5,
    empty_fraction: float = 0.0,
) -> Path:
    """Write ``n`` synthetic slices (``size`` x ``size``) to ``out`` atomically and return ``out``.

    The dataset is built in a temporary sibling directory and renamed into place, so ``out`` is
    never half-written. If ``out`` already holds a complete dataset by then (e.g. a concurrent
    process won), the new copy is discarded and the existing one kept. Slices are grouped into
    patients of ``slices_per_patient`` (fewer when needed to fill every fold); folds are
    assigned per patient, stratified by label. The last ``empty_fraction`` of each patient's slices
    (rounded half up) are rendered without the tumor (all-zero masks; metadata keeps the patient's label).
    :data:`MANIFEST` records ``empty_fraction`` only when it is not 0, so those datasets stay byte-identical
    to ones generated before the argument existed.
    """
    params = {"n": n, "size": size, "seed": seed, "slices_per_patient": slices_per_patient, "num_folds": num_folds,
              "empty_fraction": empty_fraction}
    _validate(params)
    if not empty_fraction:
        del params["empty_fraction"]
    out = Path(out)
    make_directory(out.parent)
    per_patient = _effective_slices_per_patient(n, slices_per_patient, num_folds)
    n_patients = math.ceil(n / per_patient)
    patients = [_make_patient(seed, p) for p in range(n_patients)]
    folds = _assign_folds([p.label for p in patients], num_folds, seed)

    _remove_stale_folders(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rows = []
        for i in range(n):
            p, s = divmod(i, per_patient)
            tumor = s < _tumor_slices(min(per_patient, n - p * per_patient), empty_fraction)
            image, mask = _render_slice(patients[p], seed, p, s, size, tumor)
            (tmp / "images" / f"{i + 1}.png").write_bytes(encode_png(image))
            (tmp / "masks" / f"{i + 1}.png").write_bytes(encode_png(mask))
            rows.append((i + 1, patients[p].label, folds[p], p + 1))
        (tmp / MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
        with open(tmp / "metadata.csv", "w", newline="") as fh:  # written last: marks completion
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("index", "label", "fold", "pid"))
            writer.writerows(rows)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if not out.exists():
                raise
            if not (out / "metadata.csv").is_file():
                raise OSError(f"{out} exists and is not a complete synthetic dataset; remove it and retry.") from exc
            logger.info("%s already exists (generated concurrently?); keeping it.", out)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """:func:`generate_dataset`'s keyword arguments: ``params`` and the defaults of those left out (TypeError
    for unknown ones), in the order stored in :data:`MANIFEST`."""
    bound = inspect.signature(generate_dataset).bind(None, **params)
    bound.apply_defaults()
    return {key: value for key, value in bound.arguments.items() if key != "out"}


def _describe(params: dict[str, object]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


def _check_manifest(out: Path, params: dict[str, Any]) -> None:
    """Raise :class:`DataError` unless ``out`` holds a synthetic dataset generated with ``params``.

    A manifest without ``empty_fraction`` (written before it existed, or for 0) means 0.
    """
    try:
        stored = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"{out} holds no readable {MANIFEST}, so it is not a synthetic dataset this generator made (it is left "
            "alone): choose another folder (out= / data.root=)."
        ) from error
    what_to_do = f"Choose another folder (out= / data.root=) or delete {out} to generate it again."
    if isinstance(stored, dict):
        stored.setdefault("empty_fraction", 0.0)
    if stored != params:
        raise DataError(
            f"{out} holds a synthetic dataset generated with {_describe(stored)}, "
            f"not the requested {_describe(params)}. {what_to_do}"
        )


def ensure_dataset(out: str | Path, **params: Any) -> Path:
    """Return ``out`` if it holds the dataset ``params`` generate, generating it there if ``out`` is empty.

    ``params`` are :func:`generate_dataset`'s keyword arguments (``n``, ``size``, ``seed``,
    ``slices_per_patient``, ``num_folds``, ``empty_fraction``), its defaults for those left out.

    Raises :class:`DataError` when ``out`` holds a dataset of other arguments, or files that are no
    complete synthetic dataset (no ``metadata.csv``/:data:`MANIFEST`), and TypeError or ValueError for
    bad or unknown arguments.
    """
    out = Path(out)
    params = _with_defaults(params)
    if not (out / "metadata.csv").is_file():
        if out.is_dir() and any(out.iterdir()):
            raise DataError(
                f"{out} is not empty but holds no complete synthetic dataset ({MANIFEST} and metadata.csv). "
                f"Choose another folder (out= / data.root=) or empty {out}."
            )
        _validate(params)  # before logging, so bad arguments log nothing
        logger.info("Generating synthetic dataset in %s (%s).", out, _describe(params))
        generate_dataset(out, **params)
    _check_manifest(out, params)  # also when a concurrent process with other arguments won the rename
    return out


def synthetic_app(cfg: DictConfig) -> Path:
    """The ``bts-synthetic`` app (``conf/synthetic.yaml``): generate the dataset in ``cfg.out`` (or find it
    there, generated with the same settings), print the folder and return it."""
    out = path_setting(cfg, "out", required=USAGE)
    params = {key: cfg[key] for key in CLI_KEYS if key != "out"}
    try:
        _validate(params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{error} Usage: {USAGE}") from None
    try:
        path = ensure_dataset(out, **params)
    except OSError as error:  # a full disk, a folder that is not writable
        raise output_error(out, error) from error
    print(path)
    return path


main = hydra_app("synthetic", synthetic_app)

if __name__ == "__main__":
    main()
