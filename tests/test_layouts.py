"""Dataset layouts: suffix (nested, LGG-like), figshare_mat (the release's v7.3/v5 files), detection, real LGG data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from bts_lightning.data.datamodule import BrainTumorDataModule
from bts_lightning.data.figshare_layout import read_mat_slice
from bts_lightning.data.io import resize
from bts_lightning.data.layouts import detect_layout, find_slices
from bts_lightning.errors import DataError
from bts_lightning.visualize import to_uint8
from tests.conftest import REPO_ROOT, compose_train, run_cli

LGG_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "lgg-sample"
LGG_PATTERN = "^([^_]+_[^_]+_[^_]+)"


def datamodule(root: Path, **kwargs) -> BrainTumorDataModule:
    defaults = {"image_size": 32, "batch_size": 4, "num_workers": 0, "download": False}
    return BrainTumorDataModule(root, **{**defaults, **kwargs})


def tumor_mask(size: int, at: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[at : at + 8, at : at + 8] = 255
    return mask


# --- suffix layout ---------------------------------------------------------------------------------------------------


def write_suffix_dataset(root: Path, patients: int = 4, slices: int = 3, size: int = 32) -> dict[str, np.ndarray]:
    """LGG-like folders ``TCGA_XX_000<p>_2000010<p>/<folder>_<n>.tif`` (RGB, written by PIL in file order) and
    ``<folder>_<n>_mask.tif``; returns the RGB arrays by slice id."""
    rng = np.random.default_rng(0)
    written = {}
    for p in range(patients):
        folder = root / f"TCGA_XX_000{p}_2000010{p}"
        folder.mkdir(parents=True)
        for n in (1, 2, 10)[:slices]:
            rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            rgb[..., 1] //= 2  # channels differ in scale: a swapped channel order would show
            Image.fromarray(rgb).save(folder / f"{folder.name}_{n}.tif")
            cv2.imwrite(str(folder / f"{folder.name}_{n}_mask.tif"), tumor_mask(size, 4 + n))
            written[f"{folder.name}/{folder.name}_{n}"] = rgb
    return written


def test_suffix_layout_pairs_nested_slices_with_patient_ids_from_folders(tmp_path):
    written = write_suffix_dataset(tmp_path / "kaggle_3m")
    (tmp_path / "kaggle_3m" / "data.csv").write_text("Patient\n")  # other files are ignored
    layout, pairs = find_slices(tmp_path, "auto", "_mask", LGG_PATTERN)
    assert layout == "suffix"
    ids = [pair.stem for pair in pairs]
    assert ids[:3] == [f"kaggle_3m/TCGA_XX_0000_20000100/TCGA_XX_0000_20000100_{n}" for n in (1, 2, 10)]  # numeric
    assert sorted(ids) == sorted(f"kaggle_3m/{key}" for key in written) and len(set(ids)) == len(ids)
    assert {pair.pid for pair in pairs} == {f"TCGA_XX_000{p}" for p in range(4)}
    assert all(pair.mask.name == f"{pair.image.stem}_mask.tif" and pair.fold is None for pair in pairs)
    _, pairs = find_slices(tmp_path, "suffix", "_mask", None)  # no pattern: the whole folder name
    assert pairs[0].pid == "TCGA_XX_0000_20000100"


@pytest.mark.parametrize("channels", ["gray", [1], [2, 0], [0, 1, 2]])
def test_suffix_slices_keep_the_channels_asked_for_in_file_order(tmp_path, channels):
    written = write_suffix_dataset(tmp_path)
    dm = datamodule(tmp_path, channels=channels, patient_pattern=LGG_PATTERN, num_folds=2)
    dm.setup("fit")
    assert dm.found_layout == "suffix" and dm.split.method == "patient_folds"
    val = dm.datasets["val"]
    image, _ = val.load(0)
    rgb = written[val.stem(0)]
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[None] if channels == "gray" else np.moveaxis(rgb[..., channels], -1, 0)
    np.testing.assert_array_equal(image, expected)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, len(expected), 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert dm.split_record()["settings"]["channels"] == channels


def test_multichannel_augmentation_moves_channels_together(tmp_path):
    import albumentations as A

    write_suffix_dataset(tmp_path)
    dm = datamodule(tmp_path, channels=[0, 1, 2], num_folds=2, augmentations=[A.HorizontalFlip(p=1.0)])
    dm.setup("fit")
    train = dm.datasets["train"]
    image, mask = train.load(0)
    item = train[0]
    np.testing.assert_array_equal(item["image"].numpy(), image[:, :, ::-1])
    np.testing.assert_array_equal(item["mask"].numpy(), mask[:, ::-1])


def test_suffix_layout_names_unpaired_files_and_unmatched_folders(tmp_path):
    write_suffix_dataset(tmp_path)
    folder = tmp_path / "TCGA_XX_0001_20000101"
    (folder / "TCGA_XX_0001_20000101_2_mask.tif").unlink()
    (folder / "TCGA_XX_0001_20000101_10.tif").unlink()
    with pytest.raises(DataError) as error:
        find_slices(tmp_path, "suffix", "_mask", None)
    message = str(error.value)
    assert "1 image(s) without a _mask mask" in message and "TCGA_XX_0001_20000101_2.tif" in message
    assert "1 mask(s) without an image" in message and "TCGA_XX_0001_20000101_10_mask.tif" in message

    other = tmp_path / "other"
    write_suffix_dataset(other, patients=2)
    (other / "TCGA_XX_0000_20000100").rename(other / "scan-7")
    with pytest.raises(DataError, match=r"patient_pattern=.*finds no patient id in 1 folder name\(s\): scan-7"):
        find_slices(other, "suffix", "_mask", LGG_PATTERN)



def test_patient_folders_linked_into_a_new_root_are_read_and_a_link_loop_ends(tmp_path):
    """A subset of patients chosen by linking their folders (README: negatives, evaluation sets) reads like a copy."""
    write_suffix_dataset(tmp_path / "full", patients=3)
    chosen = sorted((tmp_path / "full").iterdir())[:2]
    linked = tmp_path / "linked"
    linked.mkdir()
    for folder in chosen:
        (linked / folder.name).symlink_to(folder, target_is_directory=True)
    (linked / chosen[0].name / "loop").symlink_to(linked, target_is_directory=True)  # back to the root
    layout, pairs = find_slices(linked, "auto", "_mask", LGG_PATTERN)
    assert layout == "suffix" and len(pairs) == 2 * 3
    assert {pair.image.parent.name for pair in pairs} == {folder.name for folder in chosen}


def test_flat_suffix_folder_has_no_patients_and_needs_the_slice_opt_in(tmp_path):
    write_suffix_dataset(tmp_path, patients=1)
    flat = tmp_path / "TCGA_XX_0000_20000100"
    with pytest.raises(DataError) as error:
        datamodule(flat, layout="suffix", num_folds=2).setup("fit")
    assert "no folds or patient ids" in str(error.value) and "data.split_by=slice" in str(error.value)
    assert "folder of its own" in str(error.value)
    dm = datamodule(flat, layout="suffix", split_by="slice", val_fraction=0.34)
    dm.setup("fit")
    assert dm.split.leaky

    (flat / "TCGA_XX_0000_20000100_1.tif").rename(tmp_path / "loose.tif")
    (flat / "TCGA_XX_0000_20000100_1_mask.tif").rename(tmp_path / "loose_mask.tif")
    with pytest.raises(DataError, match=r"1 slice\(s\) lie in the root itself \(loose\)"):
        find_slices(tmp_path, "suffix", "_mask", None)


def test_evaluate_rebuilds_the_layout_and_channels_a_checkpoint_was_trained_on(tmp_path):
    from bts_lightning.trained_split import data_config, describe_settings

    write_suffix_dataset(tmp_path / "data")
    dm = datamodule(tmp_path / "data", channels=[0, 1, 2], patient_pattern=LGG_PATTERN, num_folds=2)
    dm.setup("fit")
    record = dm.split_record()
    data = data_config(compose_train([], tmp_path / "run").data, record, set(), None)
    rebuilt = instantiate(data, num_workers=0)
    rebuilt.setup("fit")
    assert (rebuilt.found_layout, rebuilt.channels, rebuilt.patient_pattern) == ("suffix", (0, 1, 2), LGG_PATTERN)
    assert rebuilt.split_record()["subsets"] == record["subsets"]
    assert describe_settings(record["settings"], record["method"]) == "patient_folds (val_fold=1, test_fold=None, " \
        "num_folds=2, seed=42)"


# --- layout detection ------------------------------------------------------------------------------------------------


def test_detection_picks_the_one_layout_and_refuses_mixed_or_empty_roots(tmp_path, make_dataset):
    kaggle = make_dataset(["1", "2"])
    assert detect_layout(kaggle) == "kaggle"
    write_suffix_dataset(kaggle / "extra", patients=1)
    with pytest.raises(DataError) as error:
        detect_layout(kaggle)
    message = str(error.value)
    assert "mixes dataset layouts" in message and "kaggle (images/ and masks/)" in message
    assert "suffix (extra/TCGA_XX_0000_20000100/TCGA_XX_0000_20000100_1" in message and "_mask.tif)" in message
    assert "data.layout=kaggle|suffix" in message
    assert find_slices(kaggle, "kaggle", "_mask", None)[0] == "kaggle"  # an explicit layout reads only its files
    with pytest.raises(DataError, match=r"Dataset root .*missing does not exist\. Put the Figshare release's 1\.mat"):
        datamodule(tmp_path / "missing", layout="figshare_mat", download=True).setup("fit")
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no dataset layout: expected images/ and masks/ .kaggle."):
        datamodule(empty).setup("fit")
    plain = tmp_path / "plain"  # a kaggle folder read as the suffix layout: the error says what it is
    for folder in ("images", "masks"):
        shutil.copytree(kaggle / folder, plain / folder)
    with pytest.raises(DataError, match=r"plain: its images/ and masks/ folders are the kaggle layout, not the suffix "
                                        r"layout \(masks named X_mask.tif beside their slice X.tif\): set "
                                        r"data.layout=kaggle \(or auto\).$"):
        find_slices(plain, "suffix", "_mask", None)  # not "2N images without a mask": masks/ files are no images


# --- figshare_mat layout ---------------------------------------------------------------------------------------------

MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2015 HDF5 schema 1.00 ."
RELEASE = {1: (1, "MR001"), 2: (1, "MR001"), 3: (2, "100360"), 4: (2, "100360"), 5: (3, "MR040"), 6: (3, "MR040"),
           7: (2, "112649"), 8: (2, "112649")}


def release_slice(index: int, height: int = 48, width: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A non-square int16 image (negative values too) and its 0/1 tumor mask."""
    rng = np.random.default_rng(index)
    image = rng.integers(-200, 1500, (height, width)).astype(np.int16)
    mask = np.zeros((height, width), np.uint8)
    mask[10:20, 5 + index : 15 + index] = 1
    return image, mask


def write_v73_slice(path: Path, image: np.ndarray, mask: np.ndarray, label: int, pid: str) -> None:
    """A slice file as MATLAB v7.3 writes it: 512-byte header, HDF5 struct cjdata, arrays stored transposed."""
    h5py = pytest.importorskip("h5py")
    codes = np.array([ord(c) for c in pid], np.uint16).reshape(-1, 1)
    values = {"image": (image.T, "int16"), "tumorMask": (mask.T, "logical"),
              "label": (np.array([[float(label)]]), "double"), "PID": (codes, "char"),
              "tumorBorder": (np.zeros((1, 4)), "double")}
    with h5py.File(path, "w", userblock_size=512) as handle:
        group = handle.create_group("cjdata")
        group.attrs["MATLAB_class"] = np.bytes_("struct")
        for key, (value, matlab_class) in values.items():
            group.create_dataset(key, data=value)
            group[key].attrs["MATLAB_class"] = np.bytes_(matlab_class)
    with path.open("r+b") as handle:
        handle.write(MATLAB_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")


def write_release(root: Path, cvind: list[int] | None = None) -> Path:
    """The release in miniature: 8 slices of 4 patients in two zip folders, with cvind.mat when given."""
    h5py = pytest.importorskip("h5py")
    for index, (label, pid) in RELEASE.items():
        folder = root / ("brainTumorDataPublic_1-4" if index <= 4 else "brainTumorDataPublic_5-8")
        folder.mkdir(parents=True, exist_ok=True)
        write_v73_slice(folder / f"{index}.mat", *release_slice(index), label, pid)
    if cvind is not None:
        with h5py.File(root / "cvind.mat", "w") as handle:
            handle.create_dataset("cvind", data=np.array([cvind], np.float64))
    return root


def test_v73_and_v5_slices_read_in_matlab_orientation(tmp_path):
    image, mask = release_slice(3)
    write_v73_slice(tmp_path / "3.mat", image, mask, 2, "100360")
    got_image, got_mask = read_mat_slice(tmp_path / "3.mat")
    assert got_image.dtype == np.int16 and got_image.shape == (48, 40)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_mask, mask)
    savemat = pytest.importorskip("scipy.io").savemat
    savemat(tmp_path / "4.mat", {"cjdata": {"image": image, "tumorMask": mask, "label": 2.0, "PID": "100360"}})
    for got, want in zip(read_mat_slice(tmp_path / "4.mat"), (image, mask)):
        np.testing.assert_array_equal(got, want)


def test_figshare_release_trains_on_the_authors_folds(tmp_path):
    root = write_release(tmp_path / "release", cvind=[1, 1, 2, 2, 3, 3, 4, 4])
    cfg = compose_train(["data=figshare_mat", f"data.root={root}", "data.image_size=32", "data.num_workers=0"],
                        tmp_path / "run")
    assert cfg.model.net.in_channels == 1
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.found_layout == "figshare_mat" and dm.split.method == "folds"
    assert [pair.stem for pair in dm.pairs] == [str(i) for i in range(1, 9)]  # the Kaggle copy's slice numbers
    assert dm.split_record()["subsets"]["val"]["ids"] == ["1", "2"]
    assert [dm.label_of(i) for i in range(8)] == [str(label) for label, _ in RELEASE.values()]
    assert dm.mask_threshold == 0  # 0/1 masks
    image, mask = dm.datasets["val"].load(1)
    source, source_mask = release_slice(2)
    np.testing.assert_array_equal(image[0], resize(to_uint8(source), 32, is_mask=False))  # min-max per slice
    np.testing.assert_array_equal(mask, resize(source_mask, 32, is_mask=True) > 0)


def test_figshare_release_without_cvind_gets_patient_folds_stratified_by_label(tmp_path):
    root = write_release(tmp_path / "release")
    dm = datamodule(root, layout="figshare_mat", num_folds=2)
    dm.setup("fit")
    assert dm.split.method == "patient_folds"
    pids = {name: {dm.pairs[i].pid for i in getattr(dm.split, name)} for name in ("train", "val")}
    assert not pids["train"] & pids["val"] and len(pids["val"]) == 2
    glioma = {"100360", "112649"}  # the two label-2 patients: stratified, one per fold
    assert len(pids["val"] & glioma) == 1
    without_folds = datamodule(root, layout="figshare_mat")  # no num_folds: patient groups by the fractions
    without_folds.setup("fit")
    assert without_folds.split.method == "patients"


def test_unreadable_release_files_are_named(tmp_path):
    root = write_release(tmp_path / "release")
    (root / "brainTumorDataPublic_5-8" / "6.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(DataError, match=r"1 unreadable Figshare slice file\(s\): .*6\.mat"):
        datamodule(root).setup("fit")
    h5py = pytest.importorskip("h5py")
    write_release(tmp_path / "second")
    with h5py.File(tmp_path / "second" / "brainTumorDataPublic_1-4" / "2.mat", "r+") as handle:
        del handle["cjdata/tumorMask"]
    with pytest.raises(DataError, match=r"1 unreadable file\(s\) \(.*brainTumorDataPublic_1-4/2\.mat\): "):
        datamodule(tmp_path / "second", num_folds=2).setup("fit")
    write_release(tmp_path / "third")  # one NaN pixel would min-max scale the whole slice to 0
    with h5py.File(tmp_path / "third" / "brainTumorDataPublic_1-4" / "2.mat", "r+") as handle:
        image = handle["cjdata/image"][()].astype(np.float64)
        image[0, 0] = np.nan
        del handle["cjdata/image"]
        handle["cjdata/image"] = image
    with pytest.raises(DataError, match=r"1 float file\(s\) with NaN or infinite pixel values, whose scaling to "
                                        r"0-255 cannot be told: .*brainTumorDataPublic_1-4/2\.mat"):
        datamodule(tmp_path / "third", num_folds=2).setup("fit")


# --- experiment=cv on any layout ------------------------------------------------------------------------------------


def test_cv_experiment_folds_cover_every_patient_once_on_a_suffix_layout(tmp_path):
    write_suffix_dataset(tmp_path / "data", patients=8, slices=2)
    seen: list[str] = []
    for fold in (1, 2, 3, 4):
        cfg = compose_train(["experiment=cv", "data=lgg", f"data.root={tmp_path / 'data'}", "data.image_size=32",
                             "data.num_workers=0", f"data.val_fold={fold}"], tmp_path / "run")
        dm = instantiate(cfg.data)
        dm.setup("fit")
        assert dm.split.method == "patient_folds" and not dm.has_test
        val, train = ({dm.pairs[i].pid for i in getattr(dm.split, name)} for name in ("val", "train"))
        assert len(val) == 2 and not val & train
        seen += dm.split_record()["subsets"]["val"]["ids"]
    assert sorted(seen) == sorted(pair.stem for pair in dm.pairs)


# --- the real LGG sample -------------------------------------------------------------------------------------------

needs_lgg = pytest.mark.skipif(not LGG_SAMPLE.is_dir(), reason=f"{LGG_SAMPLE} not present")


@needs_lgg
def test_lgg_sample_reads_flair_with_patient_wise_folds(tmp_path):
    cfg = compose_train(["data=lgg", f"data.root={LGG_SAMPLE}", "data.num_workers=0"], tmp_path / "run")
    assert cfg.data.channels == [1] and cfg.model.net.in_channels == 1
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert (dm.found_layout, len(dm.pairs), dm.split.method) == ("suffix", 413, "patient_folds")
    with (LGG_SAMPLE / "kaggle_3m" / "data.csv").open(newline="") as handle:
        patients = {row["Patient"] for row in csv.DictReader(handle)}
    pids = {pair.pid for pair in dm.pairs}
    assert len(pids) == 10 and pids <= patients
    val, train = ({dm.pairs[i].pid for i in getattr(dm.split, name)} for name in ("val", "train"))
    assert val and train and not val & train
    position = next(p for p in range(len(dm.datasets["val"])) if dm.datasets["val"].load(p)[1].any())
    image, _ = dm.datasets["val"].load(position)
    flair = np.asarray(Image.open(dm.pairs[dm.datasets["val"].indices[position]].image))[..., 1]  # PIL: file order
    np.testing.assert_array_equal(image, flair[None])


@needs_lgg
@pytest.mark.slow  # ~40 s: the train app as users run it, then a 4-fold cross-validation
def test_lgg_trains_patient_wise_and_cross_validates(tmp_path):
    common = ["data=lgg", f"data.root={LGG_SAMPLE}", "trainer=cpu", "data.image_size=64", "data.num_workers=0"]
    result = run_cli(["bts_lightning.train", *common, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "trainer.limit_val_batches=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((tmp_path / "run" / "metrics.json").read_text())["split"]
    assert (split["method"], split["leaky"], split["n_train"] + split["n_val"]) == ("patient_folds", False, 413)

    sweep = tmp_path / "cv"
    result = run_cli(["bts_lightning.train", "experiment=cv", *common, "debug=fast_dev_run",
                      "model.net.channels=[8,16,32]", "model.net.strides=[2,2]", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    splits = [json.loads((sweep / str(job) / "metrics.json").read_text())["split"] for job in range(4)]
    assert {s["method"] for s in splits} == {"patient_folds"} and sum(s["n_val"] for s in splits) == 413
