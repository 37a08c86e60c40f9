"""The page at ``/`` in a real browser: Debian's chromium and chromium-driver through selenium.

It uploads an image, asks a question and watches the answer stream in, then generates images
and sees them appear with their seeds. A screenshot is saved under ``$CHEERS_TEST_ARTIFACTS``
(default ``outputs/test-artifacts``). Skips, saying why, where chromium or its driver is absent.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import LiveServer, png, talkative_checkpoint

from cheers.pipeline import Pipeline
from cheers.serve import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("CHEERS_TEST_ARTIFACTS", "outputs/test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]
KEY = "page-key"
WAIT = 60  # seconds; the CPU may be shared with other work


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver on PATH (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pipe = Pipeline.from_pretrained(talkative_checkpoint(tmp_path_factory.mktemp("page-ckpt")))
    with LiveServer(create_app(pipe, ServeConfig(api_key=KEY, model_name="page-test"))) as live:
        yield live, pipe


def test_page_chats_with_an_image_and_generates(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live, pipe = served
    wait = WebDriverWait(browser, WAIT)
    browser.get(live.url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "page-test" in browser.find_element(By.ID, "model-name").text
    browser.find_element(By.ID, "api-key").send_keys(KEY)  # shown because the server wants a key

    image = tmp_path / "red.png"
    image.write_bytes(png((220, 30, 30)))
    browser.find_element(By.ID, "chat-file").send_keys(str(image))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-attachments img")) == 1)
    browser.execute_script(
        "window.pieces = 0; new MutationObserver((m) => { window.pieces += m.length; })"
        ".observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});")
    browser.find_element(By.ID, "chat-input").send_keys("What colour is the circle?")
    browser.find_element(By.ID, "chat-send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant.done .text"))
    want = pipe.understand(Image.open(io.BytesIO(image.read_bytes())), "What colour is the circle?", max_new_tokens=64)
    assert answer.get_attribute("textContent") == want
    assert browser.execute_script("return window.pieces") > 3  # the answer grew piece by piece
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user img")  # the uploaded image is in the chat

    browser.find_element(By.ID, "gen-prompt").send_keys("a photo of a red circle")
    for field, value in (("gen-n", "3"), ("gen-seed", "5"), ("gen-steps", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "gen-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gen-grid figure img")) == 3)
    images = browser.find_elements(By.CSS_SELECTOR, "#gen-grid figure img")
    wait.until(lambda d: all(d.execute_script("return arguments[0].naturalWidth", im) == 64 for im in images))
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gen-grid figcaption")]
    assert captions == ["seed 5", "seed 6", "seed 7"]
    assert browser.find_element(By.ID, "status").text == ""

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors
