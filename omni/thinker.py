"""The Thinker: a decoder-only language model over token ids or ready-made embeddings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from omni.config import Arch, above, check_heads, non_negative, positive, probability
from omni.layers import KVCache, Transformer, sample_next


@dataclass
class ThinkerArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
        "base": dict(vocab_size=16384, d_model=640, n_layers=12, n_heads=10, n_kv_heads=5, max_seq_len=1024),
    }
    # SentencePiece counts pieces in an int32 (and token shards hold ids as uint16 or uint32)
    vocab_size: int = field(default=512, metadata={"min": 1, "max": 2**31 - 1})
    d_model: int = positive(128)
    n_layers: int = positive(4)
    n_heads: int = positive(4)
    n_kv_heads: int = positive(2)
    ffn_hidden: int = non_negative(0)   # 0: about 8/3 * d_model
    max_seq_len: int = positive(256)
    dropout: float = probability(0.0)
    rope_theta: float = above(10000.0)

    def __post_init__(self):
        super().__post_init__()
        check_heads(self, "d_model", "n_heads", "n_kv_heads", rotary=True)

    def network(self):
        return Thinker(self)


class Thinker(nn.Module):
    def __init__(self, arch: ThinkerArch):
        super().__init__()
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.body = Transformer(arch.d_model, arch.n_layers, arch.n_heads, arch.n_kv_heads,
                                arch.ffn_hidden or None, causal=True, max_len=arch.max_seq_len,
                                dropout=arch.dropout, rope_theta=arch.rope_theta)
        # Tied output head: fewer parameters, and it trains faster on small data.
        self.head = nn.Linear(arch.d_model, arch.vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids=None, embeds=None, cache: KVCache | None = None, return_hidden: bool = False):
        """Logits [B, T, V] for token ids [B, T] or embeddings [B, T, D] (exactly one of them)."""
        if (ids is None) == (embeds is None):
            raise ValueError("pass exactly one of ids or embeds")
        x = self.embed(ids) if embeds is None else embeds
        hidden = self.body(x, cache=cache)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A KV cache for up to max_len positions (default max_seq_len), allocated at its first use."""
        return self.body.new_cache(max_len)

    @torch.inference_mode()
    def generate(self, ids=None, embeds=None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, eos_id: int | None = None, generator=None, use_cache: bool = True):
        """Yield new token ids (a [B] inference-mode tensor per step: read it, do not train on it).
        Batch size 1 stops at eos_id.

        The prompt is ids [B, T] or embeddings [B, T, D]. Without the cache, every step runs the
        whole sequence again; it exists to check that the cache changes nothing.
        """
        x = self.embed(ids) if embeds is None else embeds
        steps = min(max_new_tokens, self.arch.max_seq_len - x.shape[1])
        cache = self.new_cache(x.shape[1] + steps) if use_cache else None
        for _ in range(steps):
            logits = self(embeds=x, cache=cache)[:, -1]
            nxt = sample_next(logits, temperature, top_k, generator)
            yield nxt
            if eos_id is not None and nxt.numel() == 1 and nxt.item() == eos_id:
                return
            new = self.embed(nxt[:, None])
            x = new if use_cache else torch.cat([x, new], dim=1)
