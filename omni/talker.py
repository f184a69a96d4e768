"""The Talker: a causal transformer that speaks, predicting speech-codec codes frame by frame.

Input sequence of one utterance (see docs/stage_d_talker.md):

    [c_1 ... c_n]        the characters of the normalised text, ids in the architecture's `charset`
                         (omni/transcripts.py; dropped characters noted), or n Thinker hidden states through
                         `cond_proj`), then
    [S, f_1 ... f_T]     a learned start-of-speech vector and the code frames so far (the sum of one
                         embedding per codebook).

The output at S and at every f_t predicts the codes of the next frame, one head per codebook; the
head of codebook 0 has one extra class, end-of-speech (EOS), which is the target after the last
frame. Every position also gets a *progress* feature: i/n for text, t/T for speech, so "where am I
in the sentence" is the same number on both sides and attention can find the characters being
spoken from the first steps of training (alignment is the slow part of TTS on tiny data). In
training T is the clip's true length, so the feature is exact whatever the speaking rate; a small
head predicts T from the text, and generation uses that prediction. Attention alone learned to
read too slowly on 800 clips (the Talker said fluent but wrong words), so each speech frame is also
handed the encoded characters around character floor(t/T * n) (`text_window`). Each utterance also
carries a *source* embedding: 0 is the voice the Talker speaks with, others mark extra training
speech (other voices). Generation uses the KV cache and always stops: at EOS or at a frame limit
from the text length; `stream` yields the frames as they come (speech can be played before the
utterance ends), `generate` collects them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from omni.codec import CodecArch
from omni.config import Arch, check_heads, non_negative, positive, probability
from omni.layers import Transformer, pad_stack, sample_next
from omni.transcripts import LEGACY_TALKER_CHARS, Charset, normalize_transcript

CHARS = LEGACY_TALKER_CHARS                  # the set of checkpoints without a `charset` key
PAD_ID = 0                                   # id 0 is padding; characters are 1..len(charset)
PROGRESS_FREQS = 16
_LEGACY = Charset(CHARS)


def charset_of(arch) -> Charset:
    """The characters a Talker reads (the legacy set when the architecture's `charset` is empty)."""
    return Charset(arch.charset) if arch.charset else _LEGACY


normalize_text = normalize_transcript


def text_to_ids(text: str, charset: Charset = _LEGACY) -> torch.Tensor:
    """Character ids of the text; characters outside the set are dropped."""
    return torch.tensor(charset.encode(text), dtype=torch.long)


@dataclass
class TalkerArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(d_model=192, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512, dropout=0.1, text_layers=2,
                     n_sources=2, text_window=4),
        "base": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=640, dropout=0.1, text_layers=4,
                     frame_dropout=0.1, text_window=4, charset=""),
    }
    d_model: int = positive(192)
    n_layers: int = positive(4)
    n_heads: int = positive(4)
    n_kv_heads: int = positive(2)
    ffn_hidden: int = non_negative(0)   # 0: about 8/3 * d_model
    max_seq_len: int = positive(512)    # characters + code frames + 1
    dropout: float = probability(0.1)
    text_layers: int = non_negative(2)  # bidirectional layers over the prefix (0 = none)
    frame_dropout: float = probability(0.0)  # training: share of input code frames hidden, so the text must be read
    cond_dim: int = non_negative(0)     # > 0: also accept Thinker hidden states of this width
    n_sources: int = positive(2)        # speech sources (0 = the Talker's own voice, 1 = extra voices)
    text_window: int = non_negative(4)  # > 0: each speech frame also gets the encoded characters within
                                        # this many of where its progress points (0 = attention only)
    charset: str = ""              # characters read; "": the stage fills it from the training transcripts

    def __post_init__(self):
        super().__post_init__()
        check_heads(self, "d_model", "n_heads", "n_kv_heads", rotary=True)

    def network(self):
        """The Talker over the default codec's codebooks (the codec's own check covers their size)."""
        codec = CodecArch()
        return Talker(self, codec.n_codebooks, codec.codebook_size)


def progress_features(ratio: torch.Tensor) -> torch.Tensor:
    """ratio [L] (0 = start, 1 = expected end) -> sinusoids [L, 2 * PROGRESS_FREQS] from 1/4 to 64
    cycles per utterance: coarse ones say roughly where, fine ones exactly where."""
    freqs = 0.25 * 256 ** (torch.arange(PROGRESS_FREQS, device=ratio.device) / (PROGRESS_FREQS - 1))
    angles = 2 * math.pi * ratio.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Talker(nn.Module):
    def __init__(self, arch: TalkerArch, n_codebooks: int, codebook_size: int):
        super().__init__()
        d = arch.d_model
        self.arch, self.n_codebooks, self.eos = arch, n_codebooks, codebook_size
        self.charset = charset_of(arch)
        self.text_embed = nn.Embedding(len(self.charset) + 1, d, padding_idx=PAD_ID)
        self.cond_proj = nn.Linear(arch.cond_dim, d) if arch.cond_dim else None
        self.code_embed = nn.ModuleList(nn.Embedding(codebook_size, d) for _ in range(n_codebooks))
        self.speech_start = nn.Parameter(torch.zeros(d))
        self.segment = nn.Embedding(2, d)           # 0 = text side, 1 = speech side
        self.progress = nn.Linear(2 * PROGRESS_FREQS, d, bias=False)
        self.source = nn.Embedding(arch.n_sources, d)
        self.length_head = nn.Linear(d, 1)           # log(code frames / characters) of the utterance
        w = arch.text_window
        self.window_proj = nn.Linear((2 * w + 1) * d, d, bias=False) if w else None
        nn.init.zeros_(self.length_head.weight)      # starts at the data's average rate
        nn.init.zeros_(self.length_head.bias)
        # Reading a word takes several characters; a causal prefix would let "b" of "blue" see only
        # what came before it. A small bidirectional encoder gives every character its word first.
        self.text_encoder = Transformer(
            d, arch.text_layers, arch.n_heads, arch.n_kv_heads, arch.ffn_hidden or None, causal=False,
            max_len=arch.max_seq_len, dropout=arch.dropout) if arch.text_layers else None
        self.body = Transformer(d, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.ffn_hidden or None,
                                causal=True, max_len=arch.max_seq_len, dropout=arch.dropout)
        self.heads = nn.ModuleList(nn.Linear(d, codebook_size + (k == 0)) for k in range(n_codebooks))
        for p in [self.speech_start, self.progress.weight, self.segment.weight, self.text_embed.weight,
                  self.source.weight, *(e.weight for e in self.code_embed)]:
            nn.init.normal_(p, std=0.02)
        # Code frames per character of the training data (set by the stage, saved with the weights):
        # the length prediction starts there, and it bounds the length of generated speech.
        self.register_buffer("frames_per_char", torch.tensor(1.0))

    # ------------------------------------------------------------------ inputs
    def text_inputs(self, text) -> torch.Tensor:
        """Character ids [n] or Thinker hidden states [n, cond_dim] -> input vectors [n, d]."""
        if text.dim() == 2:
            if self.cond_proj is None:
                raise ValueError("this Talker was built with cond_dim=0: it reads characters only")
            x = self.cond_proj(text)
        else:
            x = self.text_embed(text)
        ratio = torch.arange(len(x), device=x.device) / max(len(x), 1)
        return x + self.segment.weight[0] + self.progress(progress_features(ratio))

    def prefixes(self, texts: list) -> list[torch.Tensor]:
        """The prefix vectors [n_i, d] of a batch of texts, through the text encoder together."""
        x, mask = pad_stack([self.text_inputs(t) for t in texts])
        if self.text_encoder is not None:
            x = self.text_encoder(x, pad_mask=mask)
        return [x[i, :len(t)] for i, t in enumerate(texts)]

    def speech(self, x: torch.Tensor, positions: torch.Tensor, total: float, source: int,
               prefix: torch.Tensor) -> torch.Tensor:
        """Speech-side inputs x [L, d] at positions (0 = start of speech) of an utterance `total`
        frames long, after the encoded prefix [n, d]."""
        ratio = positions / max(total, 1.0)
        x = x + self.segment.weight[1] + self.source.weight[source] + self.progress(progress_features(ratio))
        return x if self.window_proj is None else x + self.text_window_inputs(prefix, ratio)

    def text_window_inputs(self, prefix: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """The prefix vectors around character floor(ratio * n), side by side, projected: [L, d].
        Progress says roughly which character is being spoken; handing its neighbourhood to every
        frame makes reading work from the first steps instead of after attention finds it, and the
        window covers characters that are spoken faster or slower than average."""
        n, w = len(prefix), self.arch.text_window
        centre = (ratio * n).floor().long().clamp(0, max(n - 1, 0))
        padded = F.pad(prefix, (0, 0, w, w))                               # zeros beyond either end
        window = padded[centre[:, None] + torch.arange(2 * w + 1, device=prefix.device)]   # [L, 2w+1, d]
        return self.window_proj(window.reshape(len(ratio), -1))

    def log_length(self, prefix: torch.Tensor, source: int) -> torch.Tensor:
        """Predicted log(code frames / prefix items) of one utterance, from its prefix [n, d]."""
        pooled = prefix.mean(0) + self.source.weight[source]
        return self.length_head(pooled)[0] + self.frames_per_char.log()

    def predicted_frames(self, prefix: torch.Tensor, source: int = 0) -> float:
        return float(self.log_length(prefix, source).detach().exp()) * len(prefix)

    def frame_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_q] -> the sum of their embeddings [..., d]."""
        return sum(emb(codes[..., k]) for k, emb in enumerate(self.code_embed))

    def sequence(self, prefix: torch.Tensor, codes: torch.Tensor, source: int) -> torch.Tensor:
        """Teacher-forcing inputs of one utterance: prefix [n, d], start of speech, frames [T, n_q]."""
        frames = self.frame_embed(codes)
        if self.training and self.arch.frame_dropout > 0:
            # Hide some past frames (global RNG: saved with the checkpoint, so resume stays exact):
            # with every frame visible, continuing the sound is easier than reading the text.
            keep = torch.rand(len(frames), 1, device=frames.device) >= self.arch.frame_dropout
            frames = frames * keep
        frames = torch.cat([self.speech_start[None], frames])
        positions = torch.arange(len(frames), device=codes.device)
        return torch.cat([prefix, self.speech(frames, positions, len(codes), source, prefix)])

    # ------------------------------------------------------------------ training
    def forward(self, texts: list, codes: list[torch.Tensor], sources: list[int] | None = None):
        """(logits per codebook [B, L, V_k], predicted log lengths [B]) for a batch of utterances
        (right-padded: with causal attention, padding after the end is never seen by real
        positions, so no mask is needed). Sources default to 0."""
        sources = sources or [0] * len(texts)
        prefixes = self.prefixes(texts)
        x, _ = pad_stack([self.sequence(p, c, s) for p, c, s in zip(prefixes, codes, sources)])
        h = self.body(x)
        log_lengths = torch.stack([self.log_length(p, s) for p, s in zip(prefixes, sources)])
        return [head(h) for head in self.heads], log_lengths

    def loss(self, texts: list, codes: list[torch.Tensor], sources: list[int] | None = None):
        """Mean cross-entropy over codebooks (EOS included in codebook 0) plus the squared error of
        the predicted log length; accuracies and the length error (in %) as metrics."""
        logits, log_lengths = self(texts, codes, sources)
        targets = torch.full(logits[0].shape[:2] + (self.n_codebooks,), -100, dtype=torch.long,
                             device=logits[0].device)
        for i, (t, c) in enumerate(zip(texts, codes)):
            n, T = len(t), len(c)
            targets[i, n:n + T] = c
            targets[i, n + T, 0] = self.eos
        losses, metrics = [], {}
        for k, lg in enumerate(logits):
            tk = targets[..., k]
            losses.append(F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), tk.reshape(-1), ignore_index=-100))
            real = tk != -100
            metrics[f"acc_{k}"] = float((lg.argmax(-1)[real] == tk[real]).float().mean())
        eos_rows = targets[..., 0] == self.eos
        metrics["eos_acc"] = float((logits[0].argmax(-1)[eos_rows] == self.eos).float().mean())
        true = torch.tensor([math.log(len(c) / max(len(t), 1)) for t, c in zip(texts, codes)],
                            device=log_lengths.device)
        length_loss = F.mse_loss(log_lengths.float(), true)
        metrics["len_err"] = 100 * float((log_lengths.detach().float() - true).abs().mean())
        metrics["n_frames"] = sum(len(c) for c in codes)
        return torch.stack(losses).mean() + length_loss, metrics

    # ------------------------------------------------------------------ generation
    def max_frames(self, n_text: int) -> int:
        """The most code frames generated for n_text characters: three times the average rate plus
        a margin (short words take relatively longest), within max_seq_len."""
        limit = math.ceil(3 * float(self.frames_per_char) * n_text) + 12
        return max(1, min(limit, self.arch.max_seq_len - n_text - 1))

    @torch.no_grad()
    def stream(self, text, temperature: float = 0.0, top_k: int = 0, generator=None,
               max_frames: int | None = None, source: int = 0):
        """Yield the code frames [n_q] of one utterance as they are generated: ids [n] or hidden
        states [n, cond_dim]. Greedy when temperature <= 0. Stops at end-of-speech or after
        max_frames (default: from the text length)."""
        n = len(text)
        limit = min(max_frames or self.max_frames(n), self.arch.max_seq_len - n - 1)
        device = self.speech_start.device
        cache = self.body.new_cache(n + 1 + limit)
        prefix = self.prefixes([text])[0]
        total = self.predicted_frames(prefix, source)
        start = self.speech(self.speech_start[None], torch.zeros(1, device=device), total, source, prefix)
        x = torch.cat([prefix, start])[None]
        for t in range(1, limit + 1):
            h = self.body(x, cache=cache)[:, -1]
            first = sample_next(self.heads[0](h), temperature, top_k, generator)
            if first.item() == self.eos:
                return
            row = torch.stack([first] + [sample_next(head(h), temperature, top_k, generator)
                                         for head in self.heads[1:]], dim=-1)       # [1, n_q]
            yield row[0]
            x = self.speech(self.frame_embed(row), torch.full((1,), t, device=device), total, source, prefix)[None]

    def generate(self, text, temperature: float = 0.0, top_k: int = 0, generator=None,
                 max_frames: int | None = None, source: int = 0) -> torch.Tensor:
        """Codes [T, n_q] of one utterance: `stream`'s frames, all at once."""
        frames = list(self.stream(text, temperature, top_k, generator, max_frames, source))
        if not frames:
            return torch.zeros(0, self.n_codebooks, dtype=torch.long, device=self.speech_start.device)
        return torch.stack(frames)
