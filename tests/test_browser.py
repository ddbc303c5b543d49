"""The demo page in a real headless browser: Debian's chromium, driven by Selenium with Debian's chromedriver.

``.ci/run`` installs both with apt-get when they are missing; without them these tests skip and say
why. Nothing is ever downloaded: no ``playwright install``, no Selenium Manager (the driver and the
browser are given by path). The page is the README demo's trained checkpoint served by
``python -m bts_lightning.demo``, as a user starts it; the screenshot is left in ``test-artifacts/``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from bts_lightning.demo import area_text
from bts_lightning.predict import predict
from tests import fixtures_demo
from tests.conftest import REPO_ROOT, compose_app, free_port, wait_until_served

readme_demo = fixtures_demo.readme_demo  # the pytest fixture, requested by name below
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="Debian's chromium and chromedriver are not installed: apt-get install -y "
                              "--no-install-recommends chromium chromium-driver (.ci/run does it when apt works)"),
]
WAIT_S = 120


def served_page(ckpt: Path, run_dir: Path) -> Iterator[str]:
    """Start ``python -m bts_lightning.demo ckpt_path=CKPT`` on a free port; yield its URL once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "GRADIO_ANALYTICS_ENABLED": "0"}
    log = (run_dir.parent / "demo_app.log").open("w")
    app = subprocess.Popen([sys.executable, "-m", "bts_lightning.demo", f"ckpt_path={ckpt}", f"port={port}",
                            f"hydra.run.dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir.parent)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, app, run_dir.parent / "demo_app.log", WAIT_S)
        yield url
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()


def browser() -> webdriver.Chrome:
    """Headless chromium through chromedriver, both by path (Selenium Manager never downloads anything)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1200"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def upload_and_segment(driver: webdriver.Chrome, url: str, file: Path) -> None:
    """Open the page, put ``file`` into the slice input, press Segment."""
    driver.get(url)
    inputs = WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    inputs[0].send_keys(str(file))
    WebDriverWait(driver, WAIT_S).until(  # the page lists the uploaded file (its name may wrap)
        lambda d: file.name in d.find_element(By.TAG_NAME, "body").text.replace("\n", ""))
    segment = WebDriverWait(driver, WAIT_S).until(  # the page may still be drawing its buttons
        lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Segment"), None))
    segment.click()


def shown_area(driver: webdriver.Chrome) -> str | bool:
    """The area text the page shows, or False while there is none."""
    values = [box.get_attribute("value") or "" for box in driver.find_elements(By.TAG_NAME, "textarea")]
    return next((value for value in values if value.startswith("Tumor area")), False)


def held_out_slice(data_dir: Path) -> Path:
    """The test-fold slice (fold 2 in experiment=demo) with the largest tumor: a clear, unseen example."""
    root = next(data_dir.glob("synthetic/*/metadata.csv")).parent
    with open(root / "metadata.csv", newline="") as handle:
        stems = [row["index"] for row in csv.DictReader(handle) if row["fold"] == "2"]
    return max((root / "images" / f"{stem}.png" for stem in stems),
               key=lambda path: np.count_nonzero(cv2.imread(str(path.parent.parent / "masks" / path.name), 0)))


@pytest.fixture(scope="module")
def page(readme_demo, tmp_path_factory) -> Iterator[str]:
    assert readme_demo.result.returncode == 0, readme_demo.result.stderr[-3000:]
    yield from served_page(readme_demo.checkpoint, tmp_path_factory.mktemp("browser") / "demo_run")


def test_browser_segments_an_uploaded_slice_like_predict(page, readme_demo, tmp_path):
    image = tmp_path / "held_out_slice.png"  # a name the page shows nowhere else
    shutil.copyfile(held_out_slice(readme_demo.data_dir), image)
    predict(compose_app("predict", [f"ckpt_path={readme_demo.checkpoint}", f"input={image}",
                                    f"output={tmp_path / 'out'}"], tmp_path / "predict_run"))
    expected = cv2.imread(str(tmp_path / "out" / f"{image.stem}_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert 0 < np.count_nonzero(expected) < expected.size

    driver = browser()
    try:
        upload_and_segment(driver, page, image)
        assert WebDriverWait(driver, WAIT_S).until(shown_area) == area_text(expected)
        shown = [img for img in driver.find_elements(By.TAG_NAME, "img")
                 if driver.execute_script("return arguments[0].naturalWidth", img) == expected.shape[1]]
        assert len(shown) >= 2, "the overlay and the probability map are not displayed at the slice's size"
        fixtures_demo.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(fixtures_demo.ARTIFACTS / "demo_page.png"))
    finally:
        driver.quit()


def test_browser_shows_one_message_for_a_file_that_is_not_an_image(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    driver = browser()
    try:
        upload_and_segment(driver, page, bad)
        WebDriverWait(driver, WAIT_S).until(
            lambda d: "notes.png: not a readable image" in d.find_element(By.TAG_NAME, "body").text)
        assert shown_area(driver) is False and "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
