"""Using trained models: text generation that streams, and speaking (text -> waveform -> WAV file).

  generate_text(thinker, tokenizer, prompt, ...)  the Thinker's continuation, piece by piece
  continuation_ids(thinker, tokenizer, prompt, ...)  ... as token ids
  stream_text(token_ids, tokenizer)               decoded text pieces as token ids arrive
  Speaker(talker, codec, vocoder).speak(text)     a 1-D waveform at speaker.sample_rate
  Speaker(...).stream(text_pieces)                waveform chunks while the text is still being written
  write_wav(path, wave, sample_rate)              a mono PCM_16 WAV; WavWriter: the same, chunk by chunk

The model files define the networks; what runs them for a user lives here. Loading them from a
checkpoint folder is omni/loading.py (`load_thinker`, `load_speaker`, ...).
"""
from __future__ import annotations

import os
import sys

import soundfile as sf
import torch

from omni.codec import SpeechCodec
from omni.features import MelSpec
from omni.speech_stream import PhraseSplitter, chunked_wave
from omni.talker import Talker, text_to_ids
from omni.thinker import Thinker
from omni.tokenizer import Tokenizer
from omni.vocoder import GriffinLimVocoder, Vocoder


# ----------------------------------------------------------------------------- text
def stream_text(token_ids, tokenizer: Tokenizer):
    """Yield pieces of decoded text as token ids come from an iterator (stops at </s>)."""
    out, shown = [], ""
    for tid in token_ids:
        tid = int(tid)
        if tid == tokenizer.eos_id:
            break
        out.append(tid)
        text = tokenizer.decode(out)
        # Emit only the new suffix; SentencePiece may merge a leading space once the next piece comes.
        if text.startswith(shown):
            yield text[len(shown):]
            shown = text


def continuation_ids(model: Thinker, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_k: int = 0, seed: int = 0, device="cpu"):
    """Yield the token ids of the Thinker's continuation of a plain-text prompt (</s> included)."""
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          eos_id=tokenizer.eos_id, generator=generator)


def generate_text(model: Thinker, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0, device="cpu"):
    """Yield the Thinker's continuation of a plain-text prompt, piece by piece."""
    return stream_text(continuation_ids(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed, device),
                       tokenizer)


# ----------------------------------------------------------------------------- speech
class Speaker:
    """Text -> waveform: Talker codes -> codec decoder (log-mel) -> vocoder. `speak` renders a whole
    text at once; `stream` speaks text while it is still being written, a phrase at a time, and
    yields each phrase's waveform in chunks as the Talker makes its code frames."""

    def __init__(self, talker: Talker, codec: SpeechCodec, vocoder: Vocoder | None = None):
        self.talker, self.codec = talker, codec
        self.vocoder = vocoder or GriffinLimVocoder(MelSpec(n_mels=codec.arch.n_mels))
        self.sample_rate = self.vocoder.sample_rate

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.talker.speech_start.device).manual_seed(seed)

    def frames(self, text: str, temperature: float = 0.0, top_k: int = 0, generator=None):
        """The Talker's code frames [n_q] of one utterance, as they are generated (none when the
        text has nothing the Talker can say)."""
        said, dropped = self.talker.charset.split(text)
        if dropped:     # a one-line note: the caller hears the rest of the sentence
            print(f"note: the Talker cannot read {len(dropped)} kind(s) of character, "
                  f"{sum(dropped.values())} dropped: {''.join(sorted(dropped))!r}", file=sys.stderr)
        ids = text_to_ids(said, self.talker.charset).to(self.talker.speech_start.device)
        return self.talker.stream(ids, temperature, top_k, generator) if len(ids) else iter(())

    def codes(self, text: str, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
        """Codes [T, n_q] of one utterance."""
        frames = list(self.frames(text, temperature, top_k, self.generator(seed)))
        return torch.stack(frames) if frames else torch.zeros(0, self.talker.n_codebooks, dtype=torch.long)

    @torch.no_grad()
    def codes_to_wave(self, codes: torch.Tensor) -> torch.Tensor:
        if len(codes) == 0:
            return torch.zeros(0)
        return self.vocoder.mel_to_wave(self.codec.decode(codes[None])[0])

    def speak(self, text: str, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
        """1-D float waveform at self.sample_rate (empty when the text has nothing to say).
        Greedy by default; with temperature > 0 the seed makes it repeatable."""
        return self.codes_to_wave(self.codes(text, temperature, top_k, seed))

    def stream(self, text_pieces, temperature: float = 0.0, top_k: int = 0, seed: int = 0, with_text: bool = False):
        """Yield 1-D float waveform chunks at self.sample_rate while text pieces (the Thinker's
        stream) come in: each phrase (`PhraseSplitter`) is spoken as one utterance as soon as it is
        complete, its samples decoded and vocoded in chunks as its code frames come
        (`chunked_wave`). A one-phrase text streams the samples of `speak` (exactly with an exact
        vocoder). with_text=True also yields each text piece (a str) as it is read, in order with
        the chunks (tensors)."""
        splitter, generator = PhraseSplitter(), self.generator(seed)

        def spoken(phrases):
            for phrase in phrases:
                yield from chunked_wave(self.frames(phrase, temperature, top_k, generator), self.codec, self.vocoder)
        for piece in text_pieces:
            if with_text:
                yield piece
            yield from spoken(splitter.push(piece))
        yield from spoken(splitter.end())


class WavWriter:
    """A mono PCM_16 WAV written chunk by chunk (samples clipped to [-1, 1]); whole once closed."""

    def __init__(self, path: str, sample_rate: int):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = sf.SoundFile(path, "w", sample_rate, 1, subtype="PCM_16")
        self.sample_rate, self.samples = sample_rate, 0

    def write(self, wave: torch.Tensor) -> None:
        self.file.write(wave.detach().float().cpu().clamp(-1, 1).numpy())
        self.samples += len(wave)

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_wav(path: str, wave: torch.Tensor, sample_rate: int) -> None:
    """A mono PCM_16 WAV (samples clipped to [-1, 1])."""
    with WavWriter(path, sample_rate) as out:
        out.write(wave)
