"""Synthetic dataset generator: layout, metadata, determinism, atomic writes, CLI and difficulty."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from bts_lightning.data import synthetic
from bts_lightning.data.synthetic import ensure_dataset, generate_dataset
from bts_lightning.errors import ConfigError, DataError
from tests.conftest import assert_one_error_line, compose_app, run_cli

N, SIZE, SEED, FOLDS, PER_PATIENT = 40, 64, 7, 5, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", n=N, size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def dataset128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth128") / "ds", n=60, size=128, seed=0)


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def read(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """Best Dice of ``image >= t`` or ``image <= t`` against ``mask`` over all 8-bit thresholds t."""
    best = 0.0
    for img in (image, 255 - image):
        tumor_at_least = np.bincount(img[mask], minlength=256)[::-1].cumsum()[::-1]
        all_at_least = np.bincount(img.ravel(), minlength=256)[::-1].cumsum()[::-1]
        best = max(best, float((2 * tumor_at_least / (all_at_least + mask.sum())).max()))
    return best


def test_layout_and_counts(dataset: Path) -> None:
    stems = [str(i) for i in range(1, N + 1)]
    assert sorted(p.stem for p in (dataset / "images").iterdir()) == sorted(stems)
    assert sorted(p.stem for p in (dataset / "masks").iterdir()) == sorted(stems)
    assert {p.suffix for kind in ("images", "masks") for p in (dataset / kind).iterdir()} == {".png"}
    for stem in stems:
        image, mask = read(dataset / "images" / f"{stem}.png"), read(dataset / "masks" / f"{stem}.png")
        assert image.shape == mask.shape == (SIZE, SIZE)
        assert image.dtype == mask.dtype == np.uint8
        assert image.min() == 0 and image.max() == 255  # min-max scaled per slice


def test_masks_binary_and_non_empty(dataset: Path) -> None:
    for path in (dataset / "masks").iterdir():
        mask = read(path)
        assert set(np.unique(mask).tolist()) == {0, 255}, path.name


def test_metadata_patient_wise_folds(dataset: Path) -> None:
    with open(dataset / "metadata.csv", newline="") as fh:
        assert fh.readline().strip() == "index,label,fold,pid"
    rows = read_rows(dataset)
    assert [int(r["index"]) for r in rows] == list(range(1, N + 1))
    assert {int(r["label"]) for r in rows} <= {1, 2, 3}
    folds_of: dict[str, set[str]] = defaultdict(set)
    labels_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        folds_of[r["pid"]].add(r["fold"])
        labels_of[r["pid"]].add(r["label"])
    assert all(len(f) == 1 for f in folds_of.values()), "a patient spans several folds"
    assert all(len(labels) == 1 for labels in labels_of.values()), "a patient has several labels"
    assert len(folds_of) == N // PER_PATIENT
    assert Counter(r["pid"] for r in rows) == {pid: PER_PATIENT for pid in folds_of}
    patients_per_fold = Counter(next(iter(f)) for f in folds_of.values())
    assert sorted(int(f) for f in patients_per_fold) == list(range(1, FOLDS + 1))
    assert max(patients_per_fold.values()) - min(patients_per_fold.values()) <= 1


def test_few_slices_still_fill_every_fold(tmp_path: Path) -> None:
    rows = read_rows(generate_dataset(tmp_path / "ds", n=7, size=32, seed=0, num_folds=5))
    assert sorted({int(r["fold"]) for r in rows}) == [1, 2, 3, 4, 5]
    assert len({r["pid"] for r in rows}) >= 5


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"n": 0}, "n"),
        ({"size": 31}, "size"),
        ({"seed": -1}, "seed"),
        ({"slices_per_patient": 0}, "slices_per_patient"),
        ({"num_folds": 0}, "num_folds"),
        ({"n": 3, "num_folds": 4}, "num_folds"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, int], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        generate_dataset(tmp_path / "ds", **{"n": 8, "size": 32, **kwargs})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [({"size": 64.0}, "size must be a whole number, got 64.0"),
                                                 ({"n": "8"}, "n must be a whole number, got '8'"),
                                                 ({"num_folds": True}, "num_folds must be a whole number")])
def test_arguments_of_the_wrong_type(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        generate_dataset(tmp_path / "ds", **{"n": 8, "size": 32, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_deterministic_and_seed_dependent(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", n=N, size=SIZE, seed=SEED)
    assert file_bytes(again) == file_bytes(dataset)
    other = file_bytes(generate_dataset(tmp_path / "other", n=N, size=SIZE, seed=SEED + 1))
    reference = file_bytes(dataset)
    assert other.keys() == reference.keys()
    assert all(other[k] != reference[k] for k in reference if k.startswith("images"))


def test_slices_do_not_depend_on_n(dataset: Path, tmp_path: Path) -> None:
    prefix = generate_dataset(tmp_path / "prefix", n=N // 2, size=SIZE, seed=SEED)
    for stem in range(1, N // 2 + 1):
        for kind in ("images", "masks"):
            assert (prefix / kind / f"{stem}.png").read_bytes() == (dataset / kind / f"{stem}.png").read_bytes()


def test_ensure_dataset_reuses_complete_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "ds"
    with caplog.at_level(logging.INFO, logger=synthetic.__name__):
        assert ensure_dataset(out, n=6, size=32, seed=0, num_folds=2) == out
    assert any("Generating" in r.getMessage() for r in caplog.records)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=synthetic.__name__):
        assert ensure_dataset(out, n=6, size=32, seed=0, num_folds=2) == out
    assert not caplog.records
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_ensure_dataset_regenerates_incomplete_target(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()  # e.g. left empty by a crash elsewhere: no metadata.csv, so not complete
    ensure_dataset(out, n=4, size=32, seed=0, num_folds=2)
    assert len(read_rows(out)) == 4


def test_manifest_records_the_arguments(dataset: Path) -> None:
    stored = json.loads((dataset / "synthetic.json").read_text())
    assert stored == {"n": N, "size": SIZE, "seed": SEED, "slices_per_patient": PER_PATIENT, "num_folds": FOLDS}


@pytest.mark.parametrize("other", [{"size": 64}, {"seed": 1}, {"n": 8}, {"num_folds": 3}])
def test_ensure_dataset_refuses_a_dataset_of_other_arguments(tmp_path: Path, other: dict[str, int]) -> None:
    out = generate_dataset(tmp_path / "ds", n=6, size=32, seed=0, num_folds=2)
    before = file_bytes(out)
    with pytest.raises(DataError) as error:
        ensure_dataset(out, **{"n": 6, "size": 32, "seed": 0, "num_folds": 2, **other})
    message = str(error.value)
    assert str(out) in message and "n=6, size=32, seed=0, slices_per_patient=4, num_folds=2" in message
    assert ", ".join(f"{key}={value}" for key, value in other.items()) in message
    assert "another folder" in message and f"delete {out}" in message
    assert file_bytes(out) == before


def test_ensure_dataset_refuses_folders_that_are_not_its_own(tmp_path: Path) -> None:
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"is not empty but holds no complete synthetic dataset"):
        ensure_dataset(stray, n=4, size=32, seed=0, num_folds=2)
    assert [p.name for p in stray.iterdir()] == ["notes.txt"]
    foreign = generate_dataset(tmp_path / "foreign", n=4, size=32, seed=0, num_folds=2)
    (foreign / "synthetic.json").unlink()  # e.g. a real dataset, or one from before manifests existed
    with pytest.raises(DataError, match=r"holds no readable synthetic.json") as error:
        ensure_dataset(foreign, n=4, size=32, seed=0, num_folds=2)
    assert "delete" not in str(error.value) and "left alone" in str(error.value)  # it may be someone's real data


def test_no_temporary_directories_left(dataset: Path) -> None:
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_crash_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_encode(array: np.ndarray) -> bytes:
        calls.append(array)
        if len(calls) == 5:
            raise OSError("disk full")
        return cv2.imencode(".png", array)[1].tobytes()

    monkeypatch.setattr(synthetic, "encode_png", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(tmp_path / "ds", n=8, size=32, seed=0, num_folds=2)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_generations_old_folder_goes_with_the_next_one(tmp_path: Path) -> None:
    """SIGKILL leaves ``.NAME.tmp-XXXX/``; the next generation of NAME removes it once nothing in it changed for
    STALE_SECONDS, and leaves a fresh one (a generation in progress)."""
    import os
    import time

    from bts_lightning.runtime import STALE_SECONDS

    old, fresh = tmp_path / ".ds.tmp-old1", tmp_path / ".ds.tmp-new2"
    for leftover in (old, fresh):
        (leftover / "images").mkdir(parents=True)
        (leftover / "images" / "1.png").write_bytes(b"partial")
    stale = time.time() - STALE_SECONDS - 5
    for path in (old, old / "images"):
        os.utime(path, (stale, stale))
    generate_dataset(tmp_path / "ds", n=4, size=32, seed=0, num_folds=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.tmp-new2", "ds"]


def test_a_leftover_that_vanishes_while_cleaning_is_left_alone(tmp_path: Path) -> None:
    """A concurrent generation can rename its ``.NAME.tmp-XXXX`` into place between the listing and the stat; a
    dangling link stands for that state here (listed, nothing behind it). The generation goes on and the link stays."""
    import os

    os.symlink(tmp_path / "gone", tmp_path / ".ds.tmp-gone")
    assert generate_dataset(tmp_path / "ds", n=4, size=32, seed=0, num_folds=2) == tmp_path / "ds"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.tmp-gone", "ds"]


def test_existing_dataset_wins_the_rename(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "ds", n=4, size=32, seed=0, num_folds=2)
    before = file_bytes(out)
    assert generate_dataset(out, n=4, size=32, seed=1, num_folds=2) == out
    assert file_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_incomplete_existing_target_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "stray.txt").write_text("x")
    with pytest.raises(OSError, match="not a complete"):
        generate_dataset(tmp_path / "ds", n=4, size=32, seed=0, num_folds=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_concurrent_generation_both_succeed(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(generate_dataset, out, n=12, size=64, seed=0, num_folds=3) for _ in range(2)]
    assert [run.result() for run in runs] == [out, out]  # .result() raises a thread's error
    assert len(read_rows(out)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def synthetic_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["bts_lightning.data.synthetic", *args], cwd=cwd, timeout=120)


def test_cli_generates(tmp_path: Path) -> None:
    result = synthetic_cli("out=cli", "n=8", "size=64", "seed=1", cwd=tmp_path)  # relative to where it runs
    assert result.returncode == 0, result.stderr
    assert result.stdout == "cli\n"  # only the folder: progress messages go to stderr
    assert "Generating synthetic dataset in cli (n=8, size=64, seed=1" in result.stderr
    out = tmp_path / "cli"
    assert len(read_rows(out)) == 8
    assert read(out / "images" / "8.png").shape == (64, 64)
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 1
    (log,) = (tmp_path / "logs" / "synthetic" / "runs").glob("*/synthetic.log")  # a Hydra run like the others
    assert "Generating synthetic dataset" in log.read_text()


def test_cli_bad_value_is_one_error_line(tmp_path: Path) -> None:
    result = synthetic_cli("out=cli", "n=abc", cwd=tmp_path)
    error = assert_one_error_line(result, "n must be a whole number, got 'abc'")
    assert "slices_per_patient" in error  # shows the usage with every setting
    assert result.stdout == "" and not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["n=abc"], "n must be a whole number, got 'abc'"),
        (["n=1.5"], "n must be a whole number, got 1.5"),
        (["num_folds=true"], "num_folds must be a whole number, got True"),
        (["n=null"], "n must be a whole number, got None"),
        (["size=8"], "size must be >= 32 pixels, got 8"),
        (["seed=-1"], "seed must be >= 0, got -1"),
        (["n=3", "num_folds=4"], "num_folds=4 needs at least one patient per fold"),
        (["n=4"], "out is required"),
        (["n=4", "out=[a,b]"], 'out=["a", "b"] is not a path'),
    ],
)
def test_app_refuses_bad_settings(tmp_path: Path, args: list[str], named: str) -> None:
    out_arg = [] if "out" in named else [f"out={tmp_path / 'cli'}"]
    cfg = compose_app("synthetic", [*out_arg, *args], tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        synthetic.synthetic_app(cfg)
    assert named in str(error.value)
    assert "slices_per_patient" in str(error.value) or "e.g. out=DIR" in str(error.value)  # usage, or an example
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_unknown_setting_is_refused_naming_it(tmp_path: Path) -> None:
    result = synthetic_cli("out=cli", "bogus=1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # the exit status of every bad input
    assert result.stderr.startswith("error: bogus=1: bogus is not a setting of synthetic. Its settings: empty_fraction,")
    assert not (tmp_path / "cli").exists()


def test_cli_refuses_an_existing_dataset_of_another_size(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "cli", n=8, size=32, seed=1, num_folds=2)
    result = synthetic_cli(f"out={out}", "n=8", "size=64", "seed=1", "num_folds=2", cwd=tmp_path)
    error = assert_one_error_line(result, str(out), "size=32", "size=64")
    assert result.stdout == "" and result.stderr == f"{error}\n"
    assert read(out / "images" / "1.png").shape == (32, 32)


def test_ensure_dataset_refuses_unknown_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bogus"):
        ensure_dataset(tmp_path / "ds", n=4, bogus=1)
    assert list(tmp_path.iterdir()) == []


def test_tumor_not_recoverable_by_global_threshold(dataset128: Path) -> None:
    dices = []
    for path in sorted((dataset128 / "images").iterdir()):
        image, mask = read(path), read(dataset128 / "masks" / path.name) > 0
        dices.append(best_threshold_dice(image, mask))
    assert np.mean(dices) < 0.7, np.mean(dices)


def test_tumor_visible_against_surroundings(dataset128: Path) -> None:
    """Learnable: the tumor differs from the tissue just around it in most slices."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    differences = []
    for path in sorted((dataset128 / "images").iterdir()):
        image, mask = read(path).astype(float), read(dataset128 / "masks" / path.name)
        ring = (cv2.dilate(mask, kernel) > 0) & (mask == 0)
        differences.append(abs(image[mask > 0].mean() - image[ring].mean()))
    assert np.median(differences) > 10, np.median(differences)


def test_tumor_sizes_and_label_locations(dataset128: Path) -> None:
    rows = read_rows(dataset128)
    assert {r["label"] for r in rows} == {"1", "2", "3"}
    for r in rows:
        mask = read(dataset128 / "masks" / f"{r['index']}.png") > 0
        assert 0.001 < mask.mean() < 0.1, r
        if r["label"] == "3":  # pituitary: small, near the horizontal centre
            cols = np.nonzero(mask)[1]
            assert abs(cols.mean() - 64) < 0.15 * 128, r
            assert mask.mean() < 0.03, r
