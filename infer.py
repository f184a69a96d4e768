"""Talk to the trained model. See docs/inference.md.

    python infer.py                                              # interactive chat
    python infer.py --text "what is two plus three?"
    python infer.py --image data/demo/images/test_00001.png --text "what colour is the circle?"
    python infer.py --audio question.wav                         # a spoken question
    python infer.py --text "hello" --audio_out answer.wav        # ... answered aloud
    python infer.py --say "a red circle" --audio_out out.wav     # the Talker alone
"""
from __future__ import annotations

import argparse
import os

import torch

from omni.cli import run_cli
from omni.config import UserError
from omni.data.audio import read_audio
from omni.data.image import MAX_IMAGE_PIXELS, read_image
from omni.data.manifest import SampleError
from omni.data.sft import longest_audio
from omni.features import LogMel, MelSpec
from omni.generation import generate_text, stream_text, write_wav
from omni.loading import load_omni, load_speaker, load_thinker, stage_prefix_in
from omni.registry import STAGES
from omni.runtime import resolve_device

OMNI_DIR, THINKER_DIR, TALKER_DIR = "checkpoints/omni_sft_tiny", "checkpoints/thinker_tiny", "checkpoints/talker_tiny"
CHAT_HELP = ("type a question; '/image PATH question' or '/audio PATH' attach a picture or a spoken "
             "question; '/quit' ends")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with the omni model, ask about images and speech, hear answers.")
    p.add_argument("--ckpt_dir", default=None,
                   help=f"model folder: Stage E ({OMNI_DIR}) or a Thinker ({THINKER_DIR}), checkpoints or "
                        "an export; default: the first of these two that holds a model")
    p.add_argument("--text", help="the question (or, for a Stage A Thinker, the text to continue)")
    p.add_argument("--image", metavar="PATH", help="a picture to ask about")
    p.add_argument("--audio", metavar="PATH", help="a spoken question (any format soundfile reads)")
    p.add_argument("--audio_out", metavar="PATH", help="also speak the answer into this 16 kHz WAV")
    p.add_argument("--say", metavar="TEXT", help="speak this text with the Talker (no Thinker); needs --audio_out")
    p.add_argument("--talker_dir", default=TALKER_DIR, help="folder of the Stage D Talker")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p.parse_args(argv)


def default_model_dir() -> str:
    for folder in (OMNI_DIR, THINKER_DIR):
        if os.path.isdir(folder) and stage_prefix_in(folder):
            return folder
    raise UserError(f"no trained model in {OMNI_DIR} or {THINKER_DIR}: run the pipeline with "
                    "`python -m omni.pipeline` (or train the Thinker: `python train_text.py --config "
                    "configs/thinker_tiny.json`)")


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


def check_inputs(args) -> None:
    """Fail before a model loads on a blank --text / --say or an unusable --image / --audio file."""
    for flag, value in (("--text", args.text), ("--say", args.say)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty: give the text (or leave {flag} out)")
    read_media(args.image, args.audio)


class Chat:
    """One loaded model answering questions: the Stage E omni model (text, image, speech) or a
    Stage A Thinker (text continuation only)."""

    def __init__(self, ckpt_dir: str, args, device):
        self.args, self.device = args, device
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

    def media(self, image_path: str | None, audio_path: str | None):
        """(image [3,S,S], log-mel [T, n_mels]) of the given files, None where not given."""
        if not (image_path or audio_path):
            return None, None
        image, wave = read_media(image_path, audio_path, self.image_size or 64, self.image_resize,
                                 self.max_pixels, self.max_seconds)
        if not self.is_omni:
            raise UserError("--image and --audio need the Stage E model: train it with `python -m omni.pipeline` "
                            "(or `python sft_omni.py --config configs/omni_sft_tiny.json`)")
        mel = None if wave is None else LogMel(MelSpec(n_mels=self.model.audio_encoder.arch.n_mels))(wave)
        return image, mel

    def answer(self, text: str, image_path: str | None = None, audio_path: str | None = None):
        """Yield the answer piece by piece as it is generated."""
        a = self.args
        image, mel = self.media(image_path, audio_path)
        self.check_room(text, image, mel, ", ".join(p for p in (image_path, audio_path) if p))
        if not self.is_omni:
            return generate_text(self.model, self.tokenizer, text, a.max_new_tokens, a.temperature, a.top_k,
                                 a.seed, self.device)
        generator = torch.Generator(device=self.device).manual_seed(a.seed)
        return stream_text(self.model.answer(text, image, mel, a.max_new_tokens, a.temperature, a.top_k,
                                             generator), self.tokenizer)

    @torch.no_grad()
    def check_room(self, text: str, image, mel, files: str) -> None:
        """UserError when the prompt (media included) leaves the Thinker no position for an answer:
        it would answer nothing. The omni model's media are encoded for this once more (the encoders
        cost little beside generation), so the length is exactly the one `answer` builds."""
        if self.is_omni:
            media = self.model.encode_media([image], [mel])[0]
            length, limit = self.model.prompt_embeddings(text, media).shape[1], self.model.thinker.arch.max_seq_len
        else:
            length, limit = len(self.tokenizer.encode(text, bos=True)), self.model.arch.max_seq_len
        if length >= limit:
            raise UserError(f"{files or '--text'}: the prompt takes {length} positions, and the Thinker's "
                            f"max_seq_len is {limit}: no room for an answer (ask something shorter)")


def print_stream(pieces) -> str:
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print()
    return text


def speak(args, text: str, device, speaker=None):
    """Speak text into args.audio_out with the Talker; returns the Speaker for reuse."""
    speaker = speaker or load_speaker(args.talker_dir, device)
    wave = speaker.speak(text, temperature=0.0, seed=args.seed)
    write_wav(args.audio_out, wave, speaker.sample_rate)
    print(f"[spoken into {args.audio_out}: {len(wave) / speaker.sample_rate:.2f} s at {speaker.sample_rate} Hz]")
    return speaker


def parse_chat_line(line: str) -> tuple[str, str | None, str | None]:
    """'/image PATH question' | '/audio PATH [question]' | 'question' -> (question, image, audio)."""
    for command in ("/image", "/audio"):
        if line == command or line.startswith(command + " "):
            path, _, question = line[len(command):].strip().partition(" ")
            if not path:
                raise UserError(f"{command} needs a file: {command} PATH [question]")
            return question.strip(), (path if command == "/image" else None), (path if command == "/audio" else None)
    return line, None, None


def interactive(chat: Chat, args, device) -> None:
    kind = "omni model" if chat.is_omni else "Stage A Thinker (text continuation only)"
    print(f"μOmni chat with the {kind}; {CHAT_HELP}")
    speaker = None
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if not line:
            continue
        try:
            print("omni> ", end="", flush=True)
            answer = print_stream(chat.answer(*parse_chat_line(line)))
            if args.audio_out and answer.strip():
                speaker = speak(args, answer, device, speaker)
        except UserError as e:       # a bad path should not end the conversation
            print(f"\nerror: {e}")


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    device = resolve_device(args.device)
    if args.say is not None:
        if not args.audio_out:
            raise UserError("--say needs --audio_out PATH (where to write the speech)")
        speak(args, args.say, device)
        return 0
    chat = Chat(args.ckpt_dir or default_model_dir(), args, device)
    if args.text is None and args.image is None and args.audio is None:
        interactive(chat, args, device)
        return 0
    answer = print_stream(chat.answer(args.text or "", args.image, args.audio))
    if args.audio_out:
        speak(args, answer if answer.strip() else "sorry", device)
    return 0


if __name__ == "__main__":
    run_cli(main)
