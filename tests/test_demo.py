"""The live demo in a real browser: headless Chromium types a prompt and the one-step image follows."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_student(tmp_path_factory) -> Path:
    """The digits teacher's UNet as a one-step student (its initialisation), exported like a trained one."""
    from students import OneStepGANPipeline, UNetStudent
    from students.export import save_standalone
    from teachers import load_teacher

    teacher = load_teacher(str(ROOT / "teachers" / "assets" / "digits-teacher")).pipe
    pipe = OneStepGANPipeline(
        student=UNetStudent.from_teacher(teacher.unet, teacher.scheduler),
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
    )
    return save_standalone(pipe, tmp_path_factory.mktemp("demo") / "pipeline")


def test_demo_without_a_student_tells_the_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "distill.demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: no student at runs/quickstart/student/pipeline: make the digits one with `bash "
        "distill/digits/quickstart.sh` "
        "(about 13 min on 2 CPU cores), or pass --pipeline DIR (a train_student.py output_dir/pipeline)"
    )


def _png(driver, element_id: str) -> bytes | None:
    """The bytes of the image shown in ``#element_id`` (a served file or a data URL), None while there is none."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    src = found[0].get_attribute("src") if found else None
    if not src:
        return None
    if src.startswith("data:"):
        return base64.b64decode(src.split(",", 1)[1])
    with urllib.request.urlopen(src, timeout=30) as response:
        return response.read()


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver)",
)
def test_demo_image_follows_the_prompt_in_a_browser(digits_student, tmp_path):
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
    pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[dev]'")
    import numpy as np
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
    )
    log = open(tmp_path / "demo.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.demo",
            "--pipeline",
            str(digits_student),
            "--port",
            str(port),
            "--teacher",
            str(ROOT / "teachers" / "assets" / "digits-teacher"),
            "--teacher_steps",
            "3",
            "--prompt",
            "a handwritten digit zero",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"

        def up():
            if server.poll() is not None:
                raise AssertionError(f"the demo exited: {(tmp_path / 'demo.log').read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(url, timeout=5).status == 200
            except OSError:
                return False

        _wait(up, 180, "the demo server")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--window-size=1280,1000",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.get(url)
        first = _wait(lambda: _png(driver, "student"), 120, "the first image (page load)")

        box = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 30, "the prompt box")[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("a handwritten digit seven")  # one keystroke at a time: the debounce keeps the newest
        second = _wait(lambda: (png := _png(driver, "student")) != first and png, 120, "the image to change")
        for png in (first, second):
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            with Image.open(io.BytesIO(png)) as image:
                assert image.format == "PNG" and image.size == (32, 32)  # the student's 32 px digits
        a, b = (np.asarray(Image.open(io.BytesIO(p)).convert("L"), dtype=float) for p in (first, second))
        assert np.abs(a - b).mean() > 1.0  # another digit, not a re-encode of the same picture
        assert "one-step student:" in driver.find_element(By.ID, "timing").text

        driver.find_element(By.CSS_SELECTOR, "#compare input").click()  # the teacher beside, same noise
        teacher = _wait(lambda: _png(driver, "teacher"), 120, "the teacher's image")
        with Image.open(io.BytesIO(teacher)) as image:
            assert image.size == (32, 32)
        _wait(lambda: "teacher (3 steps)" in driver.find_element(By.ID, "timing").text, 60, "the teacher's time")
        driver.save_screenshot(str(tmp_path / "demo.png"))
        assert (tmp_path / "demo.png").stat().st_size > 0
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
