"""Inference helpers (TTA, thresholding, postprocessing) and the predict app end to end."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bts_lightning import inference
from bts_lightning.errors import ConfigError, DataError
from bts_lightning.inference import InferenceOptions, ModelContract, load_predictor, postprocess, predict_probabilities
from bts_lightning.predict import list_inputs, output_names, predict, predict_files
from bts_lightning.runtime import run_app, user_error_of
from tests import fixtures_checkpoint
from tests.conftest import assert_one_error_line, run_cli
from tests.fixtures_checkpoint import compose_app

tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below


def ramp_predictor(images: torch.Tensor) -> torch.Tensor:
    """Ignores the input: probability rises from 0 (left column) to 1 (right column)."""
    n, _, h, w = images.shape
    return torch.linspace(0, 1, w).expand(n, h, w).clone()


def components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- postprocessing, TTA, threshold


def test_postprocess_on_hand_made_masks():
    mask = np.zeros((12, 12), np.uint8)
    mask[0:3, 0:3] = 1  # 9 px
    mask[6:8, 6:8] = 1  # 4 px
    mask[8, 8] = 1  # touches the 2x2 block diagonally: same 8-connected component (5 px)
    mask[11, 0] = 1  # 1 px
    assert np.array_equal(postprocess(mask), mask)
    largest = postprocess(mask, largest_component=True)
    assert largest.sum() == 9 and largest[0:3, 0:3].all()
    no_specks = postprocess(mask, min_size=5)
    assert no_specks.sum() == 9 + 5 and no_specks[11, 0] == 0 and no_specks[8, 8] == 1
    assert postprocess(mask, min_size=6).sum() == 9
    assert postprocess(mask, largest_component=True, min_size=10).sum() == 0  # nothing is big enough
    assert postprocess(np.zeros((5, 5)), largest_component=True, min_size=3).sum() == 0
    tie = np.zeros((6, 6), np.uint8)
    tie[0, 4:6], tie[4, 0:2] = 1, 1
    assert np.array_equal(np.argwhere(postprocess(tie, largest_component=True)), [[0, 4], [0, 5]])  # raster order
    assert postprocess(mask * 255).max() == 1


def test_tta_averages_identity_and_both_flips():
    seen: list[torch.Tensor] = []
    raster = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 5) / 19  # differs along rows and columns

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return raster.expand(images.shape[0], 4, 5).clone()

    images = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    assert torch.allclose(predict_probabilities(recording, images), raster)
    seen.clear()
    averaged = predict_probabilities(recording, images, tta=True)
    # Each flipped prediction is flipped back before averaging.
    assert torch.allclose(averaged, (raster + raster.flip(-1) + raster.flip(-2)).expand(2, 4, 5) / 3)
    assert [torch.equal(s, images.flip(dims)) for s, dims in zip(seen, [(), (-1,), (-2,)])] == [True] * 3
    ramp = torch.linspace(0, 1, 5).expand(2, 4, 5)
    assert torch.allclose(predict_probabilities(ramp_predictor, images, tta=True), (ramp + (1 - ramp) + ramp) / 3)


def test_threshold_is_strict_and_options_are_checked():
    options = InferenceOptions(threshold=0.5)
    assert options.mask(np.array([[0.2, 0.5, 0.51]])).tolist() == [[0, 0, 1]]
    with pytest.raises(ConfigError, match="threshold"):
        InferenceOptions(threshold=1.5)
    with pytest.raises(ConfigError, match="min_size"):
        InferenceOptions(min_size=-1)
    assert InferenceOptions.from_config({"tta": True, "postprocess": {"min_size": 7}}) == InferenceOptions(
        0.5, True, False, 7
    )


def test_probabilities_are_resized_back_then_thresholded_and_cleaned(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir(), out.mkdir()
    cv2.imwrite(str(source / "wide.png"), np.tile(np.arange(70, dtype=np.uint8), (50, 1)))  # not blank

    def mask_with(**options) -> np.ndarray:
        written, skipped = predict_files(ramp_predictor, [source / "wide.png"], out, 16, InferenceOptions(**options))
        assert skipped == [] and written == [out / "wide_mask.png"]
        return cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)

    plain = mask_with(threshold=0.6)
    assert plain.shape == (50, 70) and set(np.unique(plain)) == {0, 255}
    assert 0.35 < (plain[0] > 0).mean() < 0.45  # ramp > 0.6 on the right ~40% of the original width
    with_tta = mask_with(threshold=0.6, tta=True)  # (1 + r) / 3 > 0.6  <=>  r > 0.8
    assert 0.15 < (with_tta[0] > 0).mean() < 0.25
    assert (with_tta <= plain).all()
    assert mask_with(threshold=0.6, min_size=50 * 70).max() == 0  # the one component is smaller than the image

    def two_blobs(images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.zeros(images.shape[0], *images.shape[-2:])
        probabilities[:, 2:10, 2:10] = 0.9
        probabilities[:, 13:15, 13:15] = 0.9
        return probabilities

    def one_pixel(images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.zeros(images.shape[0], *images.shape[-2:])
        probabilities[:, 1, 1] = 0.9
        return probabilities

    cv2.imwrite(str(source / "square.png"), np.tile(np.arange(40, dtype=np.uint8), (40, 1)))
    written, _ = predict_files(one_pixel, [source / "square.png"], out, 4, InferenceOptions())
    blob = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED) > 0
    # Bilinear probabilities, then threshold: a rounded blob inside the 10x10 block that
    # thresholding first and enlarging the mask would give.
    assert blob[15, 15] and not blob[10, 10] and not blob[11, 11] and 0 < blob.sum() < 100
    assert not blob[:10].any() and not blob[20:].any()

    written, _ = predict_files(two_blobs, [source / "wide.png"], out, 16, InferenceOptions())
    assert components(cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)) == 2
    written, _ = predict_files(two_blobs, [source / "wide.png"], out, 16, InferenceOptions(largest_component=True))
    assert components(cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)) == 1


def test_output_names_stay_unique():
    files = [Path("x/a.png"), Path("x/a.JPG"), Path("x/b.tif")]
    assert output_names(files) == {files[0]: "a_png", files[1]: "a_jpg", files[2]: "b"}
    clashing = [Path(name) for name in ("a.png", "a.jpg", "a_png.bmp", "b.tif", "b.TIF", "B_tif_2.png")]
    names = output_names(clashing)
    assert len({name.casefold() for name in names.values()}) == len(clashing), names
    assert names == {clashing[0]: "a_png", clashing[1]: "a_jpg", clashing[2]: "a_png_2", clashing[3]: "b_tif",
                     clashing[4]: "b_tif_3", clashing[5]: "B_tif_2"}


# ---------------------------------------------------------------- the app


def write_inputs(folder: Path, slice_image: np.ndarray) -> dict[str, tuple[int, int]]:
    """Slices of several sizes and formats, a corrupt file and a non-image; returns name -> (h, w)."""
    folder.mkdir(parents=True)
    small = cv2.resize(slice_image, (70, 50))  # 70 wide, 50 high
    big_rgb = cv2.cvtColor(cv2.resize(slice_image, (300, 200)), cv2.COLOR_GRAY2BGR)
    deep = (cv2.resize(slice_image, (90, 80)).astype(np.uint16) * 257)  # 16-bit
    assert cv2.imwrite(str(folder / "small.png"), small)
    assert cv2.imwrite(str(folder / "big_rgb.jpg"), big_rgb)
    assert cv2.imwrite(str(folder / "deep16.tif"), deep)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    huge = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                    for kind, data in ((b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)),
                                       (b"IDAT", zlib.compress(b"\x00" * 10)), (b"IEND", b"")))
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + huge)  # 69 bytes whose header claims 40000x40000 px
    (folder / "notes.txt").write_text("not an image, ignored")
    return {"small": (50, 70), "big_rgb": (200, 300), "deep16": (80, 90)}


def test_predict_app_keeps_sizes_skips_corrupt_files_and_leaves_input_alone(tiny_checkpoint, tmp_path):
    slice_image = cv2.imread(str(next((tiny_checkpoint.data_dir).rglob("images/*.png"))), cv2.IMREAD_GRAYSCALE)
    source, out = tmp_path / "input", tmp_path / "masks"
    sizes = write_inputs(source, slice_image)
    before = folder_state(source)
    result = run_cli(
        ["bts_lightning.predict", f"ckpt_path={tiny_checkpoint.path}", f"input={source}", f"output={out}",
         "image_size=64", "tta=true", "postprocess.largest_component=true", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert "Skipping broken.png" in logs and "Skipped 2 unreadable file(s) of 5: broken.png, huge.png" in logs
    assert "Skipping huge.png: not a readable image (OpenCV refused its header" in logs  # cv2.error crashed predict
    assert folder_state(source) == before
    expected = {f"{stem}_{kind}.png" for stem in sizes for kind in ("mask", "overlay")}
    assert {p.name for p in out.iterdir()} == {*expected, "slices.csv"}
    with open(out / "slices.csv", newline="") as handle:
        slices = {row["mask"]: row for row in csv.DictReader(handle)}
    assert set(slices) == {f"{stem}_mask.png" for stem in sizes}
    for stem, (height, width) in sizes.items():
        mask = cv2.imread(str(out / f"{stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert components(mask) <= 1  # largest_component
        assert cv2.imread(str(out / f"{stem}_overlay.png")).shape == (height, width, 3)
        row = slices[f"{stem}_mask.png"]
        assert int(row["tumor_area_px"]) == np.count_nonzero(mask)
        assert row["tumor_present"] == str(bool(mask.any())) and row["score"] == ""  # no slice decision


def test_exported_models_load_by_suffix_and_bring_their_trained_size(tmp_path, monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    cv2.imwrite(str(source / "1.png"), np.tile(np.arange(30, dtype=np.uint8), (20, 1)))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"fake")
    loaded: list[Path] = []
    seen_sizes: list[tuple[int, int]] = []

    class FakeExported:
        """Stands in for inference.ExportedModel: a ramp predictor whose contract says 32 px."""

        contract = ModelContract(image_size=32, model="unet")

        def __init__(self, path, device=None) -> None:
            loaded.append(Path(path))

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            seen_sizes.append(tuple(images.shape[-2:]))
            return ramp_predictor(images)

    monkeypatch.setattr(inference, "ExportedModel", FakeExported)
    cfg = compose_app("predict", [f"ckpt_path={model}", f"input={source}", f"output={tmp_path / 'out'}"],
                      tmp_path / "run")  # no image_size: the contract's
    summary = predict(cfg)
    assert loaded == [model] and summary["written"] == [str(tmp_path / "out" / "1_mask.png")]
    assert summary["image_size"] == 32 and (32, 32) in seen_sizes
    mask = cv2.imread(summary["written"][0], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (20, 30) and mask[:, -1].all() and not mask[:, 0].any()
    with pytest.raises(ConfigError, match="unsupported model file type '.h5'"):
        load_predictor(tmp_path / "model.h5")


def test_bad_inputs_are_clear_user_errors(tiny_checkpoint, tmp_path, capsys):
    def run(source: Path, output: Path | None = None) -> None:
        overrides = [f"ckpt_path={tiny_checkpoint.path}", f"input={source}", "image_size=64"]
        predict(compose_app("predict", overrides + ([f"output={output}"] if output else []), tmp_path / "run"))

    with pytest.raises(SystemExit) as exit_info:  # what main() does: one error line, exit status 2
        run_app(run, tmp_path / "missing")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: Input {tmp_path / 'missing'} does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"No image files .* in \S+empty\.$"):
        run(empty)
    (empty / "TCGA_CS_4941").mkdir()  # a root of patient folders
    (empty / "TCGA_CS_4942").mkdir()
    with pytest.raises(DataError, match=r"not its 2 folder\(s\) \(TCGA_CS_4941, TCGA_CS_4942\): pass one of them, "
                                        r"e\.g\. input=\S+TCGA_CS_4941\."):
        run(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"None of the 1 input file\(s\) could be read.*1\.png"):
        run(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the folder it made for the masks goes with the failure
    with pytest.raises(ConfigError, match="is the input folder"):
        run(broken, broken)
    assert [p.name for p in broken.iterdir()] == ["1.png"]



@pytest.mark.parametrize(("app", "setting"), [
    ("predict", "tta=maybe"), ("predict", "postprocess.largest_component=nah"), ("evaluate", "tta=1"),
    ("calibrate", "tta=nope"), ("export", "verify=perhaps"), ("cascade", "flips=perhaps"),
])
def test_a_true_or_false_setting_given_anything_else_is_one_error_naming_it(tiny_checkpoint, tmp_path, capsys,
                                                                              app, setting):
    """``bool("maybe")`` is true: each app refuses such a value before it does any work, with exit status 2."""
    import importlib

    run = getattr(importlib.import_module(f"bts_lightning.{app}"), app)
    key, value = setting.split("=")
    common = {"predict": [f"input={tmp_path}", f"output={tmp_path / 'out'}"], "evaluate": [], "calibrate": [],
              "export": [f"output={tmp_path / 'model.onnx'}"],
              "cascade": [f"segmentation={tiny_checkpoint.path}", f"presence={tiny_checkpoint.path}"]}[app]
    overrides = [*([] if app == "cascade" else [f"ckpt_path={tiny_checkpoint.path}"]), *common, setting]
    cfg = compose_app(app, overrides, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_app(run, *((cfg,) if app in ("predict", "export") else (cfg, overrides)))
    assert exit_info.value.code == 2
    shown = value if value.isdigit() else f'"{value}"'  # as parsed: the number 1, the string "maybe"
    assert capsys.readouterr().err == f"error: {key}={shown} is not true or false; pass {key}=true or {key}=false.\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(("app", "setting", "message"), [
    ("predict", "treshold=0.3", "treshold=0.3: treshold is not a setting of predict (did you mean threshold?)"),
    ("predict", "+treshold=0.3", "+treshold=0.3: treshold is not a setting of predict (did you mean threshold?)"),
    ("report", "dir=runs", "dir=runs: dir is not a setting of report (did you mean dirs?). Its settings: dirs, out,"),
    ("predict", "input=Ünï dir/a.png", ("input=Ünï dir/a.png cannot be read as an override: a value with non-ASCII "
                                       "letters, '=', commas, brackets or quotes needs quotes inside the argument, e.g. "
                                       "\"input='Ünï dir/a.png'\" (the outer ones for the shell).")),
])
def test_a_misspelled_setting_is_one_error_with_the_likely_key(tmp_path, app, setting, message):
    """Hydra would say "use +treshold=0.3", which then runs with the threshold it was meant to change."""
    result = run_cli([f"bts_lightning.{app}", setting], cwd=tmp_path, timeout=120)
    assert assert_one_error_line(result, message).startswith(f"error: {message}")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("app", "setting", "message"), [
    ("predict", "threshold=abc", 'threshold="abc" is not a number'),
    ("calibrate", "threshold=null", "threshold=null is not a number"),  # predict's: the decision's, else 0.5
    ("predict", "postprocess.min_size=2.5", "postprocess.min_size=2.5 is not a whole number"),
    ("predict", "batch_size=0", "batch_size=0 must be >= 1"),
    ("predict", "image_size=abc", 'image_size="abc" is not a whole number'),
    ("predict", "scan_context=bogus", "scan_context=bogus must be auto"),
    ("evaluate", "worst_k=many", 'worst_k="many" is not a whole number'),
    ("calibrate", "threshold=true", "threshold=true is not a number"),
    ("cascade", "data.batch_size=1.5", "data.batch_size=1.5 is invalid: it must be an integer"),
    ("export", "opset=x", 'opset="x" is not a whole number'),
])
def test_a_number_setting_given_anything_else_is_one_error_naming_it(tiny_checkpoint, tmp_path, capsys, app, setting,
                                                                     message):
    """``float("abc")`` is a traceback and ``int(2.5)`` is 2: each app refuses such a value, with exit status 2."""
    import importlib

    run = getattr(importlib.import_module(f"bts_lightning.{app}"), app)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "1.png"), np.full((32, 32), 100, np.uint8))
    common = {"predict": [f"input={images}", f"output={tmp_path / 'out'}"], "evaluate": [], "calibrate": [],
              "export": [f"output={tmp_path / 'model.onnx'}"],
              "cascade": [f"segmentation={tiny_checkpoint.path}", f"presence={tiny_checkpoint.path}"]}[app]
    overrides = [*([] if app == "cascade" else [f"ckpt_path={tiny_checkpoint.path}"]), *common,
                 *(tiny_checkpoint.data_overrides if app in ("evaluate", "calibrate", "cascade") else []), setting]
    cfg = compose_app(app, overrides, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_app(run, *((cfg,) if app in ("predict", "export") else (cfg, overrides)))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.onnx").exists()


def test_true_or_false_settings_of_the_data_and_the_module_are_checked(tmp_path):
    from hydra.utils import instantiate

    from bts_lightning.train import build_module, train
    from tests.conftest import compose_train

    for setting in ("data.cache=nah", "data.download=1"):
        with pytest.raises(Exception) as info:  # Hydra wraps it; the apps report the ConfigError inside
            instantiate(compose_train([setting], tmp_path).data)
        error = user_error_of(info.value)
        assert isinstance(error, ConfigError) and f"{setting.split('=')[0]}=" in str(error), info.value
        assert "must be true or false" in str(error)
    with pytest.raises(ConfigError, match=r"model.compile='nah' must be true or false"):
        build_module(compose_train(["model.compile=nah"], tmp_path))
    with pytest.raises(ConfigError, match=r'test="nah" is not true or false'):  # before any data is read
        train(compose_train(["test=nah", f"data.root={tmp_path / 'missing'}"], tmp_path))


def test_predict_from_a_real_torchscript_export_matches_the_checkpoint(tiny_checkpoint, tmp_path):
    export = pytest.importorskip("bts_lightning.export")
    from bts_lightning.checkpoint import load_module

    exported = export.export_model(load_module(tiny_checkpoint.path), tmp_path / "model.ts", "torchscript", 64)
    slice_image = cv2.imread(str(next(tiny_checkpoint.data_dir.rglob("images/*.png"))), cv2.IMREAD_GRAYSCALE)
    source = tmp_path / "in"
    source.mkdir()
    cv2.imwrite(str(source / "s.png"), cv2.resize(slice_image, (96, 80)))
    masks = {}
    for model in (tiny_checkpoint.path, exported):
        out = tmp_path / model.suffix.lstrip(".")
        predict(compose_app("predict", [f"ckpt_path={model}", f"input={source}", f"output={out}", "image_size=64",
                                        "device=cpu"], tmp_path / "run"))
        masks[model.suffix] = cv2.imread(str(out / "s_mask.png"), cv2.IMREAD_UNCHANGED)
    assert masks[".ts"].shape == (80, 96)
    assert (masks[".ts"] != masks[".ckpt"]).mean() < 0.001  # same network, up to float rounding at the threshold


def test_predict_on_an_export_copied_away_from_its_run_uses_the_trained_size(tiny_checkpoint, tmp_path, caplog):
    """The tiny checkpoint was trained at 64 px (predict's fallback is 256): the exported file says so."""
    export = pytest.importorskip("bts_lightning.export")
    pytest.importorskip("onnxruntime")
    checkpoint = load_predictor(tiny_checkpoint.path, "cpu")
    assert checkpoint.contract.image_size == 64 and checkpoint.contract.model == "unet"
    exported = export.export_model(checkpoint.module, tmp_path / "export" / "model.onnx", "onnx", 64,
                                   contract=checkpoint.contract)
    moved = tmp_path / "somewhere" / "else" / "model.onnx"  # no run directory, no .hydra, no checkpoint near it
    moved.parent.mkdir(parents=True)
    shutil.move(exported, moved)
    source = tmp_path / "in"
    source.mkdir()
    cv2.imwrite(str(source / "s.png"), np.zeros((100, 90), np.uint8))

    def run(*overrides: str) -> dict:
        out = tmp_path / f"out{len(overrides)}"
        return predict(compose_app("predict", [f"ckpt_path={moved}", f"input={source}", f"output={out}",
                                               "device=cpu", *overrides], tmp_path / "run"))

    with caplog.at_level(logging.INFO, logger="bts_lightning.predict"):
        assert run()["image_size"] == 64
    assert "Network input size 64 px (the size it was trained at)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bts_lightning.predict"):
        assert run("image_size=32")["image_size"] == 32  # an explicit size still wins, with a warning
    assert "trained at 64 px but image_size=32" in caplog.text


def test_image_sizes_the_network_cannot_take_are_config_errors(tiny_checkpoint, tmp_path, capfd):
    source = tmp_path / "in"
    source.mkdir()
    cv2.imwrite(str(source / "s.png"), np.zeros((64, 64), np.uint8))

    def run(model: Path, size: int) -> None:
        overrides = [f"ckpt_path={model}", f"input={source}", f"image_size={size}", f"output={tmp_path / 'out'}"]
        predict(compose_app("predict", overrides, tmp_path / "run"))

    with pytest.raises(ConfigError, match=r"image_size=13 must be a whole number of pixels >= 32"):
        run(tiny_checkpoint.path, 13)
    # The tiny U-Net has strides [2, 2, 2]: sides must be multiples of 8.
    with pytest.raises(ConfigError, match=r"image_size=36 is not a multiple of 8.*image_size=32 or 40"):
        run(tiny_checkpoint.path, 36)
    export = pytest.importorskip("bts_lightning.export")
    from bts_lightning.checkpoint import load_module

    exported = export.export_model(load_module(tiny_checkpoint.path), tmp_path / "model.ts", "torchscript", 64)
    with pytest.raises(ConfigError, match=r"image_size=36: the model cannot run on 36x36 slices"):
        run(exported, 36)
    pytest.importorskip("onnxruntime")
    exported = export.export_model(load_module(tiny_checkpoint.path), tmp_path / "model.onnx", "onnx", 64)
    capfd.readouterr()
    with pytest.raises(ConfigError, match=r"image_size=36: the model cannot run on 36x36 slices \(Fail: "):
        run(exported, 36)
    assert "onnxruntime" not in capfd.readouterr().err  # said once, in the error; not logged by onnxruntime too
    assert not (tmp_path / "out").exists()


def test_a_folder_is_listed_in_slice_order(tmp_path):
    """Numbers that names end with compare as numbers, so a scan's slices come in order; other files are skipped."""
    names = ["scan_10.png", "scan_2.png", "scan_1.tif", "b.png", "10.png", "2.png", "notes.txt", ".hidden.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in list_inputs(tmp_path)] == ["2.png", "10.png", "b.png", "scan_1.tif", "scan_2.png",
                                                            "scan_10.png"]



def test_the_masks_in_a_patient_folder_are_not_segmented(tmp_path, caplog):
    """An LGG patient folder holds each slice's mask beside it; a file named like a mask without its image stays."""
    for name in ["P_1.tif", "P_1_mask.tif", "P_2.tif", "P_2_mask.tif", "lone_mask.png"]:
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.INFO):
        assert [path.name for path in list_inputs(tmp_path)] == ["P_1.tif", "P_2.tif", "lone_mask.png"]
    assert "Left out 2 mask file(s)" in caplog.text


def test_figshare_slice_files_are_inputs_like_their_images(tiny_checkpoint, tmp_path, caplog):
    """A model trained with data=figshare_mat predicts on the release's own N.mat files (cjdata.image, scaled as in
    training): the same mask as for that image saved as a PNG; cvind.mat in the folder is no input."""
    from bts_lightning.visualize import to_uint8
    from tests.test_layouts import release_slice, write_v73_slice

    release, pngs = tmp_path / "release", tmp_path / "pngs"
    release.mkdir()
    pngs.mkdir()
    for index in (1, 2):
        image, mask = release_slice(index, height=64, width=64)
        write_v73_slice(release / f"{index}.mat", image, mask, 1, "MR001")
        cv2.imwrite(str(pngs / f"{index}.png"), to_uint8(image))
    (release / "cvind.mat").write_bytes(b"not a slice")
    (release / "3.mat").write_bytes(b"not a slice either")
    assert [path.name for path in list_inputs(release)] == ["1.mat", "2.mat", "3.mat"]
    for source in (release, pngs):
        predict(compose_app("predict", [f"ckpt_path={tiny_checkpoint.path}", f"input={source}",
                                        f"output={tmp_path / source.name / 'out'}"], tmp_path / source.name))
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Skipping 3.mat")]
    assert skipped == ["Skipping 3.mat: not a readable MATLAB .mat file (MATLAB v7.3/HDF5 or v5 expected): "
                       + skipped[0].split("expected): ", 1)[-1]] and "release" not in skipped[0], skipped
    for index in (1, 2):
        from_mat, from_png = (cv2.imread(str(tmp_path / name / "out" / f"{index}_mask.png"), cv2.IMREAD_UNCHANGED)
                              for name in ("release", "pngs"))
        assert from_mat is not None and from_mat.shape == (64, 64) and np.array_equal(from_mat, from_png)


def test_a_failed_rerun_leaves_the_earlier_predictions_as_they_were(tiny_checkpoint, tmp_path, monkeypatch):
    """A full disk while the second slice's overlay is written: no new mask beside the old slices.csv (each file was
    atomic, but the folder mixed two runs); a first run that fails leaves no folder."""
    from bts_lightning import runtime

    slice_image = cv2.imread(str(next((tiny_checkpoint.data_dir).rglob("images/*.png"))), cv2.IMREAD_GRAYSCALE)
    source = tmp_path / "input"
    source.mkdir()
    for number in (1, 2):
        assert cv2.imwrite(str(source / f"{number}.png"), slice_image)
    out = tmp_path / "out"
    settings = [f"ckpt_path={tiny_checkpoint.path}", f"input={source}", f"output={out}", "image_size=64"]
    predict(compose_app("predict", settings, tmp_path / "run1"))
    before = folder_state(out)
    assert set(before) == {"1_mask.png", "1_overlay.png", "2_mask.png", "2_overlay.png", "slices.csv"}
    for number in (1, 2):  # other inputs under the same names: a rerun would replace every file
        assert cv2.imwrite(str(source / f"{number}.png"), cv2.resize(slice_image, (90, 70)))
    real_fsync = runtime._fsync

    def full_disk(path):
        if path.name.startswith(".2_overlay.png."):
            raise OSError(28, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr(runtime, "_fsync", full_disk)
    with pytest.raises(Exception, match="No space left on device"):
        predict(compose_app("predict", settings, tmp_path / "run2"))
    assert folder_state(out) == before  # no temporary file left either
    with pytest.raises(Exception, match="No space left on device"):
        predict(compose_app("predict", [*settings[:2], f"output={tmp_path / 'new'}", "image_size=64"],
                            tmp_path / "run3"))
    assert not (tmp_path / "new").exists()


def test_a_rerun_into_a_used_folder_names_the_masks_it_did_not_write(tiny_checkpoint, tmp_path, caplog):
    """Masks of an earlier run on other inputs stay in a reused output folder: the rerun says so, naming them, and
    its slices.csv lists only its own slices."""
    slice_image = cv2.imread(str(next((tiny_checkpoint.data_dir).rglob("images/*.png"))), cv2.IMREAD_GRAYSCALE)
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    for folder, names in ((first, ("a", "b")), (second, ("a",))):
        folder.mkdir()
        for name in names:
            assert cv2.imwrite(str(folder / f"{name}.png"), slice_image)
    for number, source in enumerate((first, second)):
        caplog.clear()
        predict(compose_app("predict", [f"ckpt_path={tiny_checkpoint.path}", f"input={source}", f"output={out}",
                                        "image_size=64"], tmp_path / f"run{number}"))
    assert f"{out} also holds 1 mask(s) this run did not write (an earlier run's, e.g. b_mask.png); slices.csv " \
           "lists this run's slices" in caplog.text
    with open(out / "slices.csv", newline="") as handle:
        assert [row["mask"] for row in csv.DictReader(handle)] == ["a_mask.png"]
    caplog.clear()
    predict(compose_app("predict", [f"ckpt_path={tiny_checkpoint.path}", f"input={first}", f"output={out}",
                                    "image_size=64"], tmp_path / "run2"))
    assert "this run did not write" not in caplog.text  # every mask there is this run's again
