"""Transcripts as characters: the normalisation and character sets of the speech stages.

Stage B (CTC labels) and Stage D (what the Talker reads) see a transcript after one normalisation
(docs/data.md, "Transcripts, audio and images"):

1. Unicode NFKC (full-width forms, ligatures and compatibility digits become plain ones; accented
   letters are composed), then lowercase.
2. Typographic apostrophes (’ ‘ ʼ ′ `) become "'"; an apostrophe is kept only between two
   letters ("don't", "o'clock"); elsewhere it is a quotation mark and becomes a space.
3. Letters of any script (accents included) and combining marks are kept; digits are kept as
   digits (spelling numbers is language dependent: write them out in the transcripts if the model
   should say or hear words; the demo world does).
4. Everything else (punctuation, symbols, whitespace, dashes) is a word boundary: a single space.

A stage's character set (`charset` config key) is the sorted characters of its normalised training
transcripts, filled in by the stage when empty and saved with the config, so inference uses the
trained set. Characters outside it (val or test transcripts, text to speak) are dropped and counted.
Checkpoints from before the key existed load with the fixed sets the suite used then.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

from omni.config import UserError

# The fixed sets of checkpoints saved without a `charset` key.
LEGACY_ASR_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"
LEGACY_TALKER_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789"

_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u2032`"})
_QUOTE = re.compile(r"(?<![^\W\d_])'|'(?![^\W\d_])")     # an apostrophe without a letter on both sides


def _kept(c: str) -> bool:
    return c == "'" or unicodedata.category(c)[0] in "LM" or unicodedata.category(c) == "Nd"


def normalize_transcript(text: str) -> str:
    """The normalised transcript (see the module docstring): lowercase words separated by single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower().translate(_APOSTROPHES)
    text = _QUOTE.sub(" ", text)
    return " ".join("".join(c if _kept(c) else " " for c in text).split())


def derive_charset(texts) -> str:
    """The sorted characters of the normalised texts (the same set for the same data in any order)."""
    chars = set()
    for text in texts:
        chars.update(normalize_transcript(text))
    return "".join(sorted(chars))


class Charset:
    """Characters <-> ids 1..len (0 is reserved: the CTC blank of Stage B, padding in Stage D)."""

    def __init__(self, chars: str, key: str = "charset"):
        dup = [c for c, n in Counter(chars).items() if n > 1]
        odd = [c for c in chars if c not in " '" and normalize_transcript(c) != c]
        if not chars or dup or odd:
            why = (f"character {dup[0]!r} appears twice" if dup else
                   f"{odd[0]!r} never survives normalisation (lowercase letters, digits, ' and space only)"
                   if odd else "empty")
            raise UserError(f"config key '{key}': {why}")
        self.chars = chars
        self.ids = {c: i + 1 for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def split(self, text: str) -> tuple[str, Counter]:
        """(the normalised text with characters outside the set dropped, Counter of those dropped)."""
        norm = normalize_transcript(text)
        dropped = Counter(c for c in norm if c not in self.ids)
        if dropped:
            norm = " ".join("".join(c for c in norm if c in self.ids).split())
        return norm, dropped

    def normalize(self, text: str) -> str:
        return self.split(text)[0]

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in self.normalize(text)]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))
