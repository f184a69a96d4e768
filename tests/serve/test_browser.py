"""The page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium; nothing is downloaded) talks to `omni.serve` on 127.0.0.1 through a typed question, a
picture and the microphone -- a fake one that plays a spoken question of the demo world -- and
the answers it shows, the media the model received and the audio the page played are checked."""
import importlib.util
import json
import os
import shutil
import time

import numpy as np
import pytest
import soundfile as sf

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def needs(found: bool, reason: str) -> None:
    """Skip without what the test needs; CI (.ci/run sets OMNI_BROWSER_TEST=required) fails instead."""
    if not found:
        if os.environ.get("OMNI_BROWSER_TEST") == "required":
            pytest.fail(f"OMNI_BROWSER_TEST=required, but the browser test {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


needs(CHROMIUM and CHROMEDRIVER, "needs Debian's chromium and chromium-driver (apt-get install them)")
needs(importlib.util.find_spec("selenium"), "needs selenium (pip install -e '.[dev]')")
needs(all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "python_multipart", "httpx")),
      "needs fastapi, uvicorn, python-multipart and httpx (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import load_chat, served, trained_omni  # noqa: E402

from omni import serve  # noqa: E402

RATE = 16000
LIMIT = 1 << 20        # the server's upload limit here: 1 MiB


class Heard:
    """A Chat that keeps a copy of what each turn received: text, picture bytes, recording."""

    def __init__(self, chat):
        self.chat, self.is_omni, self.sample_rate = chat, chat.is_omni, chat.sample_rate
        self.turns = []

    def talk(self, text, image_path=None, audio_path=None, speak=True):
        image = open(image_path, "rb").read() if image_path else None
        audio = sf.read(audio_path, dtype="float32") if audio_path else None
        self.turns.append({"text": text, "image": image, "audio": audio})
        return self.chat.talk(text, image_path, audio_path, speak)


def first_question(demo: str, kind: str) -> dict:
    """The first test conversation of the demo world of a kind: image_qa, speech_qa, text."""
    with open(os.path.join(demo, "sft_test.jsonl"), encoding="utf-8") as f:
        return next(r for r in map(json.loads, f) if r["kind"] == kind)


@pytest.fixture(scope="module")
def chat(trained_stages):
    return load_chat(trained_omni(trained_stages))


@pytest.fixture(scope="module")
def heard(chat):
    return Heard(chat)


@pytest.fixture(scope="module")
def page(heard):
    with served(serve.make_app(heard, max_upload_bytes=LIMIT)) as address:
        yield address


@pytest.fixture(scope="module")
def browser(page, demo_tiny):
    """Headless Chromium on the page, its microphone fed from a spoken question of the demo world."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    wav = os.path.join(demo_tiny, first_question(demo_tiny, "speech_qa")["audio"])
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(page)
        wait_for(driver, "return window.omni && window.omni.ready")
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def ask(driver, text: str = "", image: str | None = None, speak_for: float = 0.0) -> dict:
    """Ask through the page as a user would; returns the page's record of the finished turn once its
    audio has played."""
    turn = driver.execute_script("return window.omni.turns.length")
    if image:   # a file input takes a path through send_keys once it is shown
        driver.execute_script("document.getElementById('image-input').hidden = false")
        driver.find_element(By.ID, "image-input").send_keys(image)
        driver.execute_script("document.getElementById('image-input').hidden = true")
    if speak_for:
        driver.find_element(By.ID, "record").click()
        time.sleep(speak_for)
        driver.find_element(By.ID, "record").click()
        wait_for(driver, "return window.omni.recordedSamples > 0")
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait_for(driver, f"const t = window.omni.turns[{turn}]; return t && t.finished", timeout=60)
    if driver.execute_script(f"return window.omni.turns[{turn}].error"):
        return driver.execute_script(f"return window.omni.turns[{turn}]")
    wait_for(driver, "return window.omni.playedSamples === window.omni.scheduledSamples")
    return driver.execute_script(f"return window.omni.turns[{turn}]")


def assert_answered_aloud(turn: dict):
    assert turn["error"] is None and turn["figures"]["text"] == turn["answer"]
    assert turn["audioSamples"] > 0 and turn["audioSamples"] == round(turn["figures"]["audio_s"] * RATE)


def test_a_typed_question(browser, chat, heard):
    question = "what colour is grass?"
    turn = ask(browser, question)
    assert turn["answer"] == "".join(chat.answer(question)) and heard.turns[-1]["text"] == question
    assert_answered_aloud(turn)
    shown = browser.find_elements(By.CSS_SELECTOR, ".turn")[-1].text
    assert turn["answer"] in shown and "TTFA" in shown and "tokens/s" in shown and "RTF" in shown


def test_a_question_about_a_picture(browser, chat, heard, demo_tiny):
    record = first_question(demo_tiny, "image_qa")
    image, question = os.path.join(demo_tiny, record["image"]), record["conversation"][0]["content"]
    turn = ask(browser, question, image=image)
    assert turn["answer"] == "".join(chat.answer(question, image_path=image))
    assert heard.turns[-1]["image"] == open(image, "rb").read()       # the very file, through the page
    assert_answered_aloud(turn)


def test_a_spoken_question_through_the_microphone(browser, chat, heard, demo_tiny, tmp_path):
    said, rate = sf.read(os.path.join(demo_tiny, first_question(demo_tiny, "speech_qa")["audio"]), dtype="float32")
    turn = ask(browser, speak_for=len(said) / rate + 1.0)
    assert_answered_aloud(turn)
    got, got_rate = heard.turns[-1]["audio"]
    assert got_rate == RATE and got.ndim == 1 and len(said) <= len(got) <= len(said) + 2 * RATE
    # The page's 16 kHz WAV holds the question: at the best offset it matches what the microphone played.
    n = len(got) + len(said)
    lags = np.fft.irfft(np.fft.rfft(got, n) * np.conj(np.fft.rfft(said, n)), n)[:len(got) - len(said) + 1]
    at = int(np.argmax(lags))
    assert np.corrcoef(got[at:at + len(said)], said)[0, 1] > 0.9
    sf.write(tmp_path / "sent.wav", got, RATE)
    assert turn["answer"] == "".join(chat.answer("", audio_path=str(tmp_path / "sent.wav")))
    assert turn["heard"] == chat.heard and chat.heard is not None      # shown as what the model heard


def test_bad_uploads_show_a_clear_message_and_the_page_goes_on(browser, chat, tmp_path):
    fake, big = tmp_path / "holiday.png", tmp_path / "huge.png"
    fake.write_text("no picture here")
    big.write_bytes(os.urandom(LIMIT + 1000))
    for path, message in ((fake, "'holiday.png': "), (big, "the upload is over the server's limit of 1 MB")):
        turn = ask(browser, "what is this?", image=str(path))
        assert turn["error"].startswith(message) and turn["figures"] is None
        assert message in browser.find_elements(By.CSS_SELECTOR, ".turn .answer.error")[-1].text
    assert ask(browser, "what colour is grass?")["answer"] == "".join(chat.answer("what colour is grass?"))
