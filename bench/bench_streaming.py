"""Time to first audio (TTFA) and real-time factor (RTF) of spoken answers, streaming beside whole.

    python bench/bench_streaming.py [--omni_dir checkpoints/omni_sft_tiny] [--talker_dir checkpoints/talker_tiny]
                                    [--vocoder_dir checkpoints/vocoder_tiny] [--threads 1 2] [--rounds 3] [--random]

For a few typed questions (and, for a Stage E model when --image exists, a few about a picture):

  streaming  Chat.talk: the Talker speaks a phrase at a time while the Thinker writes, and each
             phrase's codes are decoded and vocoded in chunks as they come (docs/inference.md)
  whole      the whole answer (Chat.answer), then the whole sentence spoken at once (Speaker.speak)

TTFA: seconds from the call to the first audio sample being ready; RTF: the seconds spent speaking
(Talker, codec, vocoder; not the Thinker) over the seconds of audio. Each question runs --rounds
times per thread count, the two paths interleaved, after one untimed warm-up; the table gives the
median and the largest. --random builds a tiny random-weight Thinker (Stage A: text continuation,
sampled) and Talker in a temporary folder (Griffin-Lim unless --vocoder_dir is given), for a smoke
test. Nothing is written into the repository.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni import checkpoint as ckpt  # noqa: E402
from omni.chat import OMNI_DIR, TALKER_DIR, VOCODER_DIR, Chat  # noqa: E402
from omni.codec import CodecArch, SpeechCodec  # noqa: E402
from omni.talker import Talker, TalkerArch  # noqa: E402
from omni.thinker import Thinker, ThinkerArch  # noqa: E402
from omni.tokenizer import Tokenizer  # noqa: E402

TYPED = ["what is six plus one?", "are you a robot?", "what comes after zero?", "what is four plus one?"]
ABOUT_THE_IMAGE = ["describe the picture", "what colour is the circle?"]
ROWS = {"ttfa streaming": "TTFA ms, streaming", "ttfa whole": "TTFA ms, whole answer then whole sentence",
        "rtf streaming": "RTF, streaming", "rtf whole": "RTF, whole sentence"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TTFA and RTF of streamed speech beside whole-sentence speech.")
    p.add_argument("--omni_dir", default=OMNI_DIR, help="Stage E (or Stage A) model folder")
    p.add_argument("--talker_dir", default=TALKER_DIR)
    p.add_argument("--vocoder_dir", default=None,
                   help=f"Griffin-Lim when empty or missing; default {VOCODER_DIR} (with --random: Griffin-Lim)")
    p.add_argument("--questions", nargs="+", default=TYPED, help="the typed questions")
    p.add_argument("--image", default="data/demo/images/test_00000.png", help="picture of the image questions")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch CPU threads, one table row set each")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--random", action="store_true", help="tiny random-weight models (a smoke test)")
    return p.parse_args(argv)


def random_models(folder: str) -> tuple[str, str]:
    """(Thinker folder, Talker folder) of tiny random-weight models, saved weights-only."""
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(f"a {c} {s} is left of a {s} {n}" for c in ("red", "blue") for s in ("circle", "star")
                          for n in ("one", "two", "three")) + "\n")
    thinker_dir, talker_dir = os.path.join(folder, "thinker"), os.path.join(folder, "talker")
    os.makedirs(thinker_dir)
    os.makedirs(talker_dir)
    Tokenizer.train([corpus], os.path.join(thinker_dir, ckpt.TOKENIZER_FILE), 64)
    torch.manual_seed(0)
    text = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}
    speech = {"codec_channels": 16, "latent_dim": 8, "codebook_size": 16, "n_codebooks": 2, "d_model": 32,
              "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 256}
    codec = SpeechCodec(CodecArch.from_config(speech, "random codec"))
    talker = Talker(TalkerArch.from_config(speech, "random talker"), codec.arch.n_codebooks, codec.arch.codebook_size)
    for path, payload in [(os.path.join(thinker_dir, "thinker.pt"),
                           {"model": Thinker(ThinkerArch.from_config(text, "random thinker")).state_dict(),
                            ckpt.CONFIG: text}),
                          (os.path.join(talker_dir, "talker.pt"),
                           {"talker": talker.state_dict(), "rvq": codec.state_dict(), ckpt.CONFIG: speech})]:
        ckpt.save(path, {**payload, ckpt.VERSION: ckpt.FORMAT_VERSION})
    return thinker_dir, talker_dir


def streaming(chat: Chat, question: str, image: str | None) -> tuple[float | None, float | None]:
    """(TTFA, RTF) of Chat.talk."""
    done = list(chat.talk(question, image))[-1]
    return done["ttfa_s"], done["rtf"]


def whole(chat: Chat, question: str, image: str | None) -> tuple[float | None, float | None]:
    """(TTFA, RTF) of the whole answer, then the whole sentence."""
    start = time.perf_counter()
    answer = "".join(chat.answer(question, image))
    written = time.perf_counter()
    wave = chat.speaker.speak(answer, seed=chat.seed)
    spoken = time.perf_counter()
    if len(wave) == 0:
        return None, None
    return spoken - start, (spoken - written) / (len(wave) / chat.sample_rate)


def measure(chat: Chat, questions, threads: int, rounds: int) -> dict[str, list[list[float]]]:
    """figure name -> per question, the values of every round (none when the answer says nothing)."""
    torch.set_num_threads(threads)
    streaming(chat, *questions[0])              # warm-up: the Talker loads, caches and kernels settle
    figures = {name: [[] for _ in questions] for name in ROWS}
    for _ in range(rounds):
        for i, (question, image) in enumerate(questions):
            for path, run in (("streaming", streaming), ("whole", whole)):
                ttfa, rtf = run(chat, question, image)
                if ttfa is not None:
                    figures[f"ttfa {path}"][i].append(1000 * ttfa)
                    figures[f"rtf {path}"][i].append(rtf)
    return figures


def median_max(values: list[float], digits: int) -> list[str]:
    return [f"{v:.{digits}f}" for v in (statistics.median(values), max(values))] if values else ["nan"] * 2


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        omni_dir, talker_dir = random_models(tmp) if args.random else (args.omni_dir, args.talker_dir)
        vocoder_dir = args.vocoder_dir if args.vocoder_dir is not None else "" if args.random else VOCODER_DIR
        chat = Chat(omni_dir, torch.device("cpu"), talker_dir=talker_dir, vocoder_dir=vocoder_dir,
                    max_new_tokens=args.max_new_tokens, temperature=1.0 if args.random else 0.0)
        questions = [(q, None) for q in args.questions]
        if chat.is_omni and os.path.isfile(args.image):
            questions += [(q, args.image) for q in ABOUT_THE_IMAGE]
        names = [f"{q!r}{' + ' + os.path.basename(image) if image else ''} -> {''.join(chat.answer(q, image))!r}"
                 for q, image in questions]
        print(f"{len(questions)} questions x {args.rounds} rounds; {omni_dir}, {talker_dir}, "
              f"{type(chat.speaker.vocoder).__name__}")
        rows = []
        for threads in args.threads:
            figures = measure(chat, questions, threads, args.rounds)
            print(f"TTFA ms, streaming / whole (median of the rounds), {threads} thread(s):")
            for i, name in enumerate(names):
                print(f"  {name}: " + " / ".join(median_max(figures[f"ttfa {path}"][i], 0)[0]
                                                 for path in ("streaming", "whole")))
            for name, label in ROWS.items():
                cells = median_max(sum(figures[name], []), 0 if name.startswith("ttfa") else 3)
                rows.append(f"| {label}, {threads} thread{'s' if threads > 1 else ''} | {cells[0]} | {cells[1]} |")
    print("\n| figure | median | max |\n|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
