"""Copy-synthesis quality and speed of the Stage F vocoder beside Griffin-Lim, on one core.

    python bench/bench_vocoder.py [--vocoder_dir checkpoints/vocoder_tiny] [--manifest data/demo/tts_val.jsonl]
                                  [--clips 20] [--griffin_lim_iters 32] [--refine_iters N]
                                  [--talker_dir checkpoints/talker_tiny --asr_dir checkpoints/audio_enc_tiny]

For each of the first `--clips` clips of the manifest (held out from training): its log-mel
(omni.features.LogMel) back to a waveform by each vocoder; wideband PESQ and STOI against the
original (the optional `pesq` / `pystoi` packages: without them, only speed), and the real-time
factor (synthesis seconds / audio seconds; below 1 is faster than real time) with
torch.set_num_threads(1). With a Talker and a Stage B model (both folders present), also the
Talker's speech through each vocoder read back by Stage B: the character error rate (CER) on the
same clips' sentences. Prints one table; docs/stage_f_vocoder.md holds the figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni.cli import run_cli  # noqa: E402
from omni.data.audio import read_audio  # noqa: E402
from omni.data.manifest import read_manifest  # noqa: E402
from omni.features import LogMel, MelSpec  # noqa: E402
from omni.loading import holds_model, load_asr, load_speaker, load_vocoder  # noqa: E402
from omni.metrics import cer  # noqa: E402
from omni.registry import STAGES  # noqa: E402
from omni.stages.vocoder import quality_scores  # noqa: E402
from omni.vocoder import GriffinLimVocoder  # noqa: E402


def synthesise(vocoder, mels: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """(waveforms, real-time factor) of one vocoder over all mels."""
    vocoder.mel_to_wave(mels[0])               # warm-up: first-call allocations are not its speed
    start = time.perf_counter()
    waves = [vocoder.mel_to_wave(m) for m in mels]
    seconds = sum(len(w) for w in waves) / vocoder.sample_rate
    return waves, (time.perf_counter() - start) / max(seconds, 1e-9)


def talker_cer(args, vocoders: list) -> list:
    """CER of the Talker's speech through each vocoder, read back by Stage B (None per vocoder when
    either folder holds no model)."""
    if not (holds_model(args.talker_dir, STAGES["D"]) and holds_model(args.asr_dir, STAGES["B"])):
        return [None] * len(vocoders)
    speaker, asr = load_speaker(args.talker_dir, "cpu"), load_asr(args.asr_dir, "cpu")
    texts = [asr.charset.normalize(r["text"]) for r in read_manifest(args.manifest, ["text"])[:args.clips]]
    codes = [speaker.codes(t) for t in texts]
    rates = []
    for vocoder in vocoders:
        speaker.vocoder = vocoder
        rates.append(cer(texts, asr.transcribe([speaker.codes_to_wave(c) for c in codes])))
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Stage F vocoder vs Griffin-Lim: PESQ, STOI, real-time factor.")
    p.add_argument("--vocoder_dir", default="checkpoints/vocoder_tiny")
    p.add_argument("--manifest", default="data/demo/tts_val.jsonl")
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--griffin_lim_iters", type=int, default=32)
    p.add_argument("--refine_iters", type=int, help="the neural vocoder's refinements (default: its config)")
    p.add_argument("--talker_dir", default="checkpoints/talker_tiny", help="Stage D: its speech read back (CER)")
    p.add_argument("--asr_dir", default="checkpoints/audio_enc_tiny", help="Stage B: reads the Talker's speech")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    neural = load_vocoder(args.vocoder_dir, "cpu")
    if args.refine_iters is not None:
        neural.refine_iters = args.refine_iters
    spec = MelSpec(n_mels=neural.arch.n_mels)
    refs = [read_audio(r["audio"], spec.sample_rate) for r in read_manifest(args.manifest, ["audio"])[:args.clips]]
    logmel = LogMel(spec)
    mels = [logmel(w) for w in refs]
    rows = []
    griffin_lim = GriffinLimVocoder(spec, n_iter=args.griffin_lim_iters)
    vocoders = [(f"neural ({args.vocoder_dir}, {neural.refine_iters} refinements)", neural),
                (f"Griffin-Lim ({args.griffin_lim_iters} iterations)", griffin_lim)]
    for name, vocoder in vocoders:
        waves, rtf = synthesise(vocoder, mels)
        rows.append((name, quality_scores(refs, waves, spec.sample_rate), rtf))
    rates = talker_cer(args, [v for _, v in vocoders])
    seconds = sum(len(w) for w in refs) / spec.sample_rate
    print(f"{len(refs)} clips of {args.manifest} ({seconds:.1f} s), one thread")
    print("| vocoder | PESQ (wb) | STOI | real-time factor | Talker CER (Stage B) |")
    print("|---|---|---|---|---|")
    for (name, scores, rtf), rate in zip(rows, rates):
        pesq, stoi = (f"{scores['pesq']:.3f}", f"{scores['stoi']:.3f}") if scores else ("n/a", "n/a")
        print(f"| {name} | {pesq} | {stoi} | {rtf:.4f} | {'n/a' if rate is None else f'{100 * rate:.1f} %'} |")
    if rows[0][1] is None:
        print("note: the optional packages pesq and pystoi are not installed "
              "(pip install -e '.[speech-metrics]'): speed only")


if __name__ == "__main__":
    run_cli(main)
