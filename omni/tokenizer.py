"""SentencePiece BPE tokenizer with the special tokens the later stages need.

Ids 0-3 are <pad>, <unk>, <s>, </s>; the span markers below follow in a fixed order, so every
tokenizer this suite trains has the same special ids.
"""
from __future__ import annotations

import codecs
import io
import os

import sentencepiece as spm

from omni.checkpoint import atomic_write
from omni.config import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Marks for image and audio spans in SFT sequences and for the turns of a conversation.
SPECIAL_TOKENS = ("<img>", "</img>", "<audio>", "</audio>", "<user>", "<assistant>")
# SentencePiece skips a training sentence longer than max_sentence_length (4192 bytes), and fails on a
# corpus left with none (a one-line file): lines are cut below it, at whitespace, instead (`read_sentences`).
MAX_SENTENCE_BYTES = 4096


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"tokenizer not found: {path}")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError):     # sentencepiece reports a damaged file as a RuntimeError
            raise UserError(f"{path}: not a SentencePiece tokenizer model (damaged, or another kind of file)") \
                from None
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
        sample_bytes (> 0), it trains on `sample_lines` of them; otherwise on every line. A line longer
        than MAX_SENTENCE_BYTES is cut into sentences below it (`read_sentences`).
        """
        if sample_bytes and sum(os.path.getsize(p) for p in text_files) > sample_bytes:
            sentences = sample_lines(text_files, sample_bytes)
        else:
            sentences = every_line(text_files)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, user_defined_symbols=list(SPECIAL_TOKENS),
            character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, hard_vocab_limit=False, minloglevel=2)
        atomic_write(out_path, lambda f: f.write(model.getvalue()))
        return Tokenizer(out_path)


def read_sentences(f, path: str, budget: int = 0):
    """Stripped non-empty lines of the binary file f from its position on, to its end or, with a budget
    (> 0), until that many bytes were read. A line longer than MAX_SENTENCE_BYTES comes in pieces of
    at most about that many bytes, cut at its last space or tab (mid-word only where a piece has none;
    BPE counts the same words either way), so a line of any length is read in bounded memory.
    UserError naming the file where it is not UTF-8."""
    decoder, tail, taken = codecs.getincrementaldecoder("utf-8")(), "", 0
    while not budget or taken < budget:
        size = MAX_SENTENCE_BYTES - len(tail.encode())
        raw = f.readline(size)
        taken += len(raw)
        try:    # a character cut at the chunk's end waits in the decoder; at the end of the file it is an error
            text, tail = tail + decoder.decode(raw, final=not raw), ""
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} near byte {f.tell() - len(raw) + e.start})") from None
        if len(raw) == size and not raw.endswith(b"\n"):   # inside a long line: keep the word it may cut
            cut = max(text.rfind(" "), text.rfind("\t"))
            if cut > 0:
                text, tail = text[:cut], text[cut + 1:]
        yield from (line.strip() for line in text.split("\r") if line.strip())
        if not raw:
            return
    if tail.strip():
        yield tail.strip()


def every_line(text_files: list[str]):
    """`read_sentences` of every file, in order."""
    for path in text_files:
        with open(path, "rb") as f:
            yield from read_sentences(f, path)


def sample_lines(text_files: list[str], sample_bytes: int, max_blocks: int = 1024, min_block: int = 4096):
    """About sample_bytes of whole, non-empty, stripped lines (`read_sentences`: a long line in pieces), read
    from blocks evenly spaced through the files (taken as one stream of bytes; a block starts at the first
    line that begins at or after its position). The same files always give the same sample; only the
    sampled bytes are read."""
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
                yield from read_sentences(f, path, block)
                end = f.tell()
