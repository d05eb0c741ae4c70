"""``loraflow demo`` serves a page that renders base model and LoRA side by side: checked in
a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium),
and the two images are the ones ``generate`` gives for the same arguments.

Without Chromium the browser test skips, except where ``LORAFLOW_REQUIRE_BROWSER`` is set
(``.ci/run`` sets it, after installing Chromium). Set ``LORAFLOW_DEMO_SCREENSHOT=file.png``
to keep the browser's screenshot of the page after a generation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from engine.infer.demo import SideBySide
from engine.infer.generate import generate_images
from flows.cli.main import main
from tests.engine.lora.test_formats import make_lora

ROOT = Path(__file__).resolve().parents[3]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROMPT = "a blue square"
SERVER_START_S = 45  # streamlit up and answering its health check
RENDER_S = 60  # page opened, model loaded, two images rendered


@pytest.fixture(scope="module")
def lora_file(tiny_sd1: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("demo") / "shapes_lora.safetensors"
    path.write_bytes(make_lora(tiny_sd1, "sd1", text_encoders=True).diffusers_bytes)
    return str(path)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# -- what the page renders -------------------------------------------------------------


def test_the_pair_is_what_generate_gives_with_and_without_the_lora(
    tiny_sd1: str, lora_file: str
):
    pair = SideBySide(tiny_sd1, lora_file).render(
        PROMPT, negative_prompt="blurry", seed=5, steps=2, lora_scale=0.7
    )
    options = {"seed": 5, "steps": 2, "negative_prompt": "blurry"}
    base = generate_images(tiny_sd1, None, PROMPT, **options)[0]
    with_lora = generate_images(tiny_sd1, lora_file, PROMPT, lora_scale=0.7, **options)[0]
    assert np.array_equal(pixels(pair.base), pixels(base))
    assert np.array_equal(pixels(pair.lora), pixels(with_lora))
    assert np.abs(pixels(pair.lora) - pixels(pair.base)).max() > 10
    assert pair.base.info["parameters"] == base.info["parameters"]
    assert pair.lora.info["parameters"] == with_lora.info["parameters"]


def test_a_pickle_lora_is_refused_before_the_server_starts(
    tmp_path: Path, tiny_sd1: str, capsys: pytest.CaptureFixture
):
    pickle_file = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    assert main(["demo", "--model", tiny_sd1, "--lora", str(pickle_file)]) == 2
    assert "never unpickled" in capsys.readouterr().err


def test_the_page_imports_no_prefect():
    code = ("import sys, engine.infer.demo_page; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- in a real browser -----------------------------------------------------------------


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) from the system's packages, or None."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def demo_server(tiny_sd1: str, lora_file: str, tmp_path: Path) -> Iterator[str]:
    """``loraflow demo`` on a free loopback port; its URL. Stopped (and reaped) after."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "flows.cli", "demo", "--model", tiny_sd1,
               "--lora", lora_file, "--host", "127.0.0.1", "--port", str(port), "--steps", "3"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or answers(f"{url}/_stcore/health"),
                 SERVER_START_S, "the demo server to answer")
        if server.poll() is not None:
            pytest.fail(f"the demo server exited: {(tmp_path / 'server.log').read_text()}")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group of the process started above
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    found = find_chromium()
    if found is None:
        why = "no Chromium and chromedriver on PATH: apt-get install chromium chromium-driver"
        if os.environ.get("LORAFLOW_REQUIRE_BROWSER"):  # set by .ci/run, which installs them
            pytest.fail(why)
        pytest.skip(why)
    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.timeout(180)
def test_the_page_renders_base_and_lora_in_a_real_browser(
    demo_server: str, browser: WebDriver, tmp_path: Path
):
    browser.get(demo_server)
    wait = WebDriverWait(browser, RENDER_S)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[aria-label='Prompt']"))
    prompt.send_keys(Keys.CONTROL, "a")  # replace the default prompt (clear() does not
    prompt.send_keys(PROMPT)             # reach streamlit's React state)
    browser.find_element(By.XPATH, "//button[.//*[normalize-space()='Generate']]").click()

    def shown(alt: str) -> bool:
        images = browser.find_elements(By.CSS_SELECTOR, f"img[alt='{alt}']")
        return bool(images) and browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", images[0]
        ) == 64
    wait.until(lambda _: shown("base model image") and shown("LoRA image"))

    base, lora = (browser.find_element(By.CSS_SELECTOR, f"img[alt='{alt}']")
                  for alt in ("base model image", "LoRA image"))
    assert base.get_attribute("src") != lora.get_attribute("src")  # two different PNGs
    lines = browser.find_element(By.TAG_NAME, "body").text.splitlines()
    assert PROMPT in lines  # the base image's parameters: its prompt line, no LoRA
    assert f"{PROMPT} <lora:shapes_lora:1>" in lines  # the LoRA image's
    assert sum("Steps: 3" in line and "Seed: 0," in line for line in lines) == 2
    screenshot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(screenshot))
    if target := os.environ.get("LORAFLOW_DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, target)
