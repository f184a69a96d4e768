"""Streaming speech: streamed text -> phrases, and code frames -> waveform chunks as they come.

  PhraseSplitter().push(piece) -> phrases completed   split the Thinker's text while it is written
  chunked_wave(frames, codec, vocoder) -> chunks      decode and vocode code frames as the Talker makes them

Concatenated, the chunks of `chunked_wave` are the waveform of decoding and vocoding all frames at
once (up to float noise) whenever the vocoder's `context_frames` is exact (a neural vocoder); for
Griffin-Lim, whose iterations reach over the whole input, they are close. The speaking object is
`omni.generation.Speaker`; docs/inference.md, "Streaming speech", shows how the parts fit.
"""
from __future__ import annotations

import re

import torch

PHRASE_END = re.compile(r"[.,;:!?]+(?=\s)")     # punctuation, once a space follows it
WHOLE_WORD = re.compile(r"\S+(?=\s)")           # a word, once a space follows it (pieces split words)


def sayable(text: str) -> bool:
    return any(c.isalnum() for c in text)


class PhraseSplitter:
    """Text pieces in, phrases to speak out. A phrase ends at punctuation followed by a space, after
    `first_words` whole words (the first phrase: short, so that speech starts soon) or `words` (the
    later ones: longer, which the Talker speaks more naturally) and a word longer than two letters,
    or at the end of the text. Phrases with nothing to say (punctuation alone) are dropped."""

    def __init__(self, first_words: int = 3, words: int = 10):
        if first_words < 1 or words < 1:
            raise ValueError("a phrase needs at least one word")
        self.buffer, self.limit, self.words = "", first_words, words

    def push(self, piece: str) -> list[str]:
        """The phrases that this piece completes (often none)."""
        self.buffer += piece
        phrases = []
        while (cut := self._cut()) is not None:
            phrase, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:]
            if sayable(phrase):
                phrases.append(phrase)
                self.limit = self.words
        return phrases

    def end(self) -> list[str]:
        """The rest of the text, once no more pieces come."""
        rest, self.buffer = self.buffer.strip(), ""
        return [rest] if sayable(rest) else []

    def _cut(self) -> int | None:
        """Where the first complete phrase of the buffer ends, None when none is complete yet."""
        cuts = [m.end() for m in [PHRASE_END.search(self.buffer)] if m]
        for count, word in enumerate(WHOLE_WORD.finditer(self.buffer), 1):
            # never after a word of one or two letters ("a", "of"): the phrase would sound cut off, and
            # the tiny Talker, trained on whole sentences, may not find the end of "i am a"
            if count >= self.limit and sum(c.isalnum() for c in word.group()) > 2:
                cuts.append(word.end())
                break
        return min(cuts, default=None)


@torch.no_grad()
def chunked_wave(frames, codec, vocoder, first_chunk: int = 4, max_chunk: int = 64):
    """Yield waveform chunks (1-D, CPU, at vocoder.sample_rate) of code frames [n_q] read from an
    iterator (the Talker's `stream`), each as soon as its samples can no longer change.

    Mel frame m (of code frame m // f) is final once the codes within `codec.decode_context` of it
    have come; the samples of mel frames [s, e), wave[s * hop : e * hop], once the mel frames within
    `vocoder.context_frames` of them are final. A chunk decodes only the codes and vocodes only the
    mel frames that its samples depend on, so the work stays linear in the length. Chunks start at
    `first_chunk` mel frames (10 ms each: the listener hears speech early) and double up to
    `max_chunk` (fewer, larger calls once playback is under way)."""
    f, context = codec.arch.downsample, codec.decode_context
    reach = max(vocoder.context_frames, 1)       # at least 1: the samples of frame j end at frame j + 1
    codes, done, want = [], 0, first_chunk
    for frame in frames:
        codes.append(frame)
        end = (len(codes) - context) * f - reach        # mel frames [0, end) have final samples
        if end - done >= want:
            yield _wave_of(torch.stack(codes), done, end, codec, vocoder, reach, finished=False)
            done, want = end, min(2 * want, max_chunk)
    total = len(codes) * f - 1              # the last mel frame has no samples: (T - 1) * hop in all
    if total > done:
        yield _wave_of(torch.stack(codes), done, total, codec, vocoder, reach, finished=True)


def _wave_of(codes, start: int, end: int, codec, vocoder, reach: int, finished: bool) -> torch.Tensor:
    """The samples of mel frames [start, end) of the codes [T, n_q] so far."""
    f, context = codec.arch.downsample, codec.decode_context
    lo = max(0, start - reach)
    hi = len(codes) * f if finished else end + reach                  # mel frames vocoded: [lo, hi)
    first_code = max(0, lo // f - context)
    last_code = min(len(codes), -(-hi // f) + context)                # codes decoded: [first, last)
    mel = codec.decode(codes[first_code:last_code][None])[0]
    wave = vocoder.mel_to_wave(mel[lo - first_code * f: hi - first_code * f])
    return wave[(start - lo) * vocoder.hop: (end - lo) * vocoder.hop]
