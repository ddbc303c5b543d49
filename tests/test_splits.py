"""Split logic: folds, patient groups, random; disjoint, complete and seed-deterministic."""

from __future__ import annotations

import logging

import pytest

from bts_lightning.data.splits import make_split, split_by_folds, split_by_groups, split_randomly
from bts_lightning.errors import ConfigError


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


def test_make_split_prefers_folds_then_groups_then_random():
    stems = [str(i) for i in range(12)]
    with_folds = {s: {"index": s, "fold": str(int(s) % 3 + 1), "pid": f"p{int(s) // 2}"} for s in stems}
    assert make_split(with_folds, stems, 1, None, 0.25, 0.0, 0).method == "folds"
    assert make_split(with_folds, stems, None, None, 0.25, 0.0, 0).method == "groups"
    groups_only = {s: {"index": s, "pid": f"p{int(s) // 2}"} for s in stems}
    assert make_split(groups_only, stems, 1, None, 0.25, 0.0, 0).method == "groups"
    assert make_split(None, stems, 1, None, 0.25, 0.0, 0).method == "random"
