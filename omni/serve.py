"""A local web page to talk to the model. See docs/inference.md ("The page").

    python -m omni.serve                      # then open http://127.0.0.1:7860
    python -m omni.serve --port 8000 --ckpt_dir checkpoints/omni_sft_tiny

The page (omni/serve_page.html: plain JS, nothing fetched from outside) sends a turn -- typed text,
a picture, a recording -- as a multipart POST to /turn. The answer comes back while it is made, as
newline-delimited JSON: {"type": "heard", "text"} first for a spoken question (what the model
heard), {"type": "text", "text"} pieces, {"type": "audio", "pcm16": base64 16-bit
PCM, "samples", "sample_rate"} chunks, then {"type": "done", ...the turn's figures} (or
{"type": "error", "message"} when the model fails half-way).

An upload over --max_upload_mb is refused with HTTP 413; input the model refuses (not an image, not
audio, damaged, too long a recording) is a 400 whose message names the uploaded file. Turns queue:
one worker thread owns the model and runs them one at a time, in the order they came.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from omni.chat import add_model_arguments, chat_from_args
from omni.cli import run_cli
from omni.config import UserError
from omni.runtime import resolve_device

try:    # an optional extra (pip install -e '.[serve]'): without it, main() says what to install
    import python_multipart  # noqa: F401  (FastAPI needs it to read forms)
    import uvicorn
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    MISSING = None
except ImportError as e:
    MISSING = e.name

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")
CHUNK = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m omni.serve",
                                description="Serve a local web page to talk to the model (text, pictures, speech).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860)
    add_model_arguments(p)
    p.add_argument("--max_upload_mb", type=float, default=20.0, help="largest request (picture + recording)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one turn
@dataclass
class Upload:
    """A turn's uploaded files, saved in a folder of their own that goes when the turn ends."""
    folder: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="omni_turn_"))
    paths: dict = field(default_factory=dict)       # form field -> saved path
    names: dict = field(default_factory=dict)       # saved path -> the name the browser gave

    async def save(self, key: str, upload) -> None:
        """Copy an upload to disk, a MiB at a time."""
        suffix = re.sub(r"[^A-Za-z0-9.]", "", os.path.splitext(upload.filename or "")[1])[:8]
        path = os.path.join(self.folder, key + suffix)
        with open(path, "wb") as f:
            while chunk := await upload.read(CHUNK):
                f.write(chunk)
        self.paths[key], self.names[path] = path, upload.filename or key

    def readable(self, message: str) -> str:
        """The model's message with the saved paths replaced by the names the user knows."""
        for path, name in self.names.items():
            message = message.replace(path, f"{name!r}")
        return message

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def event_line(event: dict, sample_rate: int) -> dict:
    """A Chat event as JSON: audio samples become base64 little-endian 16-bit PCM."""
    if event["type"] != "audio":
        return event
    pcm = (event["samples"].detach().float().cpu().clamp(-1, 1) * 32767).round().to(torch.int16)
    data = pcm.numpy().astype("<i2").tobytes()
    return {"type": "audio", "pcm16": base64.b64encode(data).decode("ascii"), "samples": len(pcm),
            "sample_rate": sample_rate}


class Turns:
    """Runs turns one at a time, in the order they come: a single worker thread owns the model, and
    a turn submitted while another runs waits for it. Events go back to the asking request through
    an asyncio queue; None ends a turn. A turn whose reader went away stops at its next event."""

    def __init__(self, chat):
        self.chat = chat
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-turn")

    def submit(self, text: str, upload: Upload, speak: bool) -> tuple[asyncio.Queue, threading.Event]:
        loop, events, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:        # the server has stopped (its loop is closed): nobody reads this turn
                stop.set()
        self.worker.submit(self.run, text, upload, speak, put, stop)
        return events, stop

    def run(self, text: str, upload: Upload, speak: bool, put, stop: threading.Event) -> None:
        error = None
        try:
            if stop.is_set():       # its reader left while it waited
                return
            talk = self.chat.talk(text, image_path=upload.paths.get("image"), audio_path=upload.paths.get("audio"),
                                  speak=speak)
            with contextlib.closing(talk):
                for event in talk:
                    put(event_line(event, self.chat.sample_rate))
                    if stop.is_set():
                        return
        except UserError as e:
            error = {"type": "error", "message": upload.readable(str(e)), "status": 400}
        except Exception as e:      # a bug, not bad input: say so on the page, keep serving, keep the trace
            traceback.print_exc()
            error = {"type": "error", "message": f"the model failed: {type(e).__name__}: {e}", "status": 500}
        finally:
            upload.remove()         # before the turn's last word: its reader finds the files gone
            if error:
                put(error)
            put(None)


# ----------------------------------------------------------------------------- the app
def make_app(chat, max_upload_bytes: int = 20 << 20, page: str = PAGE) -> "FastAPI":
    """The page at /, its settings at /config, and turns at POST /turn (see the module docstring)."""
    app, turns = FastAPI(title="μOmni"), Turns(chat)
    with open(page, encoding="utf-8") as f:
        html = f.read()
    too_large = f"the upload is over the server's limit of {max_upload_bytes / 2**20:g} MB"

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        """Before the body is read. Its length must be given (browsers, curl and httpx do): the
        server then reads no more than that."""
        length = request.headers.get("content-length")
        if request.method == "POST" and not (length or "").isdigit():
            return JSONResponse({"error": "a request needs its Content-Length"}, status_code=411)
        if int(length or 0) > max_upload_bytes:
            return JSONResponse({"error": too_large}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return html

    @app.get("/config")
    async def config():
        return {"omni": chat.is_omni, "sample_rate": chat.sample_rate, "max_upload_bytes": max_upload_bytes}

    @app.post("/turn")
    async def turn(text: str = Form(""), speak: bool = Form(True), image: UploadFile | None = File(None),
                   audio: UploadFile | None = File(None)):
        upload = Upload()
        try:
            for key, file in (("image", image), ("audio", audio)):
                if file is not None and (file.filename or file.size):     # an empty file field is none
                    await upload.save(key, file)
        except BaseException:
            upload.remove()
            raise
        events, stop = turns.submit(text, upload, speak)
        first = await events.get()      # waits its turn in the queue
        if first is None or first["type"] == "error":
            first = first or {"message": "the model gave no answer", "status": 500}
            return JSONResponse({"error": first["message"]}, status_code=first["status"])
        return StreamingResponse(ndjson(first, events, stop), media_type="application/x-ndjson")

    return app


async def ndjson(first: dict, events: asyncio.Queue, stop: threading.Event):
    """The turn's events as JSON lines, until its end (None); stops the turn if the reader leaves."""
    try:
        event = first
        while event is not None:
            yield json.dumps(event) + "\n"
            event = await events.get()
    finally:
        stop.set()


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is a one-line error at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:        # socket.gaierror (an unknown host) has a negative errno
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
        raise UserError(f"cannot listen on {host}:{port}: {reason} (choose another --port or --host)") from None


def main(argv=None):
    args = parse_args(argv)
    if MISSING:
        raise UserError(f"the page needs fastapi, uvicorn and python-multipart ({MISSING} is missing): "
                        "pip install -e '.[serve]' (or pip install fastapi uvicorn python-multipart)")
    if args.max_upload_mb <= 0:
        raise UserError(f"--max_upload_mb must be > 0, got {args.max_upload_mb:g}")
    sock = listen(args.host, args.port)
    chat = chat_from_args(args, resolve_device(args.device))
    app = make_app(chat, int(args.max_upload_mb * 2**20))
    print(f"μOmni page at http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_cli(main)
