"""The slice-level "tumor present" decision: its maths by hand, calibration into checkpoints, and every app applying it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bts_lightning.calibrate import calibrate, reached_line, warn_if_chance
from bts_lightning.checkpoint import DECISION_KEY, CheckpointError, load_module, write_decision
from bts_lightning.decision import (
    SliceDecision,
    calibrated_decision,
    chance_warning,
    empty_slices_needed,
    false_alarm_bound,
    false_alarm_surprise,
    slice_score,
)
from bts_lightning.decision import calibrate as calibrate_threshold
from bts_lightning.errors import ConfigError
from bts_lightning.evaluate import decision_note, evaluate, false_alarm_check, false_alarm_check_line
from bts_lightning.inference import InferenceOptions, ModelContract, load_predictor, with_model_decision
from bts_lightning.predict import predict, predict_files
from bts_lightning.runtime import run_app
from tests import fixtures_checkpoint
from tests.fixtures_checkpoint import compose_app

tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below


def decision(threshold: float = 0.05, rule: str = "component_fraction", **calibration) -> SliceDecision:
    return SliceDecision(rule, threshold, 0.5, 0.05, {"split": "val", "dataset": "d", **calibration})


def bright(images: torch.Tensor) -> torch.Tensor:
    """A stand-in model: tumor probability 1 where a slice is brighter than its own mean, else 0."""
    return (images[:, 0] > images[:, 0].mean(dim=(-2, -1), keepdim=True)).float()


# ---------------------------------------------------------------- the maths, by hand


def test_slice_scores_by_hand():
    probability = np.zeros((10, 10), np.float32)
    probability[0:2, 0:3] = 0.9  # 6 px
    probability[2, 3] = 0.8  # touches the block diagonally: 8-connected, 7 px in all
    probability[7:9, 7:9] = 0.6  # 4 px
    probability[5, 5] = 0.5  # not above the pixel threshold
    assert slice_score(probability, "component_fraction", 0.5) == pytest.approx(7 / 100)
    assert slice_score(probability, "component_fraction", 0.85) == pytest.approx(6 / 100)
    assert slice_score(probability, "max_probability") == pytest.approx(0.9)
    assert slice_score(np.zeros((4, 4)), "component_fraction") == 0.0
    # Resolution independent: the same picture at twice the size scores the same.
    assert slice_score(np.kron(probability, np.ones((2, 2))), "component_fraction", 0.5) == pytest.approx(7 / 100)
    with pytest.raises(ValueError, match="rule='area'"):
        slice_score(probability, "area")


def test_calibrate_keeps_at_most_the_target_fraction_of_empty_slices_above():
    scores = [0.9, 0.1, 0.5, 0.3, 0.0]
    assert calibrate_threshold(scores, 0.2) == 0.5  # k = 1: only 0.9 stays above
    assert calibrate_threshold(scores, 0.0) == 0.9  # nothing above
    assert calibrate_threshold(scores, 0.39) == 0.5  # floor(1.95) = 1
    assert calibrate_threshold(scores, 0.4) == 0.3  # k = 2: 0.9 and 0.5 above
    assert calibrate_threshold([0.5, 0.5, 0.5, 0.1], 0.25) == 0.5  # ties: none above, never more than the target
    many = [i / 100 for i in range(100)]
    threshold = calibrate_threshold(many, 0.29)  # 0.29 * 100 is 28.999999999999996 in floats
    assert sum(score > threshold for score in many) == 29
    with pytest.raises(ValueError, match="at least one empty slice"):
        calibrate_threshold([], 0.1)
    with pytest.raises(ValueError, match="target_false_alarm_rate=1.0"):
        calibrate_threshold(scores, 1.0)


def test_calibrate_for_new_slices_keeps_the_expected_rate_within_the_target():
    scores = [i / 43 for i in range(43)]  # 43 empty slices, as fold 5 of the LGG sample has
    on_split, on_new = calibrate_threshold(scores, 0.05), calibrate_threshold(scores, 0.05, "new_slices")
    assert sum(score > on_split for score in scores) == 2  # floor(0.05 * 43): 4.7 % here, (2 + 1) / 44 = 6.8 % expected
    assert sum(score > on_new for score in scores) == 1  # the largest k with (k + 1) / 44 <= 0.05
    assert false_alarm_bound(43, 0.05)[0] == pytest.approx(3 / 44)
    assert false_alarm_bound(43, 0.05, target_on="new_slices")[0] == pytest.approx(2 / 44)
    nineteen = [i / 19 for i in range(19)]
    assert calibrate_threshold(nineteen, 0.05, "new_slices") == max(nineteen)  # k = 0: 1 / 20 expected
    assert [empty_slices_needed(t, "new_slices") for t in (0.05, 0.1, 0.25, 0.3)] == [19, 9, 3, 3]
    assert empty_slices_needed(0.0) == 1
    with pytest.raises(ValueError, match="18 empty slices are too few .* needs at least 19"):
        calibrate_threshold(nineteen[1:], 0.05, "new_slices")
    with pytest.raises(ValueError, match="target_on=new_slices cannot expect target_false_alarm_rate=0"):
        calibrate_threshold(scores, 0.0, "new_slices")
    with pytest.raises(ValueError, match="target_on='test' must be one of split, new_slices"):
        calibrate_threshold(scores, 0.05, "test")


def test_calibrated_decision_records_what_it_reaches():
    made = calibrated_decision([0.0, 0.0, 0.02, 0.3], [0.01, 0.2, 0.5], 0.25, "component_fraction", 0.5, "val", "lgg")
    assert made.threshold == 0.02
    assert made.calibration == {"split": "val", "dataset": "lgg", "n_empty": 4, "n_tumor": 3,
                                "false_alarm_rate": 0.25, "sensitivity": pytest.approx(2 / 3), "tta": False}
    assert SliceDecision.from_dict(json.loads(json.dumps(made.to_dict()))) == made
    assert "component_fraction > 0.02" in made.describe() and "25.0 % false alarms on val of lgg" in made.describe()
    assert calibrated_decision([0.1], [], 0.0, "max_probability", 0.5, "val", "x").calibration["sensitivity"] is None
    # A max_probability threshold below the pixel threshold: slices between the two have empty masks, which evaluate
    # counts as neither a false alarm nor a detection.
    low = calibrated_decision([0.1, 0.3, 0.45, 0.6], [0.4, 0.48, 0.9], 0.5, "max_probability", 0.5, "val", "x")
    assert low.threshold == 0.3 and low.calibration["false_alarm_rate"] == 0.25
    assert low.calibration["sensitivity"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n_empty", [19, 70])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("target_on", ["split", "new_slices"])
def test_false_alarm_bound_holds_for_thresholds_calibrated_on_that_many_slices(n_empty, tied, target_on):
    # 4000 calibration splits of empty-slice scores; each threshold's false-alarm rate on new slices from the same
    # source is exact: uniform scores pass a threshold t with probability 1 - t; tied ones (90 % exactly 0, as
    # component_fraction gives slices with no pixel above the pixel threshold) with probability 0.1 * (1 - t).
    rng = np.random.default_rng(0)
    scores = rng.random((4000, n_empty))
    if tied:
        scores[rng.random(scores.shape) < 0.9] = 0.0
    thresholds = np.array([calibrate_threshold(split, 0.05, target_on) for split in scores])
    rates = (0.1 if tied else 1.0) * (1.0 - thresholds)
    expected, upper = false_alarm_bound(n_empty, 0.05, target_on=target_on)
    assert np.mean(rates > upper) <= 0.05 + 0.01  # the bound holds at its confidence (3 standard errors)
    if not tied:  # exact for continuous scores: mean (k + 1) / (n + 1), 5 % of the splits above the bound
        assert np.mean(rates) == pytest.approx(expected, abs=0.003)
        assert np.mean(rates > upper) == pytest.approx(0.05, abs=0.01)
    if target_on == "new_slices":  # what it promises: at most the target on new slices, on average
        assert np.mean(rates) <= 0.05 + 0.003
    elif n_empty == 70:  # what the split's own rate does not: 3 of 70 (4.3 %) there, 4 / 71 (5.6 %) on new slices
        assert np.mean(rates) > 0.05 + 0.003


def test_false_alarm_bound_by_hand_and_in_the_reached_line():
    assert false_alarm_bound(19, 0.05) == (pytest.approx(1 / 20), pytest.approx(1 - 0.05 ** (1 / 19)))  # k = 0
    assert false_alarm_bound(70, 0.05)[0] == pytest.approx(4 / 71)  # k = 3
    for bad in ({"n_empty": 0}, {"n_empty": 10, "target": 1.0}, {"n_empty": 10, "confidence": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad.keys() - {"n_empty"}), "n_empty")):
            false_alarm_bound(**{"target": 0.05, **bad})
    made = calibrated_decision([0.0] * 18 + [0.3], [0.5], 0.05, "component_fraction", 0.5, "val", "lgg")
    assert "at most 14.6 % with 95 % confidence" in reached_line(made)


def test_a_decision_no_better_than_chance_is_warned_about(caplog):
    assert chance_warning("T", "val", 0.5, 0.05) is None and chance_warning("T", "val", None, 0.05) is None
    assert chance_warning("T", "val", 0.04, 0.05).startswith("T lets through 0.0400 of the tumor slices of the val "
                                                              "split and 0.0500 of its empty slices: no better than chance")
    assert chance_warning("T", "val", 0.0, 0.0) is not None  # a zero target that passes no tumor slice either
    # the threshold that passes none of 19 empty slices (target 5 %) passes no tumor slice of the first, one of the second
    useless = calibrated_decision([0.0] * 18 + [0.3], [0.0, 0.1], 0.05, "component_fraction", 0.5, "val", "lgg")
    useful = calibrated_decision([0.0] * 18 + [0.3], [0.5, 0.1], 0.05, "component_fraction", 0.5, "val", "lgg")
    with caplog.at_level("WARNING", logger="bts_lightning.calibrate"):
        warn_if_chance(useful)
        assert not caplog.records
        warn_if_chance(useless)
    assert [record.getMessage()[:106] for record in caplog.records] == [
        "The slice decision lets through 0.0000 of the tumor slices of the val split and 0.0000 of its empty slices"]


def test_false_alarm_surprise_is_the_beta_binomial_tail_and_evaluate_flags_unlike_slices():
    from scipy import integrate, stats

    # By its definition, independently of scipy's beta-binomial: the binomial tail at a rate r, averaged over the
    # Beta(k + 1, n - k) law of r for a threshold calibrated on n = 19 empty slices at 5 % (k = 0).
    by_definition = integrate.quad(lambda r: stats.beta.pdf(r, 1, 19) * stats.binom.sf(5, 43, r), 0, 1)[0]
    assert false_alarm_surprise(6, 43, 19, 0.05) == pytest.approx(by_definition, rel=1e-6)
    assert false_alarm_surprise(0, 43, 19, 0.05) == pytest.approx(1.0)

    made = decision(dataset="lgg", n_empty=43)  # calibrated on 43 empty slices of the val split of lgg
    check = false_alarm_check(made, {"n": 61, "false_alarms": 24}, "test", "lgg")
    assert check["unlike_calibration"] and check["p_value"] < 1e-3
    assert "unlike the calibration ones" in false_alarm_check_line(check)
    usual = false_alarm_check(made, {"n": 61, "false_alarms": 3}, "test", "other")  # another dataset: held out too
    assert not usual["unlike_calibration"] and "unlike" not in false_alarm_check_line(usual)
    for no_check in (false_alarm_check(made, {"n": 61, "false_alarms": 24}, "val", "lgg"),  # calibrated on them
                     false_alarm_check(made, {"n": 61, "false_alarms": 24}, "all", "lgg"),  # includes them
                     false_alarm_check(decision(dataset="lgg", n_empty=43, split="all"),  # chosen on all
                                       {"n": 61, "false_alarms": 24}, "test", "lgg"),
                     false_alarm_check(made, {"n": 0, "false_alarms": 0}, "test", "lgg"),  # no empty slice
                     false_alarm_check(decision(), {"n": 61, "false_alarms": 24}, "test", "lgg"),  # no count
                     false_alarm_check(None, {"n": 61, "false_alarms": 24}, "test", "lgg")):
        assert no_check is None


def test_decisions_stored_without_target_on_read_as_split_and_new_slices_round_trips():
    old = {key: value for key, value in decision().to_dict().items() if key != "target_on"}
    assert SliceDecision.from_dict(old).target_on == "split"
    made = calibrated_decision([i / 20 for i in range(20)], [0.9], 0.05, "max_probability", 0.5, "val", "d",
                               "new_slices")
    assert made.target_on == "new_slices" and made.calibration["false_alarm_rate"] == 0.0  # k = 0 of 20
    assert SliceDecision.from_dict(json.loads(json.dumps(made.to_dict()))) == made
    assert "target 0.05 expected on new slices" in reached_line(made) and "at most 13.9 %" in reached_line(made)
    check = false_alarm_check(made, {"n": 61, "false_alarms": 3}, "test", "d")
    assert check["expected_false_alarm_rate"] == pytest.approx(1 / 21)
    assert check["p_value"] == pytest.approx(false_alarm_surprise(3, 61, 20, 0.05, "new_slices"))
    assert check["p_value"] != pytest.approx(false_alarm_surprise(3, 61, 20, 0.05))  # k = 1 there


@pytest.mark.parametrize(("change", "field"), [
    ({"target_on": "test"}, "target_on='test' must be one of"),
    ({"target_on": "new_slices", "calibration": {"n_empty": 10}}, "calibration.n_empty=10 is too few"),
])
def test_invalid_target_on_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        SliceDecision.from_dict({**decision().to_dict(), **change})


@pytest.mark.parametrize(("change", "field"), [
    ({"rule": "area"}, "rule"), ({"threshold": 1.5}, "threshold"), ({"pixel_threshold": 1.0}, "pixel_threshold"),
    ({"target_false_alarm_rate": -0.1}, "target_false_alarm_rate"),
    ({"calibration": {"n_empty": -1}}, "calibration.n_empty"),
    ({"calibration": {"sensitivity": 2}}, "calibration.sensitivity"),
])
def test_invalid_decision_records_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        SliceDecision.from_dict({**decision().to_dict(), **change})
    with pytest.raises(ValueError, match="lacks threshold"):
        SliceDecision.from_dict({"rule": "max_probability", "pixel_threshold": 0.5, "target_false_alarm_rate": 0})


def test_a_checkpoint_with_an_invalid_stored_decision_is_named(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(tiny_checkpoint.path, ckpt)
    write_decision(ckpt, {**decision().to_dict(), "rule": "area"})
    with pytest.raises(CheckpointError, match=r"best\.ckpt: its stored slice decision is invalid \(.*rule.*\); "
                                              r"calibrate it again"):
        load_predictor(ckpt, "cpu")


def test_inference_options_empty_the_mask_of_a_rejected_slice():
    probability = np.zeros((10, 10), np.float32)
    probability[0:2, 0:2] = 0.9  # 4 % of the slice
    kept = InferenceOptions(decision=decision(0.03)).mask(probability)
    assert kept.sum() == 4
    assert not InferenceOptions(decision=decision(0.04)).mask(probability).any()  # score 0.04 <= 0.04: rejected
    assert not InferenceOptions(decision=decision(0.9, "max_probability")).mask(probability).any()
    assert InferenceOptions().to_dict()["decision"] is None
    assert InferenceOptions(decision=decision(0.03)).to_dict()["decision"]["threshold"] == 0.03


def test_contract_carries_the_decision_and_options_take_it(caplog):
    contract = ModelContract(image_size=64, decision=decision().to_dict())
    assert ModelContract.from_json(contract.to_json()) == contract
    assert ModelContract.from_json(ModelContract(image_size=64).to_json()).decision is None  # older contracts
    with pytest.raises(ValueError, match="threshold"):
        ModelContract(decision={**decision().to_dict(), "threshold": "high"})
    options = InferenceOptions()
    assert with_model_decision(options, {}, contract).decision == decision()  # slice_decision: auto by default
    assert with_model_decision(options, {"slice_decision": False}, contract).decision is None  # YAML reads off as false
    assert with_model_decision(options, {"slice_decision": "off"}, contract).decision is None
    assert with_model_decision(options, {}, ModelContract()).decision is None
    with caplog.at_level(logging.WARNING):
        with_model_decision(InferenceOptions(threshold=0.3), {"threshold": 0.3}, contract)
    assert "calibrated at threshold=0.5 but threshold=0.3" in caplog.text
    flipped = ModelContract(image_size=64, decision={**decision().to_dict(), "pixel_threshold": 0.3,
                                                     "calibration": {"tta": True}})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with_model_decision(InferenceOptions(threshold=0.3, tta=True), {"threshold": 0.3, "tta": True}, flipped)
        with_model_decision(InferenceOptions(), {"tta": False}, contract)  # stored before tta was recorded: not checked
    assert not caplog.text
    with caplog.at_level(logging.WARNING):
        with_model_decision(InferenceOptions(threshold=0.3), {"threshold": 0.3, "tta": False}, flipped)
    assert ("calibrated with tta=true but tta=false: its false-alarm rate no longer holds; pass tta=true"
            in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # left unset (null), both follow the decision, which then holds
        followed = with_model_decision(InferenceOptions.from_config({"threshold": None, "tta": None}), {}, flipped)
    assert (followed.threshold, followed.tta) == (0.3, True) and "WARNING" not in caplog.text
    assert "threshold=0.3 and tta=true as the slice decision was calibrated" in caplog.text
    assert (with_model_decision(InferenceOptions(), {"threshold": None}, contract).threshold,  # tta not recorded
            with_model_decision(InferenceOptions(), {"threshold": None}, contract).tta) == (0.5, False)
    unset = InferenceOptions.from_config({"threshold": None, "tta": None})  # no decision: 0.5 and no flips
    assert (with_model_decision(unset, {}, ModelContract()).threshold, unset.tta) == (0.5, False)
    with pytest.raises(ConfigError, match="slice_decision=maybe"):
        InferenceOptions.from_config({"slice_decision": "maybe"})


def test_decision_note_says_where_it_was_chosen():
    assert "optimistic" in decision_note(decision(), "val", "d")
    assert "held out" in decision_note(decision(), "test", "d")
    on_all = decision(split="all")  # every split's slices chose it, the test split's too
    assert "optimistic" in decision_note(on_all, "test", "d") and "held out" not in decision_note(on_all, "test", "d")
    assert "not this dataset" in decision_note(decision(), "test", "other")
    assert decision_note(None, "val", "d") is None


# ---------------------------------------------------------------- calibration into a checkpoint and the apps


def with_empty_slices(source: Path, root: Path) -> Path:
    """A copy of the synthetic set ``source`` whose even-numbered slices have empty masks (same folds)."""
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("synthetic.json"))
    for mask in (root / "masks").glob("*.png"):
        if int(mask.stem) % 2 == 0:
            cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)))
    return root


@pytest.fixture
def calibration_setup(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint and the overrides of a dataset with empty slices in every split."""
    source = next((tiny_checkpoint.data_dir / "synthetic").iterdir())
    root = with_empty_slices(source, tmp_path / "with_empty")
    ckpt = tmp_path / "model" / "best.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint.path, ckpt)
    data = [f"data.root={root}", "data.name=with_empty", "data.num_workers=0", "data.val_fold=1", "data.test_fold=2",
            "device=cpu"]
    return ckpt, data


def run_calibrate(ckpt: Path, data: list[str], out: Path, *extra: str) -> dict:
    overrides = [f"ckpt_path={ckpt}", *data, *extra]
    return calibrate(compose_app("calibrate", overrides, out), overrides)


def test_calibrate_app_stores_the_decision_and_evaluate_applies_it(calibration_setup, tmp_path, capsys):
    ckpt, data = calibration_setup
    before = ckpt.stat().st_ino
    result = run_calibrate(ckpt, data, tmp_path / "cal", "target_false_alarm_rate=0.25")
    stored = result["decision"]
    written = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert written["decision"] == stored
    expected, upper = false_alarm_bound(stored["calibration"]["n_empty"], 0.25)
    assert written["on_new_empty_slices"] == {"expected_false_alarm_rate": pytest.approx(expected),
                                              "false_alarm_rate_upper_95": pytest.approx(upper)}
    assert "false-alarm rate" in capsys.readouterr().out
    # Written by replacing the file (a new inode), with nothing left beside it; the module still loads.
    assert ckpt.stat().st_ino != before and sorted(p.name for p in ckpt.parent.iterdir()) == ["best.ckpt"]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)[DECISION_KEY] == stored
    load_module(ckpt)
    assert load_predictor(ckpt, "cpu").contract.decision == stored
    cal = stored["calibration"]
    assert (cal["split"], cal["dataset"], cal["n_empty"] + cal["n_tumor"]) == ("val", "with_empty", 8)
    assert cal["n_empty"] == 4 and cal["false_alarm_rate"] <= 0.25

    def evaluated(*extra: str, split: str = "val") -> dict:
        overrides = [f"ckpt_path={ckpt}", *data, f"split={split}", "worst_k=0", *extra]
        return evaluate(compose_app("evaluate", overrides, tmp_path / f"eval{len(extra)}{split}"), overrides)

    applied, off = evaluated(), evaluated("slice_decision=off")
    assert applied["inference"]["decision"] == stored and "optimistic" in applied["decision_note"]
    assert applied["false_alarm_check"] is None  # calibrated on these slices: nothing to check against
    held_out = evaluated(split="test")
    check, empty = held_out["false_alarm_check"], held_out["empty_slices"]
    assert check["calibration"] == "4 empty slices of the val split of with_empty"
    assert check["p_value"] == pytest.approx(false_alarm_surprise(empty["false_alarms"], empty["n"], 4, 0.25))
    assert "Slice decision calibrated on 4 empty slices of the val split of with_empty, so on new" in \
        capsys.readouterr().out
    assert off["inference"]["decision"] is None and off["decision_note"] is None
    # The false alarms on the calibration split are what the calibration says, fewer than without it (1 vs 4 here).
    assert applied["empty_slices"]["false_alarms"] == round(cal["false_alarm_rate"] * cal["n_empty"])
    assert applied["empty_slices"]["false_alarms"] < off["empty_slices"]["false_alarms"]
    assert applied["tumor_slices"]["detected"] == round(cal["sensitivity"] * cal["n_tumor"])


def test_a_decision_calibrated_on_other_data_is_known_there_again(calibration_setup, tmp_path):
    """Calibrated on slices the checkpoint's split record does not know (other names): evaluate of that split, or
    of every slice, says the false-alarm rate was chosen there (optimistic, no false_alarm_check); its test split is
    held out."""
    ckpt, data = calibration_setup
    source = Path(next(value for value in data if value.startswith("data.root=")).split("=", 1)[1])
    renamed = tmp_path / "renamed"
    shutil.copytree(source, renamed)
    for path in [*(renamed / "images").iterdir(), *(renamed / "masks").iterdir()]:
        path.rename(path.with_name(f"p{path.name}"))
    lines = (renamed / "metadata.csv").read_text().splitlines()
    (renamed / "metadata.csv").write_text("\n".join([lines[0], *(f"p{line}" for line in lines[1:])]) + "\n")
    other = [f"data.root={renamed}", *(value for value in data if not value.startswith("data.root="))]
    calibration = run_calibrate(ckpt, other, tmp_path / "cal", "target_false_alarm_rate=0.25")["decision"]["calibration"]

    def evaluated(split: str) -> dict:
        overrides = [f"ckpt_path={ckpt}", *other, f"split={split}", "worst_k=0"]
        return evaluate(compose_app("evaluate", overrides, tmp_path / f"eval_{split}"), overrides)

    val = evaluated("val")
    assert val["slices"]["in_trained_subsets"]["none"] == val["n_images"]  # none known to the training split
    assert val["empty_slices"]["false_alarm_rate"] == calibration["false_alarm_rate"]
    for scored in (val, evaluated("all")):
        assert scored["decision_note"] == ("slice decision calibrated on the val split scored here: its false-alarm "
                                           "rate was chosen on these slices (optimistic).")
        assert scored["false_alarm_check"] is None
    test = evaluated("test")
    assert "held out" in test["decision_note"] and test["false_alarm_check"] is not None


def test_calibration_errors_are_one_clear_line(calibration_setup, tiny_checkpoint, tmp_path, capsys):
    ckpt, data = calibration_setup
    # The tiny checkpoint's own data: every slice has a tumor, so its val split has no empty slice.
    cfg = compose_app("calibrate", [f"ckpt_path={ckpt}", *tiny_checkpoint.data_overrides, "device=cpu"], tmp_path / "a")
    with pytest.raises(SystemExit) as exit_info:
        run_app(calibrate, cfg, [f"ckpt_path={ckpt}", *tiny_checkpoint.data_overrides])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: The val split of synthetic has no empty slice") and "data.negatives" in error
    assert DECISION_KEY not in torch.load(ckpt, map_location="cpu", weights_only=True)  # left as it was
    with pytest.raises(ConfigError, match=r"target_false_alarm_rate=1.0 must be a number in \[0, 1\)"):
        run_calibrate(ckpt, data, tmp_path / "b", "target_false_alarm_rate=1.0")
    with pytest.raises(ConfigError, match="not a training checkpoint .* calibrate the checkpoint, then export"):
        run_calibrate(tmp_path / "model.onnx", data, tmp_path / "c")


def test_calibrate_app_for_new_slices_is_stricter_and_refuses_too_few_empty_slices(calibration_setup, tmp_path,
                                                                                     capsys, caplog):
    ckpt, data = calibration_setup  # 4 empty val slices
    on_split = run_calibrate(ckpt, data, tmp_path / "split", "target_false_alarm_rate=0.25")["decision"]
    result = run_calibrate(ckpt, data, tmp_path / "new", "target_false_alarm_rate=0.25", "target_on=new_slices")
    stored = result["decision"]
    assert stored["target_on"] == "new_slices" and on_split["target_on"] == "split"
    assert stored["calibration"]["tta"] is False
    assert stored["threshold"] >= on_split["threshold"]  # k = floor(0.25 * 5) - 1 = 0 against floor(0.25 * 4) = 1
    assert stored["calibration"]["false_alarm_rate"] == 0.0 and result["on_new_empty_slices"]["expected_false_alarm_rate"] \
        == pytest.approx(1 / 5)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)[DECISION_KEY] == stored
    assert "target 0.25 expected on new slices" in capsys.readouterr().out
    overrides = [f"ckpt_path={ckpt}", *data, "target_false_alarm_rate=0.1", "target_on=new_slices"]
    with pytest.raises(SystemExit) as exit_info:
        run_app(calibrate, compose_app("calibrate", overrides, tmp_path / "few"), overrides)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: The val split of with_empty has 4 empty slices, too few to "
                                              "expect at most 10 % false alarms on new empty slices (target_on="
                                              "new_slices needs at least 9)")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)[DECISION_KEY] == stored  # left as it was
    with pytest.raises(ConfigError, match="target_on='always' must be one of split, new_slices"):
        run_calibrate(ckpt, data, tmp_path / "bad", "target_on=always")
    with_tta = run_calibrate(ckpt, data, tmp_path / "tta", "target_false_alarm_rate=0.25", "tta=true")
    assert with_tta["tta"] is True and with_tta["decision"]["calibration"]["tta"] is True  # stored with the decision
    with caplog.at_level(logging.WARNING):
        run_calibrate(ckpt, data, tmp_path / "all", "target_false_alarm_rate=0.25", "split=all")
    assert "The decision is calibrated partly on" in caplog.text and "Calibrate on held-out slices" in caplog.text


def test_predict_returns_an_empty_mask_for_a_rejected_slice(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name, side in (("small", 2), ("large", 6)):
        image = np.zeros((20, 20), np.uint8)
        image[:side, :side] = 255
        cv2.imwrite(str(source / f"{name}.png"), image)
    options = InferenceOptions(decision=decision(0.05))  # small: 1 % of the slice, large: 9 %
    decisions: list[dict] = []
    written, _ = predict_files(bright, sorted(source.iterdir()), tmp_path / "out", 20, options, decisions=decisions)
    masks = {path.name: cv2.imread(str(path), cv2.IMREAD_UNCHANGED) for path in written}
    assert not masks["small_mask.png"].any() and np.count_nonzero(masks["large_mask.png"]) == 36
    assert decisions == [
        {"file": "large.png", "mask": "large_mask.png", "tumor_present": True, "tumor_area_px": 36,
         "score": pytest.approx(0.09)},
        {"file": "small.png", "mask": "small_mask.png", "tumor_present": False, "tumor_area_px": 0,
         "score": pytest.approx(0.01)},
    ]


def test_every_exported_form_carries_and_applies_the_decision(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    from bts_lightning.export import export

    ckpt = tmp_path / "best.ckpt"
    shutil.copy(tiny_checkpoint.path, ckpt)
    stored = SliceDecision("max_probability", 1.0, 0.5, 0.05, {"split": "val", "dataset": "synthetic"}).to_dict()
    write_decision(ckpt, stored)  # rejects every slice: its score (a probability) is never above 1
    image = next((next((tiny_checkpoint.data_dir / "synthetic").iterdir()) / "images").iterdir())
    for form, name in (("onnx", "model.onnx"), ("torchscript", "model.pt"), ("hub", "folder")):
        output = tmp_path / name
        export(compose_app("export", [f"ckpt_path={ckpt}", f"format={form}", f"output={output}"], tmp_path / form))
        assert load_predictor(output, "cpu").contract.decision == stored, form
        if form == "hub":
            card = (output / "README.md").read_text()
            assert "- Slice-level decision: tumor present when max_probability > 1 (pixel threshold 0.5;" in card
        for setting, expect_empty in (("auto", True), ("off", False)):
            out = tmp_path / f"{form}_{setting}"
            summary = predict(compose_app("predict", [f"ckpt_path={output}", f"input={image}", f"output={out}",
                                                      "threshold=0.0", f"slice_decision={setting}"], tmp_path / "p"))
            mask = cv2.imread(summary["written"][0], cv2.IMREAD_UNCHANGED)
            assert (not mask.any()) == expect_empty, (form, setting)

    # a module loaded from the checkpoint or the folder keeps its decision in what it is saved or exported to again
    from bts_lightning.export import export_model
    from bts_lightning.hub import from_pretrained, save_pretrained

    for module, name in ((load_predictor(ckpt, "cpu").module, "from_ckpt"), (from_pretrained(tmp_path / "folder"),
                                                                              "from_folder")):
        assert load_predictor(save_pretrained(module, tmp_path / f"{name}_copy"), "cpu").contract.decision == stored
        export_model(module, tmp_path / f"{name}.onnx", "onnx", 64)
        assert load_predictor(tmp_path / f"{name}.onnx", "cpu").contract.decision == stored


def test_apps_left_at_their_defaults_apply_the_decision_as_it_was_calibrated(calibration_setup, tmp_path):
    """``threshold`` and ``tta`` are null by default: under a decision calibrated at pixel threshold 0.3 with flip TTA,
    predict and evaluate use those (the calibrated false-alarm rate holds), not 0.5 without flips."""
    ckpt, data = calibration_setup
    write_decision(ckpt, SliceDecision("component_fraction", 0.0, 0.3, 0.05, {"split": "val", "tta": True}).to_dict())
    image = min((Path(data[0].split("=", 1)[1]) / "images").iterdir())

    def predicted(*options: str) -> np.ndarray:
        out = tmp_path / "_".join(["p", *options]).replace("=", "")
        summary = predict(compose_app("predict", [f"ckpt_path={ckpt}", f"input={image}", f"output={out}", *options],
                                      tmp_path / "run"))
        return cv2.imread(summary["written"][0], cv2.IMREAD_UNCHANGED)

    calibrated = predicted("threshold=0.3", "tta=true")
    assert np.array_equal(predicted(), calibrated)
    assert not np.array_equal(predicted("threshold=0.5", "tta=false"), calibrated)  # what the defaults were
    overrides = [f"ckpt_path={ckpt}", *data, "split=val", "worst_k=0"]
    metrics = evaluate(compose_app("evaluate", overrides, tmp_path / "evaluate"), overrides)
    assert (metrics["inference"]["threshold"], metrics["inference"]["tta"]) == (0.3, True)


def test_demo_says_no_tumor_detected_with_the_score(tmp_path):
    from bts_lightning.demo import analyze

    image = np.zeros((20, 20), np.uint8)
    image[:2, :2] = 255  # 1 % of the slice
    cv2.imwrite(str(tmp_path / "small.png"), image)
    result = analyze(bright, tmp_path / "small.png", InferenceOptions(decision=decision(0.05)), 20)
    assert result.area == "No tumor detected (slice score 0.01 <= threshold 0.05)" and not result.mask.any()
    assert analyze(bright, tmp_path / "small.png", InferenceOptions(decision=decision(0.005)), 20).area.startswith(
        "Tumor area: 4 px")


# ---------------------------------------------------------------- training


def test_train_refuses_a_decision_target_without_empty_validation_slices(tiny_checkpoint, tmp_path, capsys):
    from bts_lightning.train import train
    from tests.conftest import compose_train
    from tests.fixtures_checkpoint import SYNTHETIC, TINY_MODEL

    overrides = [*SYNTHETIC, *TINY_MODEL, f"paths.data_dir={tiny_checkpoint.data_dir}", "trainer=cpu", "logger=csv",
                 "trainer.max_epochs=1", "decision.target_false_alarm_rate=0.05"]
    with pytest.raises(SystemExit) as exit_info:
        run_app(train, compose_train(overrides, tmp_path / "run"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: The val split of synthetic (8 slices) has no empty slice")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    with pytest.raises(ConfigError, match="decision.rule='area'"):
        train(compose_train([*overrides, "decision.rule=area"], tmp_path / "run2"))
    with pytest.raises(ConfigError, match="decision.target_on='val' must be one of"):
        train(compose_train([*overrides, "decision.target_on=val"], tmp_path / "run3"))
    # a val split with 4 empty slices cannot calibrate 5 % expected on new slices (19 needed): refused before training
    root = with_empty_slices(next((tiny_checkpoint.data_dir / "synthetic").iterdir()), tmp_path / "with_empty")
    few = [f"data.root={root}", "data.name=with_empty", "data.image_size=64", "data.num_workers=0", "data.val_fold=1",
           "data.test_fold=2", "data.download=false", *TINY_MODEL, "trainer=cpu", "logger=csv", "trainer.max_epochs=1",
           "decision.target_false_alarm_rate=0.05", "decision.target_on=new_slices"]
    with pytest.raises(ConfigError, match="has 4 empty slices, too few .* needs at least 19.*raise "
                                          r"decision.target_false_alarm_rate, or set decision.target_on=split\."):
        train(compose_train(few, tmp_path / "run4"))
    assert not (tmp_path / "run4" / "checkpoints").exists()


def test_train_calibrates_best_checkpoint_on_val(tiny_checkpoint, tmp_path):
    from bts_lightning.train import train
    from tests.conftest import compose_train
    from tests.fixtures_checkpoint import TINY_MODEL

    root = with_empty_slices(next((tiny_checkpoint.data_dir / "synthetic").iterdir()), tmp_path / "with_empty")
    overrides = [f"data.root={root}", "data.name=with_empty", "data.image_size=64", "data.num_workers=0",
                 "data.val_fold=1", "data.test_fold=2", "data.download=false", *TINY_MODEL, "trainer=cpu",
                 "logger=csv", "trainer.max_epochs=1", "decision.target_false_alarm_rate=0.25"]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    stored = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)[DECISION_KEY]
    assert metrics["decision"] == stored and stored["calibration"]["split"] == "val"
    assert stored["calibration"]["n_empty"] == 4 and stored["calibration"]["false_alarm_rate"] <= 0.25
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["decision"] == stored
    # the test split scored again with the decision, as evaluate scores it, and checked against the calibration
    scored = json.loads((tmp_path / "run" / "test_with_decision" / "metrics.json").read_text())
    assert scored["split"] == "test" and scored["inference"]["decision"] == stored
    with_decision = metrics["test_with_decision"]
    assert with_decision["empty_slices"] == scored["empty_slices"] and with_decision["n_images"] == scored["n_images"]
    assert with_decision["empty_slices"]["n"] == metrics["test_slices"]["empty_slices"] > 0
    check = with_decision["false_alarm_check"]
    assert check == scored["false_alarm_check"] and check["calibration"] == "4 empty slices of the val split of with_empty"
    assert with_decision["decision_note"] == "slice decision calibrated on the val split; this test split is held out."


def test_empty_slices_experiment_trains_with_the_slice_term_and_calibrates(tmp_path, caplog):
    """experiment=empty_slices: loss=dice_ce_slice, best.ckpt on val/dice_tumor, decision calibrated on val."""
    from bts_lightning.train import train
    from tests.conftest import compose_train

    overrides = ["experiment=empty_slices", "data=synthetic_empty", "data.synthetic.n=40", "data.synthetic.size=32",
                 "data.batch_size=4", "data.num_workers=0", f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu",
                 "trainer.max_epochs=2", "logger=csv", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]",
                 "model.net.num_res_units=1"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.loss.terms.slice._target_ == "bts_lightning.losses.SlicePresenceLoss"
    assert cfg.monitor.metric == "val/dice_tumor" and cfg.callbacks.early_stopping.monitor == "val/dice_tumor"
    with caplog.at_level(logging.INFO, logger="bts_lightning.train"):
        metrics = train(cfg)
    assert metrics["selection"]["monitor"] == "val/dice_tumor"
    best = metrics["best_val_dice_tumor"]
    assert f"at epoch {metrics['best_epoch']} (chosen by val/dice_tumor {best})" in caplog.text
    stored = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)[DECISION_KEY]
    assert stored["target_false_alarm_rate"] == 0.05 and stored["calibration"]["split"] == "val"
    assert stored["calibration"]["n_empty"] == 4 and stored["calibration"]["false_alarm_rate"] <= 0.05
