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
    def train(text_files: list[str], out_path: str, vocab_size: int, sample_bytes: int = 0) -> "Tokenizer":
        """Train BPE on the text files and write the model to out_path atomically.

        Deterministic: one thread, sentences in file order. When the files together are larger than
        sample_bytes (> 0), it trains on `sample_lines` of them; otherwise on every sentence.
        """
        if sample_bytes and sum(os.path.getsize(p) for p in text_files) > sample_bytes:
            source = {"sentence_iterator": sample_lines(text_files, sample_bytes)}
        else:
            source = {"input": ",".join(text_files)}
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            **source, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, user_defined_symbols=list(SPECIAL_TOKENS),
            character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, hard_vocab_limit=False, minloglevel=2)
        atomic_write(out_path, lambda f: f.write(model.getvalue()))
        return Tokenizer(out_path)


def sample_lines(text_files: list[str], sample_bytes: int, max_blocks: int = 1024, min_block: int = 4096):
    """About sample_bytes of whole, non-empty, stripped lines, read from blocks evenly spaced through the
    files (taken as one stream of bytes; a block starts at the first line that begins at or after its
    position). The same files always give the same sample; only the sampled bytes are read."""
    sizes = [os.path.getsize(p) for p in text_files]
    total = sum(sizes)
    n = max(1, min(max_blocks, sample_bytes // min_block))
    block = sample_bytes // n
    starts = [total * j // n for j in range(n)]
    offset = 0
    for path, size in zip(text_files, sizes):
        mine = [s - offset for s in starts if offset <= s < offset + size]
        offset += size
        with open(path, "rb") as f:
            end = 0                     # where the previous block stopped: blocks never overlap
            for start in mine:
                pos = max(start, end)
                f.seek(max(pos - 1, 0))
                if pos > 0:
                    f.readline()        # to the start of the next line (none skipped if pos begins one)
                taken = 0
                while taken < block and (raw := f.readline()):
                    taken += len(raw)
                    try:
                        lines = raw.decode("utf-8").split("\r")
                    except UnicodeDecodeError as e:
                        raise UserError(f"{path}: not UTF-8 text ({e.reason} near byte "
                                        f"{f.tell() - len(raw) + e.start})") from None
                    yield from (line.strip() for line in lines if line.strip())
                end = f.tell()
