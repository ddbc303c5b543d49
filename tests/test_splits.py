"""Split logic: folds, patient groups, random slices only on request; disjoint, complete and seed-deterministic."""

from __future__ import annotations

import hashlib
import logging

import pytest

from bts_lightning.data.splits import (
    make_patient_folds,
    make_split,
    slice_ids_digest,
    split_by_folds,
    split_by_groups,
    split_randomly,
)
from bts_lightning.errors import ConfigError, DataError


def assert_partition(split, count: int) -> None:
    subsets = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(s) for s in subsets) == count
    assert set().union(*subsets) == set(range(count))


def test_folds_hold_out_whole_folds():
    folds = ["1", "2", "3", "1", "2", "3", "4"]
    split = split_by_folds(folds, val_fold=2, test_fold=4)
    assert_partition(split, len(folds))
    assert split.val == [1, 4] and split.test == [6] and split.train == [0, 2, 3, 5]
    with pytest.raises(ConfigError, match="both 2"):
        split_by_folds(folds, val_fold=2, test_fold=2)
    with pytest.raises(ConfigError, match=r"^No training slices left: data.val_fold=1 and data.test_fold=2 hold\(s\) "
                                          r"out every fold the data has \(1, 2\)\. .*data.split_by=patient"):
        split_by_folds(["1", "2", "1"], val_fold=1, test_fold=2)


def test_groups_never_share_a_patient_and_follow_the_seed():
    groups = [f"p{i // 3}" for i in range(60)]
    split = split_by_groups(groups, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert_partition(split, len(groups))
    patients = [{groups[i] for i in subset} for subset in (split.train, split.val, split.test)]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert 9 <= len(split.val) <= 15 and 9 <= len(split.test) <= 15
    assert split_by_groups(groups, 0.2, 0.2, seed=1) == split
    assert split_by_groups(groups, 0.2, 0.2, seed=2).val != split.val


def test_random_split_is_deterministic_and_warns_about_leakage(caplog):
    with caplog.at_level(logging.WARNING):
        split = split_randomly(50, val_fraction=0.2, test_fraction=0.1, seed=5)
    assert "leak" in caplog.text
    assert_partition(split, 50)
    assert (len(split.val), len(split.test)) == (10, 5)
    assert split_randomly(50, 0.2, 0.1, seed=5) == split
    assert split_randomly(50, 0.2, 0.1, seed=6).val != split.val


@pytest.mark.parametrize("val, test", [(0.0, 0.1), (0.6, 0.4), (0.2, -0.1)])
def test_bad_fractions_are_named(val, test):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_randomly(10, val, test, seed=0)


STEMS = [str(i) for i in range(12)]
WITH_FOLDS = {s: {"index": s, "fold": str(int(s) // 2 % 3 + 1), "pid": f"p{int(s) // 2}"} for s in STEMS}
PIDS_ONLY = {s: {"index": s, "pid": f"p{int(s) // 2}"} for s in STEMS}
FOLDS_ONLY = {s: {"index": s, "label": "1", "fold": str(int(s) % 3 + 1)} for s in STEMS}
LABELS_ONLY = {s: {"index": s, "label": "1"} for s in STEMS}


def split(metadata, val_fold=1, split_by="auto", num_folds=None):
    return make_split(metadata, STEMS, val_fold, None, 0.25, 0.0, 0, split_by=split_by, source="/data/root",
                      num_folds=num_folds)


def test_folds_that_split_a_patient_are_refused_naming_the_patients():
    spread = {**WITH_FOLDS, STEMS[1]: {**WITH_FOLDS[STEMS[1]], "fold": "3"}}  # p0's second slice in another fold
    with pytest.raises(DataError, match=r"/data/root: metadata.csv puts 1 patient\(s\) in more than one fold "
                                        r"\(pid p0 in folds 1, 3\)"):
        split(spread)


def test_auto_prefers_folds_then_patients():
    assert (split(WITH_FOLDS).method, split(WITH_FOLDS).leaky) == ("folds", False)
    assert (split(WITH_FOLDS, val_fold=None).method, split(WITH_FOLDS, val_fold=None).leaky) == ("patients", False)
    assert split(PIDS_ONLY).method == "patients"


@pytest.mark.parametrize("metadata", [None, LABELS_ONLY], ids=["no-metadata", "labels"])
def test_auto_without_folds_or_patients_is_an_error_not_a_leaky_split(metadata):
    with pytest.raises(DataError) as error:
        split(metadata)
    message = str(error.value)
    assert "/data/root" in message and "metadata.csv" in message and "'fold' or 'pid'" in message
    assert "index,label,fold[,pid]" in message and "data.split_by=slice" in message and "optimistic" in message


def test_folds_without_a_validation_fold_say_to_choose_one():
    with pytest.raises(ConfigError, match=r"^data.val_fold=null, but /data/root is split by its folds .* and has no "
                                          r"patient ids .*set data.val_fold=K .*data.split_by=slice"):
        split(FOLDS_ONLY, val_fold=None)


def test_slice_split_only_on_request_and_marked_leaky(caplog):
    with caplog.at_level(logging.WARNING):
        random = split(None, split_by="slice")
    assert (random.method, random.leaky) == ("slices", True) and "leak" in caplog.text
    assert_partition(random, len(STEMS))
    assert split(WITH_FOLDS, split_by="slice") == random  # forced even when folds exist



def test_a_test_fold_that_a_patient_or_slice_split_does_not_use_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        patients = make_split(WITH_FOLDS, STEMS, 1, 3, 0.25, 0.0, 0, split_by="patient", source="/data/root")
    assert patients.test == [] and "data.test_fold=3 is not used: the split is by patients" in caplog.text
    assert "data.test_fraction=0 (no test split)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_split(WITH_FOLDS, STEMS, 1, 3, 0.25, 0.0, 0, split_by="fold", source="/data/root")
        make_split(WITH_FOLDS, STEMS, 1, None, 0.25, 0.0, 0, split_by="patient", source="/data/root")
    assert "is not used" not in caplog.text  # a fold split uses it; no test fold asked for
    with caplog.at_level(logging.WARNING):
        folds = make_split(WITH_FOLDS, STEMS, 1, None, 0.25, 0.3, 0, split_by="auto", source="/data/root")
    assert folds.test == [] and "data.test_fraction=0.3 is not used: the split is by folds, whose test split is " \
                                "data.test_fold (none)." in caplog.text


def test_forced_fold_or_patient_split_needs_its_column():
    assert split(WITH_FOLDS, split_by="patient").method == "patients"
    assert split(WITH_FOLDS, split_by="fold").method == "folds"
    with pytest.raises(DataError, match=r"split_by=fold, but /data/root has no metadata.csv with a 'fold' column\. "
                                        r"Set data.num_folds=K to make K patient-wise folds"):
        split(PIDS_ONLY, split_by="fold")
    with pytest.raises(DataError, match=r"split_by=fold, but .* 'fold' column\. Add a metadata.csv .*split_by=slice"):
        split(LABELS_ONLY, split_by="fold", num_folds=3)
    with pytest.raises(DataError, match=r"split_by=patient, but /data/root has no metadata.csv with a 'pid' column"):
        split(FOLDS_ONLY, split_by="patient")
    with pytest.raises(ConfigError, match="data.val_fold"):
        split(WITH_FOLDS, val_fold=None, split_by="fold")
    with pytest.raises(ConfigError, match="data.split_by='patients' is not one of auto, fold, patient, slice"):
        split(WITH_FOLDS, split_by="patients")


def test_slice_ids_digest_is_stable_and_order_independent():
    expected = hashlib.sha256(b"1\n10\n2").hexdigest()  # sorted as strings, joined by newlines
    assert slice_ids_digest(["2", "10", "1"]) == slice_ids_digest(["1", "2", "10"]) == expected
    assert slice_ids_digest(["1", "2"]) != expected and slice_ids_digest([]) == hashlib.sha256(b"").hexdigest()


def test_patient_folds_keep_patients_whole_follow_the_seed_and_stratify_by_label():
    pids = [f"p{i // 3}" for i in range(60)]  # 20 patients of 3 slices
    labels = ["1" if i < 24 else "2" for i in range(60)]  # 8 patients of label 1, 12 of label 2
    folds = make_patient_folds(pids, labels, num_folds=4, seed=7)
    fold_of: dict[str, set[str]] = {}
    for pid, fold in zip(pids, folds):
        fold_of.setdefault(pid, set()).add(fold)
    assert all(len(f) == 1 for f in fold_of.values()) and set(folds) == {"1", "2", "3", "4"}
    for label, per_fold in (("1", 2), ("2", 3)):  # every fold gets its share of each label's patients
        patients = {pid for pid, lab in zip(pids, labels) if lab == label}
        assert sorted(sum(fold_of[p] == {f} for p in patients) for f in "1234") == [per_fold] * 4
    assert make_patient_folds(pids, labels, 4, seed=7) == folds
    assert make_patient_folds(pids, labels, 4, seed=8) != folds
    assert sorted(set(make_patient_folds(pids, None, 5, seed=0))) == ["1", "2", "3", "4", "5"]
    with pytest.raises(DataError, match=r"Only 20 patient id\(s\): data.num_folds=21 .* lower data.num_folds"):
        make_patient_folds(pids, None, 21, seed=0)


def test_num_folds_makes_folds_from_patient_ids_only_when_the_data_has_none():
    made = split(PIDS_ONLY, val_fold=2, num_folds=3)
    assert (made.method, made.leaky) == ("patient_folds", False)
    assert_partition(made, len(STEMS))
    pids = [PIDS_ONLY[s]["pid"] for s in STEMS]
    assert not {pids[i] for i in made.val} & {pids[i] for i in made.train}
    assert split(PIDS_ONLY, val_fold=2, split_by="fold", num_folds=3) == made
    assert split(WITH_FOLDS, num_folds=3).method == "folds"  # the data's own folds win
    assert split(PIDS_ONLY, val_fold=None, num_folds=3).method == "patients"  # no fold to validate on
    with pytest.raises(ConfigError, match=r"data.val_fold=4 is not one of the data's folds; available folds: 1, 2, 3"):
        split(PIDS_ONLY, val_fold=4, num_folds=3)


def test_a_fold_count_that_the_datas_own_folds_override_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        assert split(WITH_FOLDS, num_folds=5).method == "folds"
    assert "data.num_folds=5 is not used: /data/root has 3 folds of its own" in caplog.text
    assert "a cross-validation validates each of them: data.val_fold=1,2,3 (experiment=cv sweeps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        split(WITH_FOLDS, num_folds=3)  # the same count: nothing to say
        split(PIDS_ONLY, num_folds=3)  # made from patient ids: used
    assert "is not used" not in caplog.text
