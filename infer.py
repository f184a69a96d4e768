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

from omni.chat import Chat, add_model_arguments, chat_from_args, read_media
from omni.cli import run_cli
from omni.config import UserError
from omni.generation import WavWriter
from omni.loading import load_speaker
from omni.runtime import resolve_device

CHAT_HELP = ("type a question; '/image PATH question' or '/audio PATH' attach a picture or a spoken "
             "question; '/quit' ends")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with the omni model, ask about images and speech, hear answers.")
    add_model_arguments(p)
    p.add_argument("--text", help="the question (or, for a Stage A Thinker, the text to continue)")
    p.add_argument("--image", metavar="PATH", help="a picture to ask about")
    p.add_argument("--audio", metavar="PATH", help="a spoken question (any format soundfile reads)")
    p.add_argument("--audio_out", metavar="PATH", help="also speak the answer into this 16 kHz WAV")
    p.add_argument("--say", metavar="TEXT", help="speak this text with the Talker (no Thinker); needs --audio_out")
    return p.parse_args(argv)


def check_inputs(args) -> None:
    """Fail before a model loads on a blank --text / --say or an unusable --image / --audio file."""
    for flag, value in (("--text", args.text), ("--say", args.say)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty: give the text (or leave {flag} out)")
    read_media(args.image, args.audio)


def write_speech(args, chunks, sample_rate: int, wav: WavWriter | None = None) -> WavWriter | None:
    """Append waveform chunks to the --audio_out file as they come (opened at the first chunk)."""
    for chunk in chunks:
        wav = wav or WavWriter(args.audio_out, sample_rate)
        wav.write(chunk)
    return wav


def close_speech(args, wav: WavWriter) -> None:
    wav.close()
    print(f"[spoken into {args.audio_out}: {wav.seconds:.2f} s at {wav.sample_rate} Hz]")


def answer_aloud(chat: Chat, args, question: str, image: str | None = None, audio: str | None = None,
                 fallback: str | None = None) -> None:
    """Print the answer as the Thinker writes it; with --audio_out, speak it into that file while
    the Thinker goes on (`fallback` when the answer has nothing to say)."""
    events = chat.talk(question, image, audio, speak=bool(args.audio_out))
    wav = None
    try:
        for event in events:
            if event["type"] == "heard":
                print(f"(heard: {event['text']})", flush=True)
            elif event["type"] == "text":
                print(event["text"], end="", flush=True)
            elif event["type"] == "audio":
                wav = write_speech(args, [event["samples"]], chat.sample_rate, wav)
        print()
        if args.audio_out and wav is None and fallback:
            wav = write_speech(args, chat.speaker.stream([fallback], seed=args.seed), chat.sample_rate)
    finally:
        if wav is not None:
            close_speech(args, wav)


def parse_chat_line(line: str) -> tuple[str, str | None, str | None]:
    """'/image PATH question' | '/audio PATH [question]' | 'question' -> (question, image, audio)."""
    for command in ("/image", "/audio"):
        if line == command or line.startswith(command + " "):
            path, _, question = line[len(command):].strip().partition(" ")
            if not path:
                raise UserError(f"{command} needs a file: {command} PATH [question]")
            return question.strip(), (path if command == "/image" else None), (path if command == "/audio" else None)
    return line, None, None


def interactive(chat: Chat, args) -> None:
    kind = "omni model" if chat.is_omni else "Stage A Thinker (text continuation only)"
    print(f"μOmni chat with the {kind}; {CHAT_HELP}")
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
            answer_aloud(chat, args, *parse_chat_line(line))
        except UserError as e:       # a bad path should not end the conversation
            print(f"\nerror: {e}")


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    device = resolve_device(args.device)
    if args.say is not None:
        if not args.audio_out:
            raise UserError("--say needs --audio_out PATH (where to write the speech)")
        speaker = load_speaker(args.talker_dir, device, vocoder_dir=args.vocoder_dir)
        wav = write_speech(args, speaker.stream([args.say], seed=args.seed), speaker.sample_rate)
        close_speech(args, wav or WavWriter(args.audio_out, speaker.sample_rate))
        return 0
    chat = chat_from_args(args, device)
    if args.text is None and args.image is None and args.audio is None:
        interactive(chat, args)
        return 0
    answer_aloud(chat, args, args.text or "", args.image, args.audio, fallback="sorry")
    return 0


if __name__ == "__main__":
    run_cli(main)
