"""The audio encoder (log-mel -> conv downsampling -> transformer) and its CTC speech recognizer.

Public API used by later stages (SFT, Talker; loaded by omni/loading.py: load_audio_encoder, load_asr):
  AudioEncoder   forward(mel [B,T,n_mels], mask [B,T]) -> (hidden, mask')
  ASR            transcribe(waves) -> list[str]

CTC labels (index 0 is the CTC blank): the characters of the `charset` config key get ids 1..n.
Stage B fills it from its training transcripts (omni/transcripts.py: normalisation, and
characters outside the set dropped and counted); a checkpoint saved before the key existed has
none and gets the fixed set it was trained with, CHARSET (space, apostrophe, a..z).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from omni.config import Arch, ArchError, check_heads, non_negative, positive, probability
from omni.features import LogMel, MelSpec
from omni.layers import Transformer, pad_stack
from omni.transcripts import LEGACY_ASR_CHARS, Charset, normalize_transcript

BLANK = 0
CHARSET = LEGACY_ASR_CHARS                 # the set of checkpoints without a `charset` key
VOCAB_SIZE = len(CHARSET) + 1
_LEGACY = Charset(CHARSET)


# ----------------------------------------------------------------------------- text <-> ids
def charset_of(arch) -> Charset:
    """The CTC character set of an architecture (the legacy set when its `charset` is empty)."""
    return Charset(arch.charset) if arch.charset else _LEGACY


normalize_text = normalize_transcript


def text_to_ids(text: str) -> list[int]:
    """Labels in the legacy set (a trained model's own set: `ASR.charset.encode`)."""
    return _LEGACY.encode(text)


def ids_to_text(ids) -> str:
    return _LEGACY.decode(ids)


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path of each sequence: argmax per frame, merge repeats, drop blanks.

    log_probs [B, T, V] (or any scores), lengths [B] = valid frames of each sequence.
    """
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for seq, n in zip(best, lengths.tolist()):
        seq = seq[:n]
        keep = torch.ones_like(seq, dtype=torch.bool)
        keep[1:] = seq[1:] != seq[:-1]
        out.append([int(i) for i in seq[keep] if i != BLANK])
    return out


# ----------------------------------------------------------------------------- model
@dataclass
class AudioEncArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(n_mels=80, d_model=144, n_layers=4, n_heads=4, downsample=4, dropout=0.0),
        "base": dict(n_mels=80, d_model=384, n_layers=12, n_heads=6, downsample=4, dropout=0.1, charset=""),
    }
    n_mels: int = positive(80)
    d_model: int = positive(144)
    n_layers: int = positive(4)
    n_heads: int = positive(4)
    ffn_hidden: int = non_negative(0)   # 0: about 8/3 * d_model
    downsample: int = positive(4)       # time reduction of the conv front end: 1, 2, 4, 8, ...
    dropout: float = probability(0.1)
    max_positions: int = positive(4096)  # rotary table length, in downsampled frames (164 s at 4x)
    charset: str = ""          # CTC characters; "": the stage fills it from the training transcripts

    def __post_init__(self):
        super().__post_init__()
        check_heads(self, "d_model", "n_heads", rotary=True)
        if self.downsample & (self.downsample - 1):     # stride-2 convolutions halve the frames
            raise ArchError(f"config key 'downsample': must be a power of two, got {self.downsample}")

    def network(self):
        """The encoder (the CTC head's size follows the charset)."""
        return AudioEncoder(self)


def masked_normalize(mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-utterance, per-band mean/variance normalisation over the real frames (padding -> 0).

    Loudness and microphone colour then matter less, and a batch gives what each clip alone gives.
    """
    m = mask[..., None].to(mel.dtype)
    n = m.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (mel * m).sum(dim=1, keepdim=True) / n
    var = ((mel - mean) ** 2 * m).sum(dim=1, keepdim=True) / n
    return (mel - mean) * torch.rsqrt(var + 1e-5) * m


def downsampled_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Mask after `log2(factor)` stride-2 convolutions (kernel 3, padding 1): length -> ceil(L/2) each."""
    lengths = mask.sum(dim=1)
    steps = factor.bit_length() - 1
    for _ in range(steps):
        lengths = (lengths + 1) // 2
    t_out = mask.shape[1]
    for _ in range(steps):
        t_out = (t_out + 1) // 2
    return torch.arange(t_out, device=mask.device)[None, :] < lengths[:, None]


class AudioEncoder(nn.Module):
    """mel [B, T, n_mels] + mask [B, T] -> hidden [B, T', d_model] + mask' [B, T'] (T' = T / downsample)."""

    def __init__(self, arch: AudioEncArch):
        super().__init__()
        f = arch.downsample     # a power of two (AudioEncArch)
        self.arch, self.out_dim = arch, arch.d_model
        convs, width = [], arch.n_mels
        for _ in range(f.bit_length() - 1):
            convs.append(nn.Conv1d(width, arch.d_model, kernel_size=3, stride=2, padding=1))
            width = arch.d_model
        self.convs = nn.ModuleList(convs)
        self.inp = nn.Linear(width, arch.d_model)
        self.body = Transformer(arch.d_model, arch.n_layers, arch.n_heads, ffn_hidden=arch.ffn_hidden or None,
                                causal=False, rope=True, max_len=arch.max_positions, dropout=arch.dropout)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor):
        x = masked_normalize(mel, mask)
        for conv in self.convs:
            # Zero the padding after every conv so a clip's frames do not depend on what pads it.
            mask = downsampled_mask(mask, 2)
            x = nn.functional.gelu(conv(x.transpose(1, 2))).transpose(1, 2) * mask[..., None].to(x.dtype)
        return self.body(self.inp(x), pad_mask=mask), mask


class ASR(nn.Module):
    """Audio encoder + linear CTC head over the characters; greedy decoding."""

    def __init__(self, arch: AudioEncArch, spec: MelSpec | None = None):
        super().__init__()
        self.spec = spec or MelSpec(n_mels=arch.n_mels)
        self.enc = AudioEncoder(arch)
        self.charset = charset_of(arch)
        self.head = nn.Linear(arch.d_model, len(self.charset) + 1)
        self.logmel = LogMel(self.spec)

    def forward(self, mel, mask):
        """CTC log-probabilities [B, T', V] (float32) and their mask [B, T']."""
        hidden, mask = self.enc(mel, mask)
        return torch.log_softmax(self.head(hidden).float(), dim=-1), mask

    @torch.no_grad()
    def transcribe(self, waves: list[torch.Tensor], batch_size: int = 16) -> list[str]:
        """Greedy CTC transcripts of 1-D float waveforms at spec.sample_rate (16 kHz)."""
        device = self.head.weight.device
        out = []
        for start in range(0, len(waves), batch_size):
            mels = [self.logmel(w.float().to(device)) for w in waves[start:start + batch_size]]
            mel, mask = pad_stack(mels)
            hidden, mask = self.enc(mel.to(device), mask.to(device))
            out += [self.charset.decode(ids) for ids in ctc_greedy_decode(self.head(hidden).float(), mask.sum(dim=1))]
        return out
