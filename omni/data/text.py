"""Text corpora for the Thinker: lines become documents <s> ... </s>, concatenated into one token
stream that is cut into fixed windows."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from omni.data.common import DataError
from omni.data.sampler import mix_seed


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def encode_documents(tokenizer, lines: list[str]) -> torch.Tensor:
    """One int32 stream: <s> tokens </s> for every line, in order."""
    ids = tokenizer.sp.encode(lines)
    stream = []
    for piece_ids in ids:
        stream += [tokenizer.bos_id, *piece_ids, tokenizer.eos_id]
    return torch.tensor(stream, dtype=torch.int32)


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of the best model that ignores
    context. A language model is learning something only once it gets below this."""
    counts = torch.bincount(tokens.long(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


class TokenWindows(Dataset):
    """Windows of seq_len + 1 tokens (inputs and shifted targets).

    With a seed, each epoch shifts all windows by an offset drawn from (seed, epoch), so the model
    sees other cuts of the stream every epoch; without one (validation) the cut is fixed.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int | None, name: str):
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
