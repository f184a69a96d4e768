"""Text corpora for the Thinker: lines become documents <s> ... </s>, concatenated into one token
stream that is cut into fixed windows.

The stream lives in memory (`encode_documents`, a tensor) or in memory-mapped shards on disk
(omni/data/shards.py); `TokenWindows` cuts either the same way, so both give the same windows.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Dataset

from omni.data.common import DataError
from omni.data.sampler import mix_seed


def iter_lines(path: str) -> Iterator[tuple[str, int]]:
    """(line, bytes read since the previous line yielded) for every non-empty stripped line of a
    UTF-8 text file, read line by line. Line ends are those of Python's text mode (\\n, \\r\\n, \\r)."""
    consumed = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            consumed += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            for part in text.split("\r") if "\r" in text else (text,):
                line = part.strip()
                if line:
                    yield line, consumed
                    consumed = 0


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    return [line for line, _ in iter_lines(path)]


def encode_documents(tokenizer, lines: list[str]) -> torch.Tensor:
    """One int32 stream: <s> tokens </s> for every line, in order."""
    ids = tokenizer.sp.encode(lines)
    stream = []
    for piece_ids in ids:
        stream += [tokenizer.bos_id, *piece_ids, tokenizer.eos_id]
    return torch.tensor(stream, dtype=torch.int32)


def unigram_entropy(counts) -> float:
    """Entropy in nats of token frequencies (`counts[id]`, e.g. a bincount of the corpus): the loss
    of the best model that ignores context. A language model is learning something only once it
    gets below this."""
    counts = torch.as_tensor(counts).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


class TokenWindows(Dataset):
    """Windows of seq_len + 1 tokens (inputs and shifted targets) of a token stream: a tensor, or
    anything with len() and slicing to a tensor (omni.data.shards.ShardedTokens).

    With a seed, each epoch shifts all windows by an offset drawn from (seed, epoch), so the model
    sees other cuts of the stream every epoch; without one (validation) the cut is fixed. Length
    and item access are O(1), whatever the size of the stream.
    """

    def __init__(self, tokens, seq_len: int, seed: int | None, name: str):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        room = len(tokens) - 1 - (seq_len if seed is not None else 0)
        self.count = max(0, room // seq_len)
        if self.count == 0:
            raise DataError(f"{name}: {len(tokens)} tokens are too few for one window of seq_len {seq_len}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key):
        index, epoch = key
        offset = 0 if self.seed is None else mix_seed(self.seed, epoch) % self.seq_len
        start = index * self.seq_len + offset
        return self.tokens[start:start + self.seq_len + 1].long()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
