"""Offline speech synthesis with eSpeak NG (from the ``espeakng-loader`` wheel) via ctypes.

Public API:
    synthesize(text, voice="en", rate=175, pitch=50) -> (np.ndarray int16 mono, 16000)
    check_clip(samples, text, sample_rate=16000) -> None   (raises ClipError)
    available_voices() -> list of the voice names this module vouches for

Why a helper process ("zygote"): eSpeak NG keeps synthesis state in C statics that no
API call resets (the pitch-flutter phase ``Flutter_ix``, the ``agc`` gain and ``cycle_count``
in wavegen.c survive even espeak_Terminate + espeak_Initialize).  So the same text spoken
twice in one process gives slightly different samples, and a clip would depend on every
clip synthesized before it.  To make every clip a pure function of (text, voice, rate, pitch)
we initialize espeak ONCE in a small helper process that never speaks itself; for each
utterance it forks a child, which starts from that pristine state, speaks, sends back the
int16 samples and exits.  A fork of the small helper costs about 1-2 ms (a fork of a process
with torch loaded costs ~25 ms, which is why the helper is a separate, lean interpreter).
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000

# eSpeak constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_RAND_SEED = 12345  # fixed seed for espeak's own noise generator (breathy voices)

# Voices checked against the shipped data: "<language>[+<variant>]".  The languages are
# files under espeak-ng-data/lang, the variants under espeak-ng-data/voices/!v.
VOICES = (
    "en", "en+m2", "en+m3", "en+m5", "en+f2", "en+f4",
    "en-us", "en-us+m1", "en-us+f1", "en-us+f3",
    "en-gb-x-rp+m4", "en-gb-scotland+f5",
)

# check_clip bounds.  Measured with espeak at 130-200 wpm: 0.045-0.08 s per character for
# sentences, up to 0.2 s per character for three-letter words (short words carry a fixed
# onset/offset cost), so the upper bound gets a constant allowance.
MIN_RMS = 0.01              # on the [-1, 1] scale; silence or a broken clip is far below
MIN_SEC_PER_CHAR = 0.025
MAX_SEC_PER_CHAR = 0.16
MAX_EXTRA_SEC = 0.6


class ClipError(RuntimeError):
    """A synthesized clip failed its sanity check."""


# ----------------------------------------------------------------------------------------
# The espeak engine (runs inside the helper process only)
# ----------------------------------------------------------------------------------------
class _Engine:
    """ctypes binding of the few espeak calls we need; initialized once per process."""

    def __init__(self):
        import espeakng_loader

        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib = lib
        self.libc = ctypes.CDLL(None)  # ApplyBreath() in wavegen.c calls libc rand()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 self.data_path.encode(), _ESPEAK_INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {self.data_path}")
        self._chunks: list[bytes] = []
        # keep a reference to the callback object: espeak holds only the raw pointer
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = proto(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, n, _events):
        if n > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0 = continue synthesis

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> bytes:
        """Raw little-endian int16 samples at the native rate."""
        self.lib.espeak_ng_SetRandSeed(_RAND_SEED)
        self.libc.srand(_RAND_SEED)
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak does not know voice {voice!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                                    _ESPEAK_CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
        return b"".join(self._chunks)


def _read_all(fd: int) -> bytes:
    parts = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _child_speak(engine: _Engine, req: dict, wfd: int) -> None:
    """In the forked child: speak one request into wfd, then leave without cleanup."""
    code = 0
    try:
        os.write(wfd, b"OK\n")
        pcm = engine.speak(req["text"], req["voice"], req["rate"], req["pitch"])
        view = memoryview(pcm)
        while view:
            view = view[os.write(wfd, view):]
    except BaseException as exc:  # report anything to the parent rather than die silently
        os.write(wfd, f"\nERR {type(exc).__name__}: {exc}".encode())
        code = 1
    finally:
        os._exit(code)  # skip atexit/flush: this is a fork of the helper


def _zygote_main() -> None:
    """Helper loop: one JSON request per line on stdin; replies on stdout as
    b"OK <rate> <nbytes>\\n" + pcm  or  b"ERR <message>\\n"."""
    engine = _Engine()
    # Load the English dictionary once here (~5 ms) instead of in every child.  Loading a
    # voice touches no synthesis state, so children still start from one fixed state.
    engine.lib.espeak_SetVoiceByName(b"en")
    out = sys.stdout.fileno()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child_speak(engine, req, wfd)
        os.close(wfd)
        payload = _read_all(rfd)
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        if status == 0 and payload.startswith(b"OK\n"):
            pcm = payload[3:]
            os.write(out, f"OK {engine.sample_rate} {len(pcm)}\n".encode())
            view = memoryview(pcm)
            while view:
                view = view[os.write(out, view):]
        else:
            msg = payload.split(b"\nERR ", 1)[-1].decode(errors="replace").replace("\n", " ")
            os.write(out, f"ERR {msg or 'child exited with status %d' % status}\n".encode())


# ----------------------------------------------------------------------------------------
# The client side (any process): talks to one helper, restarted if it dies
# ----------------------------------------------------------------------------------------
class _Client:
    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()

    def _start(self) -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.Popen([sys.executable, "-m", "omni.data.speech", "--zygote"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root)

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
        with self._lock:
            if self._pid != os.getpid():  # forked (e.g. a DataLoader worker): own helper
                self._proc, self._pid = None, os.getpid()
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            req = json.dumps({"text": text, "voice": voice, "rate": rate, "pitch": pitch}) + "\n"
            try:
                self._proc.stdin.write(req.encode())
                self._proc.stdin.flush()
                header = self._proc.stdout.readline().decode()
                if not header.startswith("OK "):
                    raise RuntimeError(header[4:].strip() or "espeak helper died")
                _, rate_s, nbytes = header.split()
                pcm = self._proc.stdout.read(int(nbytes))  # buffered: the header read may prefetch
                if len(pcm) != int(nbytes):
                    raise EOFError("espeak helper closed its output early")
            except (BrokenPipeError, EOFError, ValueError) as exc:
                self.close()
                raise RuntimeError(f"espeak helper failed on {text!r}: {exc}") from exc
        return np.frombuffer(pcm, dtype="<i2").astype(np.int16), int(rate_s)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():  # a fork must not stop our helper
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except Exception:
                proc.kill()


_CLIENT = _Client()
atexit.register(_CLIENT.close)


def available_voices() -> list[str]:
    """The voice names used for varied speech, each checked against the shipped data."""
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    langs = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    variants = {p.name for p in (data / "voices" / "!v").iterdir()}
    for v in VOICES:
        lang, _, variant = v.partition("+")
        if lang not in langs or (variant and variant not in variants):
            raise RuntimeError(f"voice {v!r} is missing from the espeak data at {data}")
    return list(VOICES)


_TORCH_PID = None  # the process that first ran torch here


def _resample(pcm: np.ndarray, sr: int) -> np.ndarray:
    global _TORCH_PID
    if sr == SAMPLE_RATE:
        return pcm
    import torch
    import torchaudio.functional as AF

    if _TORCH_PID is None:
        _TORCH_PID = os.getpid()
    elif _TORCH_PID != os.getpid():
        # A fork of a process whose OpenMP pool is running deadlocks in its first parallel
        # op; one thread avoids the pool (what DataLoader workers do as well).
        torch.set_num_threads(1)
        _TORCH_PID = os.getpid()

    wav = torch.from_numpy(pcm.astype(np.float32))
    out = AF.resample(wav, sr, SAMPLE_RATE).numpy()
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def synthesize(text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text` with eSpeak NG; returns (int16 mono samples, 16000).

    rate is in words per minute (espeak default 175), pitch 0-99 (default 50).
    The result depends only on the arguments (see the module docstring)."""
    if not text.strip():
        raise ValueError("cannot synthesize empty text")
    pcm, sr = _CLIENT.speak(text, voice, int(rate), int(pitch))
    return _resample(pcm, sr), SAMPLE_RATE


def clip_stats(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[float, float]:
    """(duration in seconds, RMS on the [-1, 1] scale)."""
    x = samples.astype(np.float64)
    if samples.dtype == np.int16:
        x = x / 32768.0
    rms = float(np.sqrt(np.mean(x * x))) if len(x) else 0.0
    return len(x) / sample_rate, rms


def check_clip(samples: np.ndarray, text: str, sample_rate: int = SAMPLE_RATE) -> None:
    """Raise ClipError (naming the text) unless the clip is audible and its length fits its text."""
    dur, rms = clip_stats(samples, sample_rate)
    n = max(len(text.strip()), 1)
    lo, hi = MIN_SEC_PER_CHAR * n, MAX_SEC_PER_CHAR * n + MAX_EXTRA_SEC
    if rms < MIN_RMS:
        raise ClipError(f"clip for {text!r} is silent (rms {rms:.4f} < {MIN_RMS})")
    if not lo <= dur <= hi:
        raise ClipError(f"clip for {text!r} lasts {dur:.2f}s, expected {lo:.2f}-{hi:.2f}s for {n} chars")


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        _zygote_main()
    else:  # tiny manual check: python -m omni.data.speech "some text" out.wav
        import soundfile as sf

        audio, sr = synthesize(sys.argv[1])
        check_clip(audio, sys.argv[1])
        sf.write(sys.argv[2], audio, sr, subtype="PCM_16")
        print(f"{len(audio) / sr:.2f}s -> {sys.argv[2]}")
