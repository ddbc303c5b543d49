"""The Gradio demo, driven through its API in-process: same masks as predict, clear messages for bad uploads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bts_lightning.data.io import read_channels
from bts_lightning.demo import (
    PROBABILITY_LABEL,
    area_text,
    build_demo,
    demo,
    example_slices,
    keep_newest,
    probability_colours,
)
from bts_lightning.errors import ConfigError
from bts_lightning.inference import InferenceOptions, load_predictor
from bts_lightning.predict import predict, segment
from tests import fixtures_checkpoint
from tests.conftest import free_port
from tests.fixtures_checkpoint import compose_app

tiny_checkpoint = fixtures_checkpoint.tiny_checkpoint  # the pytest fixture, requested by name below


@pytest.fixture(scope="module")
def gradio_client():
    pytest.importorskip("gradio")
    return pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory, gradio_client):
    examples = example_slices(tmp_path_factory.mktemp("examples"))
    masks = tmp_path_factory.mktemp("demo") / "masks"
    page = build_demo(load_predictor(tiny_checkpoint.path, "cpu"), InferenceOptions(), masks, examples,
                      keep_masks=2)
    page.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(page.local_url, verbose=False)
        client.mask_dir = masks
        yield client
    finally:
        page.close()


def slice_file(tiny_checkpoint, folder, size=(90, 70), depth=np.uint16):
    """A 16-bit slice of the training data, at another size than the network's."""
    image = cv2.imread(str(min(tiny_checkpoint.data_dir.rglob("images/*.png"))), cv2.IMREAD_GRAYSCALE)
    path = folder / "slice.png"
    cv2.imwrite(str(path), cv2.resize(image, size).astype(depth) * 257)
    return path


def test_the_page_returns_predicts_mask_and_area(client, gradio_client, tiny_checkpoint, tmp_path):
    image = slice_file(tiny_checkpoint, tmp_path)
    ((probability, _),) = segment(load_predictor(tiny_checkpoint.path, "cpu"), [read_channels(image, None)], 64,
                                  InferenceOptions(tta=True))
    threshold = round(float(np.median(probability)), 4)  # a partial mask, whatever the 1-epoch model learnt
    options = [f"threshold={threshold}", "tta=true", "postprocess.min_size=3"]
    predict(compose_app("predict", [f"ckpt_path={tiny_checkpoint.path}", f"input={image}",
                                    f"output={tmp_path / 'out'}", *options], tmp_path / "run"))
    expected = cv2.imread(str(tmp_path / "out" / "slice_mask.png"), cv2.IMREAD_UNCHANGED)
    overlay, probability, area, mask_file = client.predict(
        gradio_client.handle_file(str(image)), threshold, True, False, 3, api_name="/segment")
    mask = cv2.imread(mask_file, cv2.IMREAD_UNCHANGED)
    assert mask.shape == expected.shape == (70, 90) and np.array_equal(mask, expected)
    written = list(client.mask_dir.rglob("slice_mask.png"))  # the page's own copy, in the folder it was given
    assert written and all(np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), expected) for path in written)
    assert 0 < np.count_nonzero(mask) < mask.size
    assert area == area_text(expected > 0)
    assert cv2.imread(overlay).shape[:2] == cv2.imread(probability).shape[:2] == (70, 90)
    for _ in range(2):  # the page keeps the newest keep_masks=2 requests' folders
        client.predict(gradio_client.handle_file(str(image)), threshold, False, False, 0, api_name="/segment")
    assert len([path for path in client.mask_dir.iterdir() if path.is_dir()]) == 2


def write_bad_slice(path: Path, kind: str) -> Path:
    """A file ``predict`` refuses: ``pages`` a 2-page TIFF, ``nan`` a float TIFF with a NaN pixel, else the bytes."""
    if kind == "pages":
        cv2.imwritemulti(str(path), [np.full((16, 16), value, np.uint8) for value in (10, 200)])
    elif kind == "nan":
        image = np.ones((16, 16), np.float32)
        image[3, 4] = np.nan
        cv2.imwrite(str(path), image)
    else:
        path.write_bytes(kind.encode())
    return path


BAD_UPLOADS = [("bad.png", "not an image", "bad.png: not a readable image (PNG, JPEG, TIFF or BMP)."),
               ("bad.png", "", "bad.png is empty"),
               ("stack.tif", "pages", "stack.tif: holds 2 pages (a volume or a stack), not one slice"),
               ("nan.tif", "nan", "nan.tif: holds NaN or infinite pixel values.")]


@pytest.mark.parametrize(("name", "kind", "message"), BAD_UPLOADS)
def test_bad_uploads_get_one_message_naming_the_reason(client, gradio_client, tmp_path, name, kind, message):
    bad = write_bad_slice(tmp_path / name, kind)
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        client.predict(gradio_client.handle_file(str(bad)), 0.5, False, False, 0, api_name="/segment")


@pytest.mark.parametrize(("channels", "planes"), [(None, 1), ([0], 1), ([1], 3), ([0, 1, 2], 3), ([3], 4)])
def test_example_slices_have_the_channels_the_model_reads(tmp_path, channels, planes):
    examples = example_slices(tmp_path, 2, channels)
    assert len(examples) == 2
    for path in examples:
        stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert (stored.shape[2] if stored.ndim == 3 else 1) == planes
        gray = read_channels(tmp_path / "synthetic" / "images" / path.name, None)
        assert np.array_equal(read_channels(path, None if channels is None else tuple(channels)),
                              np.repeat(gray, 1 if channels is None else len(channels), axis=0))
    assert example_slices(tmp_path, 2, [4]) == []  # no PNG has a fifth plane


def test_area_text_counts_pixels_and_percent():
    mask = np.zeros((10, 20), np.uint8)
    mask[:2, :5] = 1
    assert area_text(mask) == "Tumor area: 10 px (5.00 % of the slice)"


def test_the_probability_label_names_the_colours_the_map_shows():
    """The page has no colour bar: its label names the colour of five probabilities, and they must be right."""
    pairs = re.findall(r"([a-z ]+?) ([01](?:\.\d+)?)[,)]", PROBABILITY_LABEL)
    named = {float(value): colour.strip() for colour, value in pairs}
    assert sorted(named) == [0.0, 0.25, 0.5, 0.75, 1.0]
    looks = {"black": lambda r, g, b: max(r, g, b) < 30, "purple": lambda r, g, b: min(r, b) > 2 * g,
             "red": lambda r, g, b: r > 1.5 * max(g, b), "orange": lambda r, g, b: r > g > 3 * b,
             "pale yellow": lambda r, g, b: min(r, g) > 230 and b > 100}
    for value, colour in named.items():
        r, g, b = (int(c) for c in probability_colours(np.full((1, 1), value, np.float32))[0, 0])
        assert looks[colour](r, g, b), (value, colour, (r, g, b))
    # a slice whose highest probability is 0.1 shows no colour above 0.1's (it used to be stretched to yellow)
    faint = probability_colours(np.linspace(0, 0.1, 64, dtype=np.float32).reshape(8, 8))
    assert (faint == probability_colours(np.full((1, 1), 0.1, np.float32))[0, 0]).all(axis=-1).sum() == 1
    assert faint.max() < 100


def test_missing_gradio_and_missing_model_are_config_errors(monkeypatch, tmp_path):
    cfg = compose_app("demo", [], tmp_path)
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ConfigError, match=r"pip install 'bts_lightning\[demo\]'"):
        demo(cfg)
    monkeypatch.undo()
    pytest.importorskip("gradio")
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        demo(cfg)


def test_serving_settings_are_checked_before_the_page_starts(tiny_checkpoint, tmp_path, monkeypatch):
    """Out-of-range or taken ports, unknown hosts and sizes the network cannot take are one error naming the setting
    (they were tracebacks, or a page where every upload failed); examples=0 writes no example slices."""
    import socket

    pytest.importorskip("gradio")
    launched = []
    monkeypatch.setattr("gradio.Blocks.launch", lambda page, **kwargs: launched.append(kwargs))
    model = f"ckpt_path={tiny_checkpoint.path}"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        cases = {f"port={taken.getsockname()[1]}": r"Cannot serve on host=127\.0\.0\.1 port=\d+ \(.*\): pass a free port",
                 "port=99999": r"port=99999 must be at most 65535",
                 "host=999.1.1.1": r"Cannot serve on host=999\.1\.1\.1 port=",
                 "image_size=70": r"image_size=70 .*multiple of",
                 "keep_masks=0": r"keep_masks"}
        for setting, message in cases.items():
            with pytest.raises(ConfigError, match=message):
                demo(compose_app("demo", [model, setting, f"port={free_port()}"] if "port" not in setting
                                 else [model, setting], tmp_path / "run"))
    assert not launched
    demo(compose_app("demo", [model, "examples=0", f"port={free_port()}"], tmp_path / "quiet"))
    assert launched and launched[0]["allowed_paths"] == [str(tmp_path / "quiet" / "masks")]
    assert not (tmp_path / "quiet" / "examples").exists()
    try:  # the IPv6 loopback, where the machine has one (it was refused: "Address family not supported")
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return
    demo(compose_app("demo", [model, "examples=0", "host=::1", f"port={free_port()}"], tmp_path / "ipv6"))
    assert launched[-1]["server_name"] == "[::1]"  # Gradio builds its URL from the name: bracketed (::1 crashed it)


def huge_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (gray, 8 bit) and which holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_huge_image_in_a_small_file_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """A few-KB PNG can hold 20000 x 20000 pixels (6.7 GB decoded): the size in its header is checked first."""
    pytest.importorskip("PIL")
    import bts_lightning.demo as demo_module

    over = tmp_path / "over.png"
    cv2.imwrite(str(over), np.zeros((4097, 4097), np.uint8))  # just over 4096² pixels, a few KB
    assert over.stat().st_size < 2**20
    monkeypatch.setattr(demo_module, "read_channels", lambda *args: pytest.fail("decoded"))
    with pytest.raises(ValueError, match=r"over.png is 4097x4097 px; the demo takes up to 16777216 pixels"):
        demo_module.analyze(None, over, InferenceOptions())
    with pytest.raises(ValueError, match=r"bomb.png holds over \d+ pixels; the demo takes up to 16777216"):
        demo_module.check_upload(huge_png_header(tmp_path / "bomb.png", 20000, 20000))
    disguised = tmp_path / "disguised.hdr"  # a format OpenCV decodes by content, Pillow cannot read: named .png
    cv2.imwrite(str(disguised), np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"^disguised.png: not a readable image \(PNG, JPEG, TIFF or BMP\)\.$"):
        demo_module.check_upload(disguised.rename(tmp_path / "disguised.png"))
    fits = tmp_path / "fits.png"
    cv2.imwrite(str(fits), np.zeros((64, 48), np.uint8))
    assert demo_module.check_upload(fits) == fits and demo_module.header_size(fits) == (48, 64)


def test_keep_newest_deletes_the_oldest_request_folders_only(tmp_path):
    """A public page keeps a bounded number of mask folders (``keep_masks``); files beside them stay."""
    import os

    for age, name in enumerate(["newest", "middle", "oldest"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "slice_mask.png").write_bytes(b"png")
        os.utime(tmp_path / name, ns=(10**18 - age * 10**9,) * 2)
    (tmp_path / "note.txt").write_text("kept")
    keep_newest(tmp_path, None)
    assert len(list(tmp_path.iterdir())) == 4
    keep_newest(tmp_path, 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["middle", "newest", "note.txt"]
    keep_newest(tmp_path, 5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["middle", "newest", "note.txt"]


def test_the_page_starts_at_any_valid_threshold_and_shows_lossless_images(tiny_checkpoint, tmp_path):
    """threshold=0.995 is valid (below 1) but was above the slider's 0.99, so every click failed; Gradio's default
    WebP images smeared the overlay's 1-px outline."""
    pytest.importorskip("gradio")
    from bts_lightning import space_app

    page = build_demo(load_predictor(tiny_checkpoint.path, "cpu"), InferenceOptions(threshold=0.995), tmp_path)
    decision = {"rule": "component_fraction", "threshold": 0.01, "pixel_threshold": 0.995}
    space = space_app.build(space_app.Model(None, 64, None, decision))
    for blocks in (page.blocks.values(), space.blocks.values()):
        (slider,) = [block for block in blocks if getattr(block, "label", None) == "Threshold"]
        assert slider.value == 0.995 <= slider.maximum
        images = [block for block in blocks if type(block).__name__ == "Image"]
        assert images and all(image.format == "png" for image in images)
