"""Using trained models: text generation that streams, and speaking (text -> waveform -> WAV file).

  generate_text(thinker, tokenizer, prompt, ...)  the Thinker's continuation, piece by piece
  stream_text(token_ids, tokenizer)               decoded text pieces as token ids arrive
  Speaker(talker, codec, vocoder).speak(text)     a 1-D waveform at speaker.sample_rate
  write_wav(path, wave, sample_rate)              a mono PCM_16 WAV

The model files define the networks; what runs them for a user lives here. Loading them from a
checkpoint folder is omni/loading.py (`load_thinker`, `load_speaker`, ...).
"""
from __future__ import annotations

import os
import sys

import soundfile as sf
import torch

from omni.codec import GriffinLimVocoder, SpeechCodec, Vocoder
from omni.features import MelSpec
from omni.talker import Talker, text_to_ids
from omni.thinker import Thinker
from omni.tokenizer import Tokenizer


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


def generate_text(model: Thinker, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0, device="cpu"):
    """Yield the Thinker's continuation of a plain-text prompt, piece by piece."""
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return stream_text(model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      eos_id=tokenizer.eos_id, generator=generator), tokenizer)


# ----------------------------------------------------------------------------- speech
class Speaker:
    """Text -> waveform: Talker codes -> codec decoder (log-mel) -> vocoder."""

    def __init__(self, talker: Talker, codec: SpeechCodec, vocoder: Vocoder | None = None):
        self.talker, self.codec = talker, codec
        self.vocoder = vocoder or GriffinLimVocoder(MelSpec(n_mels=codec.arch.n_mels))
        self.sample_rate = self.vocoder.sample_rate

    @torch.no_grad()
    def codes(self, text: str, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
        said, dropped = self.talker.charset.split(text)
        if dropped:     # a one-line note: the caller hears the rest of the sentence
            print(f"note: the Talker cannot read {len(dropped)} kind(s) of character, "
                  f"{sum(dropped.values())} dropped: {''.join(sorted(dropped))!r}", file=sys.stderr)
        ids = text_to_ids(said, self.talker.charset).to(self.talker.speech_start.device)
        if len(ids) == 0:
            return torch.zeros(0, self.talker.n_codebooks, dtype=torch.long)
        generator = torch.Generator(device=ids.device).manual_seed(seed)
        return self.talker.generate(ids, temperature, top_k, generator)

    @torch.no_grad()
    def codes_to_wave(self, codes: torch.Tensor) -> torch.Tensor:
        if len(codes) == 0:
            return torch.zeros(0)
        return self.vocoder.mel_to_wave(self.codec.decode(codes[None])[0])

    def speak(self, text: str, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
        """1-D float waveform at self.sample_rate (empty when the text has nothing to say).
        Greedy by default; with temperature > 0 the seed makes it repeatable."""
        return self.codes_to_wave(self.codes(text, temperature, top_k, seed))


def write_wav(path: str, wave: torch.Tensor, sample_rate: int) -> None:
    """A mono PCM_16 WAV (samples clipped to [-1, 1])."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sf.write(path, wave.detach().float().cpu().clamp(-1, 1).numpy(), sample_rate, subtype="PCM_16")
