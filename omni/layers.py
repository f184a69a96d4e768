"""The transformer pieces every model shares: RMSNorm, RoPE, attention (SDPA, grouped-query heads,
KV cache), SwiGLU MLP, pre-norm blocks, a token sampler, and `pad_stack` (variable-length items
into one padded batch and its mask).

The Thinker and Talker use `Transformer(causal=True)`; the audio and vision encoders use
`Transformer(causal=False)` with a padding mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32: bf16 squares lose too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0):
    """cos/sin tables of shape [max_len, head_dim/2] for rotary position embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :h], x[..., h:]) of x [B, H, T, D] by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding, in buffers allocated once.

    Each layer holds a key and a value buffer [B, H_kv, max_len, D], made at its first write (batch,
    heads, dtype and device come from those keys) and written in place after that: a step copies
    its T new positions at length..length+T and attends over the filled prefix, a view; nothing is
    concatenated or reallocated. `length` = positions cached so far; the Transformer advances it
    after all layers have written.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def write(self, layer: int, k, v, start: int):
        """Store k, v [B, H_kv, T, D] at positions start..start+T-1; return keys and values 0..start+T-1."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"d_model {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}: heads must divide evenly")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x, rope, causal: bool, key_mask=None, cache: KVCache | None = None, layer: int = 0,
                start: int = 0):
        """x [B, T, D] holds positions start..start+T-1; the cache holds the `start` before them."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope[0][start:start + T], rope[1][start:start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v, start)
        mask, is_causal = key_mask, False
        if causal and T > 1:
            if start == 0 and mask is None:
                is_causal = True
            else:  # queries at start..start+T-1 see keys up to their own position
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
                mask = mask if key_mask is None else mask & key_mask
        dropout = self.dropout if self.training else 0.0
        if is_causal and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            y = causal_attention_written_out(q, k, v, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def causal_attention_written_out(q, k, v, dropout: float = 0.0):
    """Causal softmax(q k^T / sqrt(D)) v of q [B, H, T, D] and k, v [B, H_kv, T, D], as plain
    matmuls (softmax in float32). For bf16 on the CPU: there torch's fused attention kernel runs
    its backward several times slower than in fp32 (torch 2.14), while these matmuls run at bf16
    speed; amp=bf16 then trains the Thinker 1.4-1.6x faster than fp32 instead of 0.8x (docs/bench.md)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    probs = F.dropout(scores.masked_fill(future, float("-inf")).softmax(dim=-1), dropout)
    return probs.to(v.dtype) @ v


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn_hidden, dropout):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, n_heads, n_kv_heads, dropout)
        self.mlp = SwiGLU(dim, ffn_hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope, causal, key_mask, cache, layer, start):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, causal, key_mask, cache, layer, start))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks with a final norm.

    rope: use rotary positions (max_len bounds the table); encoders that add learned positions
    pass rope=False. pad_mask [B, T] is True at real positions; padded keys are never attended.
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                 ffn_hidden: int | None = None, causal: bool = True, rope: bool = True,
                 max_len: int = 2048, dropout: float = 0.0, rope_theta: float = 10000.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        ffn_hidden = ffn_hidden or int(8 * dim / 3 / 16 + 0.5) * 16
        self.causal, self.max_len = causal, max_len
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads, ffn_hidden, dropout) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        if rope:
            cos, sin = rope_tables(dim // n_heads, max_len, rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.rope = rope
        init_weights(self, n_layers)

    def forward(self, x, pad_mask=None, cache: KVCache | None = None):
        start = cache.length if cache is not None else 0
        if start + x.shape[1] > self.max_len:
            raise ValueError(f"sequence of {start + x.shape[1]} positions exceeds max_len {self.max_len}")
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        key_mask = None if pad_mask is None else pad_mask[:, None, None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, self.causal, key_mask, cache, i, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.norm(x)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to max_len positions (default: this stack's max_len)."""
        return KVCache(len(self.blocks), min(max_len or self.max_len, self.max_len))


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02):
    """Small normal init; residual output projections scaled down by depth for stable training."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)


def sample_next(logits, temperature: float = 1.0, top_k: int = 0, generator=None):
    """Pick next ids from logits [B, V]: greedy when temperature <= 0, else top-k sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_stack(tensors, value=0.0):
    """Stack tensors of shape [T_i, ...] into [B, T_max, ...] and a mask [B, T_max] (True = real)."""
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), value)
    mask = torch.zeros(len(tensors), longest, dtype=torch.bool, device=out.device)
    for i, t in enumerate(tensors):
        out[i, :t.shape[0]] = t
        mask[i, :t.shape[0]] = True
    return out, mask
