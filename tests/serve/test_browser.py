"""End to end in a real browser: headless Chromium uploads a phantom image to a running demo
server, waits for the segmentation overlay and reads the diagnosis table. The screenshot is
kept in ``test-artifacts/demo.png`` (or ``$MEDALIGN_TEST_ARTIFACTS``).

Needs Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/run``); skipped without
them on a developer machine, but a failure under CI, where they must be present.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from medalign.serve.app import create_app  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MEDALIGN_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.usefixtures("one_thread")


def _need_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    message = "Debian chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must install them (.ci/run)")
    pytest.skip(message)


@pytest.fixture
def server_url(demo_service, tmp_path: Path) -> Iterator[str]:
    yield from _serve(demo_service, tmp_path)


@pytest.fixture
def stacked_server_url(stacked_service, tmp_path: Path) -> Iterator[str]:
    yield from _serve(stacked_service, tmp_path)


def _serve(service, tmp_path: Path) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, temp_root=tmp_path), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the demo server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def browser(tmp_path: Path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_shows_overlay_diagnosis_and_similar_cases(server_url: str, browser, demo_files) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url)
    wait = WebDriverWait(browser, 60)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#models li")))
    browser.find_element(By.ID, "image").send_keys(str(demo_files["image"]))
    browser.find_element(By.ID, "run").click()
    overlay = wait.until(ready.visibility_of_element_located((By.ID, "overlay")))
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 64  # source size kept
    rows = browser.find_elements(By.CSS_SELECTOR, "#diagnosis tr")
    assert sorted(r.get_attribute("data-label") for r in rows) == ["benign", "malignant", "normal"]
    shown = [float(r.find_element(By.CSS_SELECTOR, "td.p").text.rstrip("%")) for r in rows]
    assert abs(sum(shown) - 100) < 0.5 and shown == sorted(shown, reverse=True)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#similar .case")) == 5
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
    assert browser.find_element(By.ID, "error").text == ""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "demo.png"))

    # a non-image upload ends in the page's error line, not a broken page
    bad = Path(demo_files["image"]).with_name("notes.png")
    bad.write_text("not an image")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error")
    assert "'notes.png': not an image" in browser.find_element(By.ID, "error").text


def test_two_modalities_need_two_uploads_and_the_answers_name_them(stacked_server_url: str, browser, demo_files) -> None:
    """A bundle trained on a + b stacked: the page asks for each; a alone is refused naming b."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(stacked_server_url)
    wait = WebDriverWait(browser, 60)
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#models li")))
    uploads = [e.get_attribute("name") for e in browser.find_elements(By.CSS_SELECTOR, "input[type=file]")]
    assert uploads == ["image:a", "image:b"]  # one per modality; no plain image a bundle would repeat
    assert "takes modalities a + b stacked" in browser.find_element(By.ID, "models").text

    browser.find_element(By.ID, "image:a").send_keys(str(demo_files["image"]))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error")
    error = browser.find_element(By.ID, "error").text
    assert "'b' is missing" in error and "--image a=FILE --image b=FILE" in error

    browser.find_element(By.ID, "image:b").send_keys(str(demo_files["image_b"]))
    browser.find_element(By.ID, "run").click()
    overlay = wait.until(ready.visibility_of_element_located((By.ID, "overlay")))
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
    used = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".inputs-used")]
    assert used and all(text == "inputs: image:a + image:b" for text in used), used
    assert len(browser.find_elements(By.CSS_SELECTOR, "#similar .case")) == 5
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "demo_two_modalities.png"))
