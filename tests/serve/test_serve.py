"""`python -m omni.serve`: the page, a streamed turn and its figures, refused uploads, the queue.

The tiny stages A-D of the session, with Stage E trained here for 8 steps; the Talker speaks through
Griffin-Lim when the session has no Stage F vocoder. Greedy, an 8-step model answers </s> at once:
the turns sample (seeded, so an answer repeats exactly) to say something."""
import base64
import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_script, write_config

for extra in ("fastapi", "uvicorn", "python_multipart"):
    pytest.importorskip(extra, reason="the page needs fastapi, uvicorn and python-multipart: "
                                      "pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (pip install -e '.[dev]')")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from omni import serve  # noqa: E402
from omni.chat import TALKER_DIR, Chat  # noqa: E402

QUESTION = "what colour is grass?"


def trained_omni(trained_stages) -> dict:
    """Chat's folders: the session's tiny Talker, and a tiny Stage E model trained for 8 steps beside
    the session's stages A-C (once per session: a second test module finds it trained)."""
    folder = Path(trained_stages["E"]["save_dir"]).parent / "serve_omni"
    if not (folder / "omni.pt").exists():
        config = {**trained_stages["E"], "save_dir": str(folder)}
        run_script("sft_omni.py", "--config", write_config(folder.parent / "serve_omni.json", config), check=True)
    vocoder = trained_stages.get("F", {}).get("save_dir")       # trained only by the tests that need one
    return {"ckpt_dir": str(folder), "talker_dir": trained_stages["D"]["save_dir"],
            "vocoder_dir": vocoder if vocoder and os.path.isdir(vocoder) else None}


def load_chat(folders: dict) -> Chat:
    return Chat(folders["ckpt_dir"], torch.device("cpu"), talker_dir=folders["talker_dir"],
                vocoder_dir=folders["vocoder_dir"], max_new_tokens=8, temperature=1.0, seed=0)


@contextlib.contextmanager
def served(app):
    """The app served by uvicorn on a free port of 127.0.0.1, in a thread; yields its address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def chat(trained_stages):
    return load_chat(trained_omni(trained_stages))


@pytest.fixture
def client(chat, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))       # where the uploads go (and must leave)
    with TestClient(serve.make_app(chat, max_upload_bytes=3 << 20)) as c:
        yield c


def events_of(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def pcm_of(event: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(event["pcm16"]), dtype="<i2")


def test_the_page_is_served_with_nothing_from_outside(client, chat):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "fetch(\"turn\"" in page.text and "AudioWorklet" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|fetch\(["']https?:""", page.text)
    assert client.get("/config").json() == {"omni": True, "sample_rate": 16000, "max_upload_bytes": 3 << 20}


def test_a_typed_turn_streams_text_and_audio_then_its_figures(client, chat):
    events = events_of(client.post("/turn", data={"text": QUESTION}))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    done, text = events[-1], "".join(e["text"] for e in events if e["type"] == "text")
    assert text == done["text"] == "".join(chat.answer(QUESTION)) and text.strip()
    audio = [e for e in events if e["type"] == "audio"]
    assert audio and all(e["sample_rate"] == 16000 and e["samples"] == len(pcm_of(e)) for e in audio)
    samples = np.concatenate([pcm_of(e) for e in audio])
    assert len(samples) == pytest.approx(done["audio_s"] * 16000, abs=1) and np.abs(samples).max() > 100
    assert done["tokens"] > 0 and done["tokens_per_s"] > 0 and 0 < done["ttfa_s"] <= done["seconds"]
    assert 0 < done["rtf"] * done["audio_s"] <= done["seconds"] and 0 < done["first_text_s"] <= done["seconds"]
    quiet = events_of(client.post("/turn", data={"text": QUESTION, "speak": "false"}))
    assert [e["type"] for e in quiet if e["type"] == "audio"] == [] and quiet[-1]["text"] == text


def test_bad_and_large_uploads_are_refused_clearly_and_the_server_goes_on(client, chat, tmp_path):
    def refused(files, status):
        response = client.post("/turn", data={"text": "what is this?"}, files=files)
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert refused({"image": ("cat.png", b"this is no picture", "image/png")}, 400).startswith("'cat.png': ")
    assert refused({"audio": ("q.wav", b"RIFF\x00\x00 damaged", "audio/wav")}, 400).startswith("'q.wav': ")
    long = tmp_path / "long.flac"
    sf.write(long, 0.1 * np.sin(np.arange(16000 * 60) / 8), 16000)     # a minute: more than the model can hear
    message = refused({"audio": ("long.flac", long.read_bytes(), "audio/flac")}, 400)
    assert re.match(r"'long\.flac': (60\.0 s is longer than max_seconds|the prompt takes \d+ positions)", message)
    big = {"image": ("big.png", b"\0" * (4 << 20), "image/png")}
    assert refused(big, 413) == "the upload is over the server's limit of 3 MB"
    form = {"content-type": "multipart/form-data; boundary=x"}
    chunked = client.post("/turn", content=iter([b"--x--"]), headers=form)
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]     # a length it cannot know
    assert [p for p in os.listdir(tmp_path) if p.startswith("omni_turn_")] == []      # uploads were deleted
    assert events_of(client.post("/turn", data={"text": QUESTION}))[-1]["text"] == "".join(chat.answer(QUESTION))


class Watched:
    """A Chat whose turns note when they run, each event a little slower so that overlaps would show."""

    def __init__(self, chat):
        self.chat, self.is_omni, self.sample_rate = chat, chat.is_omni, chat.sample_rate
        self.running, self.most, self.spans = 0, 0, []

    def talk(self, *args, **kwargs):
        start = time.perf_counter()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for event in self.chat.talk(*args, **kwargs):
                time.sleep(0.05)
                yield event
        finally:
            self.running -= 1
            self.spans.append((start, time.perf_counter()))


def test_two_turns_at_once_run_one_after_the_other(chat):
    watched = Watched(chat)
    answers = []
    with TestClient(serve.make_app(watched)) as client:
        def ask():
            answers.append(events_of(client.post("/turn", data={"text": QUESTION}))[-1]["text"])
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert answers == ["".join(chat.answer(QUESTION))] * 2
    (_, first_end), (second_start, _) = sorted(watched.spans)
    assert watched.most == 1 and second_start >= first_end


def test_without_fastapi_the_command_says_what_to_install_in_one_line():
    proc = run_script("-c", "import sys, runpy; sys.modules['fastapi'] = None; "     # as if it were not installed
                            "runpy.run_module('omni.serve', run_name='__main__')")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: the page needs fastapi, uvicorn and python-multipart (fastapi is missing): pip install -e "
        "'.[serve]' (or pip install fastapi uvicorn python-multipart)"]
    args = serve.parse_args([])
    assert (args.host, args.port, args.ckpt_dir, args.talker_dir) == ("127.0.0.1", 7860, None, TALKER_DIR)


class Gated:
    """A stand-in Chat that writes one piece, then finishes only once the test has read it."""
    is_omni, sample_rate = True, 16000

    def __init__(self):
        self.read = threading.Event()

    def talk(self, text, image_path=None, audio_path=None, speak=True):
        yield {"type": "text", "text": "one"}
        late = "" if self.read.wait(timeout=10) else " (the first piece was held back)"
        yield {"type": "audio", "samples": torch.zeros(160)}
        yield {"type": "done", "text": "one" + late}


def test_each_event_leaves_the_server_as_it_is_made():
    gated = Gated()
    with served(serve.make_app(gated)) as url, httpx.stream("POST", url + "turn", data={"text": "hi"}) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines)) == {"type": "text", "text": "one"}
        gated.read.set()
        rest = [json.loads(line) for line in lines]
    assert [e["type"] for e in rest] == ["audio", "done"] and rest[-1]["text"] == "one"


def test_a_busy_port_is_one_line_before_any_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_script("-m", "omni.serve", "--port", str(port), "--ckpt_dir", "/nonexistent")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another --port or --host)"]
