"""metadata.csv from the original Figshare .mat release: v7.3/HDF5 and v5 files, cvind folds, errors, CLI."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bts_lightning.data import figshare_metadata as fm
from bts_lightning.data.discovery import find_pairs, read_metadata
from bts_lightning.data.splits import make_split
from bts_lightning.errors import ConfigError, DataError
from tests.conftest import REPO_ROOT, assert_one_error_line, compose_app, run_cli

h5py = pytest.importorskip("h5py")

REAL_METADATA = REPO_ROOT.parent / "shared" / "data" / "brain-tumor" / "metadata.csv"

# 6 slices of 3 patients; the author's folds keep each patient in one fold.
SLICES = {1: (1, "MR001"), 2: (1, "MR001"), 3: (2, "100360"), 4: (2, "100360"), 5: (3, "MR040"), 6: (3, "MR040")}
CVIND = [2, 2, 1, 1, 3, 3]
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2015 HDF5 schema 1.00 ."


def _char_array(text: str, shape: str) -> np.ndarray:
    codes = np.array([ord(c) for c in text], dtype=np.uint16)
    return codes.reshape(-1, 1) if shape == "col" else codes.reshape(1, -1)


def write_v73(
    path: Path,
    label: float | None,
    pid: str | None,
    pid_shape: str = "col",
    userblock: bool = False,
) -> Path:
    """A slice file as MATLAB v7.3 writes it: HDF5 group cjdata (None leaves a key out)."""
    with h5py.File(path, "w", userblock_size=512 if userblock else 0) as handle:
        group = handle.create_group("cjdata")
        group.attrs["MATLAB_class"] = np.bytes_("struct")
        if label is not None:
            group.create_dataset("label", data=np.array([[label]], dtype=np.float64))
            group["label"].attrs["MATLAB_class"] = np.bytes_("double")
        if pid is not None:
            group.create_dataset("PID", data=_char_array(pid, pid_shape))
            group["PID"].attrs["MATLAB_class"] = np.bytes_("char")
        group.create_dataset("image", data=np.zeros((8, 8), dtype=np.int16))
        group.create_dataset("tumorBorder", data=np.zeros((4, 1), dtype=np.float64))
        group.create_dataset("tumorMask", data=np.zeros((8, 8), dtype=np.uint8))
    if userblock:
        with path.open("r+b") as handle:
            handle.write(MATLAB_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return path


def write_cvind(path: Path, folds: list[int], shape: str = "row") -> Path:
    data = np.array(folds, dtype=np.float64).reshape((1, -1) if shape == "row" else (-1, 1))
    with h5py.File(path, "w") as handle:
        handle.create_dataset("cvind", data=data)
    return path


@pytest.fixture
def mat_dir(tmp_path: Path) -> Path:
    """The release in miniature: 1.mat ... 6.mat (v7.3) and cvind.mat."""
    root = tmp_path / "figshare"
    root.mkdir()
    for index, (label, pid) in SLICES.items():
        write_v73(root / f"{index}.mat", float(label), pid, pid_shape="col" if index % 2 else "row")
    write_cvind(root / "cvind.mat", CVIND)
    return root


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def expected_rows(folds: list[int]) -> list[list[str]]:
    return [["index", "label", "fold", "pid"]] + [
        [str(i), str(label), str(folds[i - 1]), pid] for i, (label, pid) in SLICES.items()
    ]


def test_builds_metadata_from_v73_files_and_cvind(mat_dir: Path, tmp_path: Path) -> None:
    out = fm.build_metadata(mat_dir, tmp_path / "out" / "metadata.csv")
    assert read_csv(out) == expected_rows(CVIND)
    assert out.read_text().endswith("6,3,3,MR040\n")
    assert not [p for p in out.parent.iterdir() if p.name != "metadata.csv"]  # no temp file left


def test_rows_sorted_numerically_and_subfolders_found(tmp_path: Path) -> None:
    root = tmp_path / "release"
    for index in range(1, 12):  # as the four zips unpack: one subfolder per zip
        folder = root / ("part_1-6" if index <= 6 else "part_7-11")
        folder.mkdir(parents=True, exist_ok=True)
        write_v73(folder / f"{index}.mat", 2.0, f"P{(index - 1) % 5}")  # one patient per fold
    (root / "notes.mat").write_bytes(b"not a slice, ignored")
    write_cvind(root / "cvind.mat", [1, 2, 3, 4, 5] * 2 + [1], shape="col")
    rows = read_csv(fm.build_metadata(root, tmp_path / "metadata.csv"))
    assert [row[0] for row in rows[1:]] == [str(i) for i in range(1, 12)]
    assert [row[2] for row in rows[1:]] == ["1", "2", "3", "4", "5"] * 2 + ["1"]


def test_matlab_user_block_and_v5_files(tmp_path: Path) -> None:
    """A real v7.3 file starts with a 512-byte MATLAB header; v5 structs go through scipy.io.loadmat."""
    savemat = pytest.importorskip("scipy.io").savemat
    root = tmp_path / "mixed"
    root.mkdir()
    write_v73(root / "1.mat", 1.0, "MR012", userblock=True)
    savemat(root / "2.mat", {"cjdata": {"label": 2.0, "PID": "MR012 ", "image": np.zeros((4, 4))}})
    savemat(root / "3.mat", {"cjdata": {"label": 3.0, "PID": "112649"}})
    savemat(root / "cvind.mat", {"cvind": np.array([[4.0, 4.0, 5.0]])})  # a v5 cvind.mat works too
    assert fm.read_slice(root / "1.mat") == (1, "MR012")
    rows = read_csv(fm.build_metadata(root, tmp_path / "metadata.csv"))
    assert rows[1:] == [["1", "1", "4", "MR012"], ["2", "2", "4", "MR012"], ["3", "3", "5", "112649"]]


def test_without_cvind_folds_are_patient_wise_round_robin(
    mat_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (mat_dir / "cvind.mat").unlink()
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        out = fm.build_metadata(mat_dir, tmp_path / "metadata.csv")
    assert "No cvind.mat" in caplog.text and "round-robin" in caplog.text
    # sorted patient ids: 100360 -> fold 1, MR001 -> fold 2, MR040 -> fold 3
    assert read_csv(out) == expected_rows([2, 2, 1, 1, 3, 3])


def test_cvind_elsewhere(mat_dir: Path, tmp_path: Path) -> None:
    other = write_cvind(tmp_path / "folds.mat", [5, 5, 4, 4, 1, 1])
    (mat_dir / "cvind.mat").unlink()
    out = fm.build_metadata(mat_dir, tmp_path / "metadata.csv", cvind=other)
    assert read_csv(out) == expected_rows([5, 5, 4, 4, 1, 1])
    with pytest.raises(DataError, match="nope.mat"):
        fm.build_metadata(mat_dir, tmp_path / "metadata.csv", cvind=tmp_path / "nope.mat")


def test_a_cvind_that_splits_a_patient_is_refused_as_training_refuses_it(mat_dir: Path, tmp_path: Path) -> None:
    """Training refuses folds that split a patient, so the metadata tool does not write them either; both name
    cvind.mat and the way out (folds made per patient without it)."""
    from bts_lightning.data.datamodule import BrainTumorDataModule

    write_cvind(mat_dir / "cvind.mat", [2, 3, 1, 1, 3, 3])
    message = r"cvind.mat puts 1 patient\(s\) in more than one fold \(MR001 \(folds 2, 3\)\), .*Move it away"
    with pytest.raises(DataError, match=message):
        fm.build_metadata(mat_dir, tmp_path / "metadata.csv")
    assert not (tmp_path / "metadata.csv").exists()
    data = BrainTumorDataModule(mat_dir, layout="figshare_mat", image_size=32, num_workers=0, download=False)
    with pytest.raises(DataError, match=message):
        data.setup("fit")


def test_missing_slice_files_warn_but_cvind_maps_by_index(
    mat_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (mat_dir / "4.mat").unlink()
    with caplog.at_level(logging.WARNING, logger=fm.__name__):
        rows = read_csv(fm.build_metadata(mat_dir, tmp_path / "metadata.csv"))
    assert "missing 4.mat" in caplog.text
    assert [row[:3] for row in rows[1:]] == [["1", "1", "2"], ["2", "1", "2"], ["3", "2", "1"], ["5", "3", "3"],
                                             ["6", "3", "3"]]


def error_cases() -> dict[str, tuple[Callable[[Path], object], str]]:
    """name -> (how to break the miniature release, what the error must say)."""

    def replace(index: int, **kwargs: object) -> Callable[[Path], object]:
        def apply(root: Path) -> object:
            defaults = {"label": float(SLICES[index][0]), "pid": SLICES[index][1]}
            return write_v73(root / f"{index}.mat", **{**defaults, **kwargs})

        return apply

    return {
        "no label": (replace(3, label=None), r"3\.mat: missing key cjdata/label"),
        "no PID": (replace(5, pid=None), r"5\.mat: missing key cjdata/PID"),
        "bad label": (replace(2, label=4.0), r"2\.mat: cjdata/label is 4"),
        "empty PID": (replace(2, pid=""), r"2\.mat: cjdata/PID is empty"),
        "not a MAT file": (lambda root: (root / "6.mat").write_text("hello"), r"6\.mat: not a readable MATLAB"),
        "no cjdata": (lambda root: write_cvind(root / "1.mat", [1]), r"1\.mat: no 'cjdata' struct"),
        "short cvind": (lambda root: write_cvind(root / "cvind.mat", [1] * 5), r"cvind\.mat: 'cvind' has 5 entries"),
        "no cvind key": (
            lambda root: write_v73(root / "cvind.mat", 1.0, "x"),
            r"cvind\.mat: missing key 'cvind'",
        ),
        "bad fold": (lambda root: write_cvind(root / "cvind.mat", [1, 2, 0, 1, 1, 1]), r"slice 3: 0"),
        "duplicate index": (
            lambda root: (root / "sub").mkdir() or write_v73(root / "sub" / "2.mat", 1.0, "MR001"),
            r"same slice number: 2\.mat / sub/2\.mat",
        ),
    }


@pytest.mark.parametrize("case", list(error_cases()))
def test_errors_name_the_file_and_key(mat_dir: Path, tmp_path: Path, case: str) -> None:
    breaker, message = error_cases()[case]
    breaker(mat_dir)
    out = tmp_path / "metadata.csv"
    with pytest.raises(DataError, match=message):
        fm.build_metadata(mat_dir, out)
    assert not out.exists()


def test_v5_missing_field(tmp_path: Path) -> None:
    savemat = pytest.importorskip("scipy.io").savemat
    savemat(tmp_path / "1.mat", {"cjdata": {"label": 2.0}})
    with pytest.raises(DataError, match=r"1\.mat: missing key cjdata\.PID"):
        fm.build_metadata(tmp_path, tmp_path / "metadata.csv")


def test_missing_dir_and_no_slice_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        fm.build_metadata(tmp_path / "absent")
    write_cvind(tmp_path / "cvind.mat", [1])
    with pytest.raises(DataError, match=r"no <index>\.mat slice files"):
        fm.build_metadata(tmp_path)
    (tmp_path / "0.mat").write_bytes(b"a slice numbered 0 would take cvind's last fold")
    with pytest.raises(DataError, match=r"0\.mat: the release numbers its slices from 1"):
        fm.build_metadata(tmp_path)


def figshare_app(overrides: list[str], run_dir: Path) -> Path:
    return fm.figshare_metadata_app(compose_app("figshare_metadata", overrides, run_dir))


def test_app_writes_out(mat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert figshare_app([f"mat_dir={mat_dir}"], tmp_path / "run") == Path("metadata.csv")  # default: ./metadata.csv
    assert read_csv(tmp_path / "metadata.csv") == expected_rows(CVIND)
    figshare_app([f"mat_dir={mat_dir}", "out=sub/meta.csv", f"check={tmp_path}"], tmp_path / "run")
    assert (tmp_path / "sub" / "meta.csv").read_text() == (tmp_path / "metadata.csv").read_text()
    assert capsys.readouterr().out == "metadata.csv\nsub/meta.csv\n"  # the files written, one a line


def test_check_reads_metadata_as_training_does(mat_dir: Path, tmp_path: Path) -> None:
    """An Excel BOM is fine; a binary file, and a folder without metadata.csv, are one clear error each."""
    figshare_app([f"mat_dir={mat_dir}", f"out={tmp_path / 'plain.csv'}"], tmp_path / "run")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    assert fm.compare_with(fm.collect_records(mat_dir), bom) == len(CVIND)
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02\xff\xfe")
    with pytest.raises(DataError, match=r"binary.csv is not a UTF-8 text file"):
        fm.compare_with(fm.collect_records(mat_dir), tmp_path / "binary.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"check=.*empty: there is no metadata file .*empty/metadata\.csv\.$"):
        fm.compare_with(fm.collect_records(mat_dir), tmp_path / "empty")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "mat_dir is required: python -m bts_lightning.data.figshare_metadata mat_dir=DIR"),
        (["mat_dir=[a,b]"], 'mat_dir=["a", "b"] is not a path'),
        (["out=null"], "out is required"),
        (["out=true"], "out=true is not a path"),
        (["cvind=[x]"], 'cvind=["x"] is not a path'),
    ],
)
def test_app_refuses_bad_settings(mat_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    mat_dir_arg = [] if "mat_dir" in message else [f"mat_dir={mat_dir}"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        figshare_app([*mat_dir_arg, f"out={tmp_path / 'metadata.csv'}", *overrides], tmp_path / "run")
    assert not (tmp_path / "metadata.csv").exists()


def test_cli_writes_out_and_reports_errors(mat_dir: Path, tmp_path: Path) -> None:
    module = "bts_lightning.data.figshare_metadata"
    result = run_cli([module, f"mat_dir={mat_dir}", "out=meta.csv"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "meta.csv\n" and read_csv(tmp_path / "meta.csv") == expected_rows(CVIND)
    assert "Wrote meta.csv: 6 slices of 3 patients" in result.stderr  # progress on stderr, like the log file

    assert_one_error_line(run_cli([module, "mat_dir=[a,b]"], cwd=tmp_path, timeout=120),
                          'mat_dir=["a", "b"] is not a path')
    assert_one_error_line(run_cli([module, f"mat_dir={mat_dir}", "folds=3"], cwd=tmp_path, timeout=120),
                          "folds=3: folds is not a setting of figshare_metadata")

    write_v73(mat_dir / "4.mat", 2.0, None)
    result = run_cli([module, f"mat_dir={mat_dir}", "out=bad.csv"], cwd=tmp_path, timeout=120)
    assert_one_error_line(result, "4.mat: missing key cjdata/PID")
    assert not (tmp_path / "bad.csv").exists()


def test_metadata_works_with_discovery_and_fold_split(
    mat_dir: Path, make_dataset: Callable[..., Path]
) -> None:
    root = make_dataset([str(i) for i in SLICES])
    fm.build_metadata(mat_dir, root / "metadata.csv")
    stems = [pair.stem for pair in find_pairs(root)]
    metadata = read_metadata(root, stems)
    assert metadata is not None and metadata["3"] == {"index": "3", "label": "2", "fold": "1", "pid": "100360"}
    split = make_split(metadata, stems, val_fold=1, test_fold=3, val_fraction=0.2, test_fraction=0.0, seed=0)
    assert split.method == "folds"
    assert [stems[i] for i in split.val] == ["3", "4"]
    assert [stems[i] for i in split.test] == ["5", "6"]
    assert [stems[i] for i in split.train] == ["1", "2"]
    groups = make_split(metadata, stems, None, None, val_fraction=0.3, test_fraction=0.0, seed=0)
    assert groups.method == "patients"  # the pid column enables patient-wise random splits too


def test_release_counts_check(mat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    """With every slice present, the counts are compared with the published release's."""
    monkeypatch.setattr(fm, "RELEASE_SLICES", 6)
    monkeypatch.setattr(fm, "RELEASE_PATIENTS", 3)
    monkeypatch.setattr(fm, "RELEASE_LABEL_COUNTS", {1: 2, 2: 2, 3: 2})
    monkeypatch.setattr(fm, "RELEASE_FOLD_COUNTS", {1: 2, 2: 2, 3: 2})
    with caplog.at_level(logging.INFO, logger=fm.__name__):
        fm.build_metadata(mat_dir, tmp_path / "metadata.csv")
    assert "Counts match the published release" in caplog.text
    monkeypatch.setattr(fm, "RELEASE_FOLD_COUNTS", {1: 3, 2: 1, 3: 2})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=fm.__name__):
        fm.build_metadata(mat_dir, tmp_path / "metadata.csv")
    assert "differ from the published release: slices per fold {1: 2, 2: 2, 3: 2}" in caplog.text


def test_published_counts_are_consistent_with_shared_data() -> None:
    """The constants agree with each other and with the Kaggle-copy metadata (folds 1-4) where present."""
    assert sum(fm.RELEASE_LABEL_COUNTS.values()) == sum(fm.RELEASE_FOLD_COUNTS.values()) == fm.RELEASE_SLICES
    if not REAL_METADATA.is_file():
        pytest.skip(f"{REAL_METADATA} not present")
    with REAL_METADATA.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for fold in ("1", "2", "3", "4"):
        assert sum(row["fold"] == fold for row in rows) == fm.RELEASE_FOLD_COUNTS[int(fold)]
    for label in (1, 2, 3):  # fold 5 is missing there, so at most the published count
        assert sum(row["label"] == str(label) for row in rows) <= fm.RELEASE_LABEL_COUNTS[label]


def test_check_against_real_kaggle_metadata(tmp_path: Path) -> None:
    """Slices 1..40 written with the real labels and folds agree with the shared metadata.csv; a wrong one fails."""
    if not REAL_METADATA.is_file():
        pytest.skip(f"{REAL_METADATA} not present")
    with REAL_METADATA.open(newline="") as handle:
        real = {int(row["index"]): row for row in csv.DictReader(handle)}
    count = 40
    root = tmp_path / "release"
    root.mkdir()
    folds = []
    for index in range(1, count + 1):
        row = real.get(index)
        folds.append(int(row["fold"]) if row else 5)  # fold 5 is not in the shared copy
        label = float(row["label"]) if row else 1.0
        write_v73(root / f"{index}.mat", label, f"patient-{folds[-1]}-{label:g}")
    write_cvind(root / "cvind.mat", folds)
    shared = sum(i in real for i in range(1, count + 1))
    assert fm.compare_with(fm.collect_records(root), REAL_METADATA.parent) == shared

    first = min(i for i in range(1, count + 1) if i in real)
    wrong = 1.0 + int(real[first]["label"]) % 3
    write_v73(root / f"{first}.mat", wrong, f"patient-{folds[first - 1]}-{wrong:g}")
    out = tmp_path / "metadata.csv"
    with pytest.raises(DataError, match=rf"index {first}: label {wrong:g} here, '{real[first]['label']}' there"):
        fm.build_metadata(root, out, check=REAL_METADATA)
    assert not out.exists()
