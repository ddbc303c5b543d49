"""The slice-level "tumor present" decision: a score of the probability map against a calibrated threshold.

A model trained on tumor slices marks something on nearly every tumor-free slice. A
:class:`SliceDecision` says "no tumor" (an all-zero mask) when a slice's score is at most its
``threshold``; the threshold is chosen by :func:`calibrate` on the empty slices of a split (the
validation split) so that at most ``target_false_alarm_rate`` of them are marked (``target_on="split"``), or so that
at most that share of new empty slices like them is expected to be (``target_on="new_slices"``, a stricter
threshold: :func:`false_alarm_bound`). Scores (:func:`slice_score`):

- ``component_fraction``: area of the largest 8-connected component of ``probability > pixel_threshold``
  as a fraction of the slice area (so resolution independent);
- ``max_probability``: the largest probability of the slice.

The decision is stored in training checkpoints (``bts_lightning.checkpoint.write_decision``) and
travels in the model contract of every exported file (``ModelContract.decision``).
``bts_lightning/space_app.py`` repeats :func:`slice_score` in NumPy (parity-tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

RULES = ("component_fraction", "max_probability")
# What target_false_alarm_rate bounds: the calibration split's own rate, or the rate expected on new empty slices.
TARGETS_ON = ("split", "new_slices")
CALIBRATION_KEYS = ("split", "dataset", "n_empty", "n_tumor", "false_alarm_rate", "sensitivity")


def _is_fraction(value: Any, closed_top: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return 0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0


def check_rule(rule: Any, key: str = "rule") -> str:
    """``rule`` when it is one of :data:`RULES`; ``ValueError`` naming ``key`` otherwise."""
    if rule not in RULES:
        raise ValueError(f"{key}={rule!r} must be one of {', '.join(RULES)}")
    return str(rule)


def check_target(target: Any, key: str = "target_false_alarm_rate") -> float:
    """``target`` as a float in [0, 1); ``ValueError`` naming ``key`` otherwise."""
    if not _is_fraction(target, closed_top=False):
        raise ValueError(f"{key}={target!r} must be a number in [0, 1) (the largest fraction of empty slices "
                         "allowed a tumor, e.g. 0.05)")
    return float(target)


def check_target_on(target_on: Any, target: float, key: str = "target_on") -> str:
    """``target_on`` when it is one of :data:`TARGETS_ON` and can be met for ``target``; ``ValueError`` naming ``key``
    otherwise (no threshold expects a zero false-alarm rate on new slices)."""
    if target_on not in TARGETS_ON:
        raise ValueError(f"{key}={target_on!r} must be one of {', '.join(TARGETS_ON)} (split: at most the target on "
                         "the calibration split's empty slices; new_slices: at most the target expected on new ones)")
    if target_on == "new_slices" and target <= 0:
        raise ValueError(f"{key}=new_slices cannot expect target_false_alarm_rate={target:g} on new empty slices (a "
                         "threshold chosen on n of them lets through 1 / (n + 1) of new ones at best): give a "
                         "positive target, or target_on=split")
    return str(target_on)


def empty_slices_needed(target: float, target_on: str = "split") -> int:
    """The fewest empty calibration slices on which :func:`calibrate` meets ``target`` ``target_on``: 1 on the split;
    for new slices ``ceil(1 / target) - 1`` (19 at 5 %), as the best it can expect from n slices is 1 / (n + 1)."""
    if check_target_on(target_on, check_target(target)) == "split":
        return 1
    return math.ceil(1 / target - 1e-9) - 1


@dataclass(frozen=True)
class SliceDecision:
    """Tumor present on a slice iff ``slice_score(probability, rule, pixel_threshold) > threshold``.

    ``calibration``: where the threshold was chosen: ``split``, ``dataset``, ``n_empty``, ``n_tumor``,
    and the ``false_alarm_rate`` / ``sensitivity`` the decision reached there (and ``slices_sha256``, the slices'
    files, when known). ``target_on``: what
    ``target_false_alarm_rate`` bounded there (:data:`TARGETS_ON`; decisions stored without it: ``split``).
    """

    rule: str
    threshold: float
    pixel_threshold: float
    target_false_alarm_rate: float
    calibration: dict[str, Any] = field(default_factory=dict)
    target_on: str = "split"

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if not _is_fraction(self.threshold):
            raise ValueError(f"threshold={self.threshold!r} must be a number in [0, 1]")
        if not _is_fraction(self.pixel_threshold, closed_top=False):
            raise ValueError(f"pixel_threshold={self.pixel_threshold!r} must be a number in [0, 1)")
        check_target_on(self.target_on, check_target(self.target_false_alarm_rate))
        if not isinstance(self.calibration, Mapping):
            raise ValueError(f"calibration={self.calibration!r} must be a mapping")  # noqa: TRY004 (one error type)
        for key in ("n_empty", "n_tumor"):
            value = self.calibration.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"calibration.{key}={value!r} must be a whole number >= 0")
        for key in ("false_alarm_rate", "sensitivity"):
            value = self.calibration.get(key)
            if value is not None and not _is_fraction(value):
                raise ValueError(f"calibration.{key}={value!r} must be a number in [0, 1] or null")
        n_empty = self.calibration.get("n_empty")
        if n_empty and n_empty < empty_slices_needed(self.target_false_alarm_rate, self.target_on):
            raise ValueError(f"calibration.n_empty={n_empty} is too few for target_on={self.target_on} at "
                             f"target_false_alarm_rate={self.target_false_alarm_rate:g}")
        object.__setattr__(self, "calibration", dict(self.calibration))

    def score(self, probability: np.ndarray) -> float:
        """:func:`slice_score` of one (H, W) probability map under this decision's rule."""
        return slice_score(probability, self.rule, self.pixel_threshold)

    def tumor_present(self, score: float) -> bool:
        """Whether a slice of ``score`` keeps its mask."""
        return score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SliceDecision:
        """Parse :meth:`to_dict` output (unknown keys ignored); ``ValueError`` naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"decision={data!r} must be a mapping")  # noqa: TRY004 (one error type)
        missing = [key for key in ("rule", "threshold", "pixel_threshold", "target_false_alarm_rate") if key not in data]
        if missing:
            raise ValueError(f"decision lacks {', '.join(missing)}")
        return cls(rule=data["rule"], threshold=data["threshold"], pixel_threshold=data["pixel_threshold"],
                   target_false_alarm_rate=data["target_false_alarm_rate"],
                   calibration=data.get("calibration") or {}, target_on=data.get("target_on", "split"))

    def describe(self) -> str:
        """One line, e.g. ``component_fraction > 0.0123 (pixel threshold 0.5; 5.0 % false alarms on val of lgg)``."""
        cal = self.calibration
        reached = cal.get("false_alarm_rate")
        where = f" on {cal.get('split')} of {cal.get('dataset')}" if cal.get("split") else ""
        rate = f"{100 * reached:.1f} % false alarms{where}" if reached is not None else "uncalibrated"
        return f"{self.rule} > {self.threshold:.6g} (pixel threshold {self.pixel_threshold:g}; {rate})"


def slice_score(probability: np.ndarray, rule: str, pixel_threshold: float = 0.5) -> float:
    """The slice's score under ``rule`` (see the module doc) for one (H, W) probability map; 0 for an empty map."""
    array = np.asarray(probability, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected one (H, W) probability map, got shape {array.shape}")
    if array.size == 0:
        return 0.0
    if check_rule(rule) == "max_probability":
        return float(array.max())
    binary = (array > pixel_threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    largest = int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0
    return largest / array.size


def calibrate(scores_empty: Sequence[float], target: float, target_on: str = "split") -> float:
    """The smallest threshold with at most ``target`` of ``scores_empty`` strictly above it (``target_on="split"``),
    or with at most ``target`` of new empty slices like them expected above it (``"new_slices"``).

    With the scores sorted descending, the k-th (0-based): ``k = floor(target * n)`` on the split; on new slices the
    largest k with ``(k + 1) / (n + 1) <= target`` (:func:`false_alarm_bound`). Raises ``ValueError`` when there are
    no empty-slice scores, fewer than :func:`empty_slices_needed`, or ``target`` is outside [0, 1).
    """
    target = check_target(target)
    ordered = sorted((float(score) for score in scores_empty), reverse=True)
    if not ordered:
        raise ValueError("calibration needs at least one empty slice (truth without tumor)")
    return ordered[_slices_above(len(ordered), target, target_on)]


def _slices_above(n_empty: int, target: float, target_on: str = "split") -> int:
    """How many of ``n_empty`` calibration scores :func:`calibrate` puts above its threshold (fewer with ties)."""
    if check_target_on(target_on, target) == "split":
        return math.floor(target * n_empty + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996
    needed = empty_slices_needed(target, target_on)
    if n_empty < needed:
        raise ValueError(f"{n_empty} empty slices are too few to expect at most {100 * target:g} % false alarms on new "
                         f"ones (target_on=new_slices needs at least {needed}): "
                         "calibrate on a split with more empty slices, raise target_false_alarm_rate, or target_on=split")
    return math.floor(target * (n_empty + 1) + 1e-9) - 1


def false_alarm_bound(n_empty: int, target: float, confidence: float = 0.95,
                      target_on: str = "split") -> tuple[float, float]:
    """What :func:`calibrate`'s threshold, chosen on ``n_empty`` empty slices for ``target``, lets through on new
    empty slices from the same source: (expected false-alarm rate, upper bound at ``confidence``).

    The rate the calibration split reports is the threshold's own choice; on new slices it is a random quantity.
    With ``k`` of them above the threshold by construction (``floor(target * n_empty)`` for ``target_on="split"``;
    for ``"new_slices"`` the largest k whose mean below is at most ``target``), the share of new empty slices
    scoring above it follows Beta(k + 1, n_empty - k) over the draw of the calibration slices when all are
    exchangeable (split conformal prediction; at most that with tied scores): mean ``(k + 1) / (n_empty + 1)``,
    and the bound is its ``confidence`` quantile. 19 empty slices at a 5 % target: 5 % expected, up to 14.6 %.
    Raises ``ValueError`` for ``n_empty < 1`` or a ``target`` / ``confidence`` outside [0, 1).
    """
    from scipy.stats import beta

    target = check_target(target)
    if isinstance(n_empty, bool) or not isinstance(n_empty, int) or n_empty < 1:
        raise ValueError(f"n_empty={n_empty!r} must be a whole number >= 1")
    if not _is_fraction(confidence, closed_top=False):
        raise ValueError(f"confidence={confidence!r} must be a number in [0, 1)")
    k = _slices_above(n_empty, target, target_on)
    return (k + 1) / (n_empty + 1), float(beta.ppf(confidence, k + 1, n_empty - k))


def false_alarm_surprise(false_alarms: int, n_scored: int, n_empty: int, target: float,
                         target_on: str = "split") -> float:
    """The chance of at least ``false_alarms`` among ``n_scored`` new empty slices for :func:`calibrate`'s threshold
    chosen on ``n_empty`` empty slices for ``target``, were the new slices like the calibration ones (all
    exchangeable): their count then follows BetaBinomial(n_scored, k + 1, n_empty - k), ``k`` as in
    :func:`false_alarm_bound`. A small value (below 0.05) says the new empty slices are unlike the calibration ones.
    """
    from scipy.stats import betabinom

    k = _slices_above(n_empty, check_target(target), target_on)
    return float(betabinom(n_scored, k + 1, n_empty - k).sf(false_alarms - 1))


def on_new_slices(n_empty: int, target: float, target_on: str = "split") -> dict[str, float]:
    """:func:`false_alarm_bound` as a record: ``expected_false_alarm_rate``, ``false_alarm_rate_upper_95``."""
    expected, upper = false_alarm_bound(n_empty, target, target_on=target_on)
    return {"expected_false_alarm_rate": expected, "false_alarm_rate_upper_95": upper}


def on_new_slices_line(record: Mapping[str, float]) -> str:
    """An :func:`on_new_slices` record in words, e.g. ``on new empty slices like them: 5.0 % false alarms expected,
    at most 14.6 % with 95 % confidence``."""
    return (f"on new empty slices like them: {100 * record['expected_false_alarm_rate']:.1f} % false alarms "
            f"expected, at most {100 * record['false_alarm_rate_upper_95']:.1f} % with 95 % confidence")


def chance_warning(what: str, split: str, sensitivity: float | None, false_alarm_rate: float | None) -> str | None:
    """A warning when ``what`` (a calibrated threshold) lets through no larger share of the tumor slices of
    ``split`` (``sensitivity``) than of its empty ones (``false_alarm_rate``): scores that do not tell them apart do
    that by chance, so the model behind them did not learn to find the tumors. ``None`` otherwise, or when either
    rate is unknown."""
    if sensitivity is None or false_alarm_rate is None or sensitivity > false_alarm_rate:
        return None
    return (f"{what} lets through {sensitivity:.4f} of the tumor slices of the {split} split and {false_alarm_rate:.4f} "
            "of its empty slices: no better than chance, so its scores do not tell tumor slices from empty ones. The "
            "model behind them did not learn to find the tumors (a run whose best epoch is 0, or whose val/dice_tumor "
            "stays near 0, never did): train it again (another seed, a lower learning rate or data.empty_fraction) "
            "before using this decision.")


def rate_above(scores: Sequence[float], threshold: float) -> float | None:
    """Fraction of ``scores`` strictly above ``threshold``; ``None`` for no scores."""
    values = np.asarray(scores, dtype=np.float64)
    return float(np.mean(values > threshold)) if values.size else None


def calibrated_decision(
    scores_empty: Sequence[float],
    scores_tumor: Sequence[float],
    target: float,
    rule: str,
    pixel_threshold: float,
    split: str,
    dataset: str,
    target_on: str = "split",
    tta: bool = False,
    slices_sha256: str | None = None,
) -> SliceDecision:
    """The :class:`SliceDecision` calibrated by :func:`calibrate` on ``scores_empty``, recording the false-alarm
    rate it reaches there, its sensitivity on ``scores_tumor`` (``None`` without tumor slices) and whether the scores
    came from flip-TTA probabilities (``tta``), which the decision then needs to hold, and ``slices_sha256``: which
    slices' files (:meth:`~bts_lightning.data.dataset.SliceDataset.files_digest`), so ``evaluate`` knows them again.

    The rates count what ``evaluate`` counts, a slice kept by the decision whose mask has a tumor pixel: under
    ``max_probability`` that is a score above both the threshold and ``pixel_threshold``."""
    threshold = calibrate(scores_empty, target, target_on)
    flagged = max(threshold, float(pixel_threshold)) if check_rule(rule) == "max_probability" else threshold
    calibration = {"split": split, "dataset": dataset, "n_empty": len(scores_empty), "n_tumor": len(scores_tumor),
                   "false_alarm_rate": rate_above(scores_empty, flagged),
                   "sensitivity": rate_above(scores_tumor, flagged), "tta": bool(tta)}
    if slices_sha256 is not None:
        calibration["slices_sha256"] = slices_sha256
    return SliceDecision(rule, threshold, float(pixel_threshold), float(target), calibration, target_on)
