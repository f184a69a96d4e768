"""SentencePiece BPE tokenizer with the special tokens the later stages need.

Ids 0-3 are <pad>, <unk>, <s>, </s>; the span markers below follow in a fixed order, so every
tokenizer this suite trains has the same special ids.
"""
from __future__ import annotations

import io
import os

import sentencepiece as spm

from omni.checkpoint import atomic_write
from omni.config import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Marks for image and audio spans in SFT sequences and for the turns of a conversation.
SPECIAL_TOKENS = ("<img>", "</img>", "<audio>", "</audio>", "<user>", "<assistant>")


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"tokenizer not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.special = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        self._hidden = {PAD, UNK, BOS, EOS, *self.special.values()}
        if any(self.special[tok] == UNK for tok in SPECIAL_TOKENS):
            raise UserError(f"{path}: tokenizer lacks the special tokens {SPECIAL_TOKENS}")

    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([BOS] if bos else []) + self.sp.encode(text) + ([EOS] if eos else [])

    def decode(self, ids) -> str:
        """Text of the ids, leaving out control and span-marker tokens."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._hidden])

    @staticmethod
    def train(text_files: list[str], out_path: str, vocab_size: int) -> "Tokenizer":
        """Train BPE on the text files and write the model to out_path atomically.

        Deterministic: every sentence is used, in file order, on one thread.
        """
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            input=",".join(text_files), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, user_defined_symbols=list(SPECIAL_TOKENS),
            character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, hard_vocab_limit=False, minloglevel=2)
        atomic_write(out_path, lambda f: f.write(model.getvalue()))
        return Tokenizer(out_path)
