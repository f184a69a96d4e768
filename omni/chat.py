"""A loaded model that answers questions in text and speech: what infer.py and the web page share.

    chat = Chat("checkpoints/omni_sft_tiny", torch.device("cpu"), talker_dir="checkpoints/talker_tiny")
    for piece in chat.answer("what is two plus three?"): ...          # text pieces as they are written
    for event in chat.talk("what is two plus three?"): ...            # text and speech as they come

`talk` yields {"type": "heard", "text"} first when the model listened to a spoken question (Stage
E's `transcribe`: the words it heard, from which it answers), {"type": "text", "text"} events as the
Thinker writes, {"type": "audio", "samples"}
events as the Talker speaks (a phrase at a time, while the Thinker goes on: Speaker.stream), and
one {"type": "done", ...} event with the whole answer and its timings. Bad input raises UserError
(one line) when `answer` or `talk` is called, before any piece or event.
"""
from __future__ import annotations

import os
import time

import torch

from omni.config import UserError
from omni.data.audio import read_audio
from omni.data.image import MAX_IMAGE_PIXELS, read_image
from omni.data.manifest import SampleError
from omni.data.sft import longest_audio
from omni.features import LogMel, MelSpec
from omni.generation import Speaker, continuation_ids, stream_text
from omni.loading import load_omni, load_speaker, load_thinker, stage_prefix_in
from omni.registry import STAGES

OMNI_DIR, THINKER_DIR = STAGES["E"].default_save_dir, STAGES["A"].default_save_dir
TALKER_DIR, VOCODER_DIR = STAGES["D"].default_save_dir, STAGES["F"].default_save_dir


def add_model_arguments(p) -> None:
    """The command-line options infer.py and the page share: which models, how they generate."""
    p.add_argument("--ckpt_dir", default=None,
                   help=f"model folder: Stage E ({OMNI_DIR}) or a Thinker ({THINKER_DIR}), checkpoints or "
                        "an export; default: the first of these two that holds a model")
    p.add_argument("--talker_dir", default=TALKER_DIR, help="folder of the Stage D Talker")
    p.add_argument("--vocoder_dir", default=VOCODER_DIR,
                   help="folder of the Stage F vocoder (Griffin-Lim when empty or when it holds none)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def chat_from_args(args, device) -> "Chat":
    """The Chat that add_model_arguments' options describe."""
    return Chat(args.ckpt_dir or default_model_dir(), device, talker_dir=args.talker_dir,
                vocoder_dir=args.vocoder_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, seed=args.seed)


def default_model_dir() -> str:
    """The Stage E folder when it holds a model, else the Stage A folder; else UserError."""
    for folder in (OMNI_DIR, THINKER_DIR):
        if os.path.isdir(folder) and stage_prefix_in(folder):
            return folder
    raise UserError(f"no trained model in {OMNI_DIR} or {THINKER_DIR}: run the pipeline with "
                    f"`python -m omni.pipeline` (or train the Thinker: `{STAGES['A'].command}`)")


def read_media(image_path: str | None, audio_path: str | None, image_size: int = 64, resize: str = "squash",
               max_pixels: int = MAX_IMAGE_PIXELS, max_seconds: float = 0.0):
    """(image [3,S,S], 16 kHz waveform) of the given files, None where not given; UserError naming
    the file and what is wrong with it (missing, empty, not an image or audio, damaged, silent, an
    image over max_pixels or a clip over max_seconds when > 0: both known from the header)."""
    try:
        return (read_image(image_path, image_size, resize, max_pixels) if image_path else None,
                read_audio(audio_path, MelSpec.sample_rate, max_seconds) if audio_path else None)
    except SampleError as e:
        raise UserError(str(e)) from None


class Chat:
    """One loaded model answering questions: the Stage E omni model (text, image, speech) or a
    Stage A Thinker (text continuation only). The Talker (talker_dir, default TALKER_DIR) and
    vocoder (vocoder_dir) are loaded the first time an answer is spoken."""

    def __init__(self, ckpt_dir: str, device, *, talker_dir: str | None = None, vocoder_dir: str | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, seed: int = 0):
        self.device = device
        self.talker_dir, self.vocoder_dir = talker_dir or TALKER_DIR, vocoder_dir
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed
        self.sample_rate = MelSpec.sample_rate
        self._speaker: Speaker | None = None
        self.heard: str | None = None       # what the model heard in the last spoken question (transcribe)
        prefix = stage_prefix_in(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        self.is_omni = prefix == STAGES["E"].prefix
        self.max_pixels, self.max_seconds = MAX_IMAGE_PIXELS, 0.0
        if self.is_omni:
            self.model, config = load_omni(ckpt_dir, device)
            self.tokenizer, self.image_size = self.model.tok, config.get("image_size", 64)
            self.image_resize = config.get("image_resize", "squash")     # as Stage E read its images
            self.max_pixels = config.get("max_image_pixels", MAX_IMAGE_PIXELS)
            self.max_seconds = longest_audio(self.model.audio_encoder.arch, MelSpec())   # what its encoder takes
        else:       # load_thinker names the folder and the command when nothing is there
            self.model, self.tokenizer = load_thinker(ckpt_dir, device)
            self.image_size, self.image_resize = None, "squash"

    @property
    def speaker(self) -> Speaker:
        """The Talker, codec and vocoder, loaded on first use."""
        if self._speaker is None:
            self._speaker = load_speaker(self.talker_dir, self.device, vocoder_dir=self.vocoder_dir)
        return self._speaker

    def media(self, image_path: str | None, audio_path: str | None):
        """(image [3,S,S], log-mel [T, n_mels]) of the given files, None where not given."""
        if not (image_path or audio_path):
            return None, None
        image, wave = read_media(image_path, audio_path, self.image_size or 64, self.image_resize,
                                 self.max_pixels, self.max_seconds)
        if not self.is_omni:
            raise UserError("--image and --audio need the Stage E model: train it with `python -m omni.pipeline` "
                            f"(or `{STAGES['E'].command}`)")
        mel = None if wave is None else LogMel(MelSpec(n_mels=self.model.audio_encoder.arch.n_mels))(wave)
        return image, mel

    def token_ids(self, text: str, image_path: str | None = None, audio_path: str | None = None):
        """The answer's token ids as they are generated (checks the input first: UserError now)."""
        image, mel = self.media(image_path, audio_path)
        self.check_room(text, image, mel, ", ".join(p for p in (image_path, audio_path) if p))
        self.heard = None
        if not self.is_omni:
            return continuation_ids(self.model, self.tokenizer, text, self.max_new_tokens, self.temperature,
                                    self.top_k, self.seed, self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        media = self.model.encode_media([image], [mel])[0]
        if media.audio is not None and self.model.transcribe:      # it listens first: what did it hear?
            self.heard = media.heard = self.model.listen(media)
        return self.model.answer(text, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_k=self.top_k, generator=generator, media=media)

    def answer(self, text: str, image_path: str | None = None, audio_path: str | None = None):
        """Yield the answer piece by piece as it is generated."""
        return stream_text(self.token_ids(text, image_path, audio_path), self.tokenizer)

    def talk(self, text: str, image_path: str | None = None, audio_path: str | None = None, speak: bool = True):
        """Yield the answer as events: text pieces as the Thinker writes them, audio chunks (1-D
        float32 in [-1, 1] at sample_rate) as the Talker speaks them, then "done" with the whole
        answer and its figures (module docstring; timings from this call)."""
        start = time.perf_counter()
        ids = self.token_ids(text, image_path, audio_path)
        return self._events(ids, self.speaker if speak else None, start, self.heard)

    def _events(self, ids, speaker: Speaker | None, start: float, heard: str | None):
        if heard is not None:
            yield {"type": "heard", "text": heard}
        clock = {"thinker": 0.0, "tokens": 0}
        pieces = _timed(stream_text(_counted(ids, self.tokenizer.eos_id, clock), self.tokenizer), clock)
        items = speaker.stream(pieces, seed=self.seed, with_text=True) if speaker else pieces
        answer, samples, first_text, first_audio, streaming = "", 0, None, None, 0.0
        while True:
            began = time.perf_counter()
            item = next(items, None)
            now = time.perf_counter()
            streaming += now - began
            if item is None:
                break
            if isinstance(item, str):
                answer += item
                first_text = first_text if first_text is not None else now - start
                yield {"type": "text", "text": item}
            else:
                first_audio = first_audio if first_audio is not None else now - start
                samples += len(item)
                yield {"type": "audio", "samples": item.float().clamp(-1, 1)}
        audio_s, speaking = samples / self.sample_rate, streaming - clock["thinker"]
        yield {"type": "done", "text": answer, "ttfa_s": first_audio, "first_text_s": first_text,
               "tokens": clock["tokens"], "tokens_per_s": clock["tokens"] / max(clock["thinker"], 1e-9),
               "audio_s": audio_s, "rtf": speaking / audio_s if samples else None,
               "seconds": time.perf_counter() - start}

    @torch.no_grad()
    def check_room(self, text: str, image, mel, files: str) -> None:
        """UserError when the prompt (media included) leaves the Thinker no position for an answer:
        it would answer nothing. The omni model's media are encoded for this once more (the encoders
        cost little beside generation), so the length is exactly the one `answer` builds."""
        if self.is_omni:
            media = self.model.encode_media([image], [mel])[0]
            length, limit = self.model.prompt_length(text, media), self.model.thinker.arch.max_seq_len
        else:
            length, limit = len(self.tokenizer.encode(text, bos=True)), self.model.arch.max_seq_len
        if length >= limit:
            raise UserError(f"{files or '--text'}: the prompt takes {length} positions, and the Thinker's "
                            f"max_seq_len is {limit}: no room for an answer (ask something shorter)")


def _counted(ids, eos_id: int, clock: dict):
    """The token ids, those of the answer counted into clock["tokens"] (</s> is not)."""
    for tid in ids:
        clock["tokens"] += int(tid) != eos_id
        yield tid


def _timed(pieces, clock: dict):
    """The text pieces, the time spent making them added to clock["thinker"]."""
    pieces = iter(pieces)
    while True:
        began = time.perf_counter()
        piece = next(pieces, None)
        clock["thinker"] += time.perf_counter() - began
        if piece is None:
            return
        yield piece
