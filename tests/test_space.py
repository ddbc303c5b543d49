"""The Space bundle: its app.py runs without PyTorch and gives predict's masks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from bts_lightning.data.io import UnreadableImageError, read_channels
from bts_lightning.errors import ConfigError
from bts_lightning.export import export
from bts_lightning.predict import predict
from tests import fixtures_checkpoint
from tests.fixtures_checkpoint import compose_app
from tests.test_demo import BAD_UPLOADS, write_bad_slice

pytest.importorskip("onnxruntime")
pytest.importorskip("gradio")
tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below

# Runs app.py's segment on argv[2] with argv[3] = JSON options, writes the mask to argv[4], prints the area.
SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import cv2, app
model = app.Model.load()
overlay, mask, area = app.segment(model, sys.argv[2], **json.loads(sys.argv[3]))
cv2.imwrite(sys.argv[4], mask)
app.build(model)  # the page builds too
open(sys.argv[4] + ".txt", "w").write("not an image")
try:
    app.segment(model, sys.argv[4] + ".txt")
    raise SystemExit("a text file was segmented")
except ValueError as error:
    assert "not a readable image" in str(error), error
assert "torch" not in sys.modules and "bts_lightning" not in sys.modules, sorted(sys.modules)
print(area)
"""


@pytest.mark.parametrize("tta", [False, True])
def test_space_app_gives_predicts_mask_without_torch(tiny_checkpoint, tmp_path, tta):
    bundle = tmp_path / "space"
    export(compose_app("export", [f"ckpt_path={tiny_checkpoint.path}", "format=space", f"output={bundle}"],
                       tmp_path / "export_run"))
    assert {p.name for p in bundle.iterdir()} >= {"app.py", "requirements.txt", "README.md", "model.onnx", "examples"}
    requirements = (bundle / "requirements.txt").read_text()
    assert "torch" not in requirements and "onnxruntime" in requirements and "gradio==" in requirements
    readme = (bundle / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio\n" in readme and "app_file: app.py\n" in readme

    image = min((bundle / "examples").glob("*.png"))
    threshold = 0.5
    predict(compose_app("predict", [f"ckpt_path={bundle / 'model.onnx'}", f"input={image}", f"output={tmp_path / 'p'}",
                                    f"tta={str(tta).lower()}", "postprocess.min_size=3"], tmp_path / "run"))
    expected = cv2.imread(str(tmp_path / "p" / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    options = json.dumps({"threshold": threshold, "tta": tta, "min_size": 3})
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), str(image), options, str(tmp_path / "m.png")],
                            capture_output=True, text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    mask = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, expected) and 0 < np.count_nonzero(mask) < mask.size
    assert f"Tumor area: {np.count_nonzero(expected)} px" in result.stdout
    from bts_lightning import space_app  # its overlay is predict's too: tinted and outlined in red

    model = space_app.Model.load(bundle / "model.onnx")
    overlay, _, _ = space_app.segment(model, image, threshold, tta, False, 3)
    predicted = cv2.imread(str(tmp_path / "p" / f"{image.stem}_overlay.png"), cv2.IMREAD_COLOR)
    assert np.array_equal(overlay, cv2.cvtColor(predicted, cv2.COLOR_BGR2RGB))
    run = next(block.fn for block in space_app.build(model).fns.values() if block.api_name == "segment")
    import gradio as gr

    for threshold_, min_size in ((-1.0, 0), (1.0, 0), (0.5, -2)):  # the API is not held by the page's controls
        with pytest.raises(gr.Error, match=r"must be in \[0, 1\) and min_size=.* >= 0"):
            run(str(image), threshold_, False, False, min_size)
    (bundle / "notes.txt").write_text("a user's file")  # would be uploaded with the Space
    with pytest.raises(ConfigError, match=r"space already holds notes.txt: a Space folder is uploaded as a whole"):
        export(compose_app("export", [f"ckpt_path={tiny_checkpoint.path}", "format=space", f"output={bundle}"],
                           tmp_path / "export_again"))
    black = tmp_path / "black.png"  # a blank slice: an empty mask, as predict gives it
    cv2.imwrite(str(black), np.zeros((48, 40), np.uint8))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), str(black), options, str(tmp_path / "b.png")],
                            capture_output=True, text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "Tumor area: 0 px" in result.stdout, result.stderr[-3000:]
    assert not cv2.imread(str(tmp_path / "b.png"), cv2.IMREAD_UNCHANGED).any()


@pytest.mark.parametrize("rejected", [True, False])
def test_space_app_applies_the_models_slice_decision_as_predict(tiny_checkpoint, tmp_path, rejected):
    """The slice decision travels in the bundle's model.onnx; app.py scores the slice as predict does."""
    from bts_lightning.checkpoint import write_decision
    from bts_lightning.data.io import read_channels
    from bts_lightning.decision import SliceDecision, slice_score
    from bts_lightning.inference import InferenceOptions, load_predictor
    from bts_lightning.predict import segment

    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(tiny_checkpoint.path.read_bytes())
    plain = tmp_path / "plain"
    export(compose_app("export", [f"ckpt_path={ckpt}", "format=space", f"output={plain}"], tmp_path / "plain_run"))
    image = min((plain / "examples").glob("*.png"))
    ((probability, mask),) = segment(load_predictor(plain / "model.onnx", "cpu"), [read_channels(image, None)], 64,
                                     InferenceOptions())
    score = slice_score(probability, "component_fraction", 0.5)  # the largest blob's share of the slice
    assert 0 < score * mask.size <= np.count_nonzero(mask)
    threshold = score if rejected else score - 0.5 / mask.size  # at the score: rejected; half a pixel below: kept
    write_decision(ckpt, SliceDecision("component_fraction", threshold, 0.5, 0.05, {"split": "val"}).to_dict())
    bundle = tmp_path / "space"
    export(compose_app("export", [f"ckpt_path={ckpt}", "format=space", f"output={bundle}"], tmp_path / "export_run"))
    predict(compose_app("predict", [f"ckpt_path={bundle / 'model.onnx'}", f"input={image}", f"output={tmp_path / 'p'}"],
                        tmp_path / "run"))
    expected = cv2.imread(str(tmp_path / "p" / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), str(image), "{}", str(tmp_path / "m.png")],
                            capture_output=True, text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED), expected)
    assert (not expected.any()) == rejected
    assert ("No tumor detected (slice score" in result.stdout) == rejected


@pytest.mark.parametrize(("name", "kind", "message"), [case for case in BAD_UPLOADS if case[1]])
def test_space_app_refuses_the_files_predict_refuses(tmp_path, name, kind, message):
    from bts_lightning import space_app

    bad = write_bad_slice(tmp_path / name, kind)
    with pytest.raises(UnreadableImageError):
        read_channels(bad, None)
    with pytest.raises(ValueError, match=re.escape(message)):
        space_app.read_slice(bad, None)


def test_space_page_starts_where_the_slice_decision_was_calibrated():
    from bts_lightning import space_app

    def controls(decision: dict | None) -> dict:
        page = space_app.build(space_app.Model(None, 64, None, decision))
        return {block.label: block.value for block in page.blocks.values() if getattr(block, "label", None) in
                ("Threshold", "Flip TTA")}

    assert controls(None) == {"Threshold": 0.5, "Flip TTA": False}
    calibrated = {"rule": "component_fraction", "threshold": 0.01, "pixel_threshold": 0.3,
                  "target_false_alarm_rate": 0.05, "calibration": {"tta": True}}
    assert controls(calibrated) == {"Threshold": 0.3, "Flip TTA": True}


def test_space_app_refuses_a_huge_image_before_decoding_it(tmp_path, monkeypatch):
    from bts_lightning import space_app
    from tests.test_demo import huge_png_header

    over = tmp_path / "over.png"
    cv2.imwrite(str(over), np.zeros((4097, 4097), np.uint8))
    monkeypatch.setattr(space_app.cv2, "imdecode", lambda *args: pytest.fail("decoded"))
    with pytest.raises(ValueError, match=r"over.png is too large \(4097x4097 px; up to 16777216 pixels\)"):
        space_app.read_slice(over, None)
    with pytest.raises(ValueError, match=r"bomb.png is too large \(up to 16777216 pixels\)"):
        space_app.read_slice(huge_png_header(tmp_path / "bomb.png", 20000, 20000), None)
    disguised = tmp_path / "disguised.hdr"  # OpenCV decodes by content whatever the name; Pillow cannot read it
    cv2.imwrite(str(disguised), np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"disguised.png: not a readable image"):
        space_app.read_slice(disguised.rename(tmp_path / "disguised.png"), None)
