"""The vision encoder (a small ViT) and the caption encoder it is trained against, CLIP-style.

Public API used by the SFT stage (loaded by omni/loading.py: load_vision_encoder, load_clip):
  ViT       forward(images [B,3,S,S] in [-1,1]) -> tokens [B, 1+N, d]
  CLIP      image/caption embeddings and similarities

Captions are split into lowercase words; the vocabulary is the sorted set of words of the
training captions (config key `vocab`, stored in every checkpoint's config), after four special
ids: <pad>=0, <unk>=1, <cls>=2. The caption encoder is a small transformer with learned
positions, so "a red circle above a blue square" and its reverse get different embeddings.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from omni.config import Arch, ArchError, check_heads, non_negative, positive, probability
from omni.layers import Transformer, pad_stack

SPECIALS = ["<pad>", "<unk>", "<cls>"]
PAD, UNK, CLS = 0, 1, 2
LOG_SCALE_INIT = math.log(1 / 0.07)   # CLIP's starting temperature
LOG_SCALE_MAX = math.log(100.0)       # clamp: a larger scale makes the loss unstable


@dataclass
class VisionArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(image_size=64, patch_size=8, conv_stem=True, vit_dim=128, vit_layers=4, vit_heads=4, text_dim=96,
                     text_layers=2, text_heads=4, embed_dim=128, max_words=32, decoder_layers=2, dropout=0.0),
        "base": dict(image_size=224, patch_size=16, conv_stem=True, vit_dim=384, vit_layers=12, vit_heads=6,
                     text_dim=256, text_layers=4, text_heads=4, embed_dim=256, max_words=40, dropout=0.0),
    }
    image_size: int = positive(64)
    patch_size: int = positive(8)
    conv_stem: bool = False       # patches through small convolutions instead of one linear map
    vit_dim: int = positive(128)
    vit_layers: int = positive(4)
    vit_heads: int = positive(4)
    text_dim: int = positive(96)
    text_layers: int = positive(2)
    text_heads: int = positive(4)
    embed_dim: int = positive(128)      # the shared image-caption space
    max_words: int = positive(32)       # caption positions, the <cls> token included
    decoder_layers: int = non_negative(0)   # > 0: a caption decoder over all ViT tokens is trained too
    dropout: float = probability(0.1)
    vocab: list[str] = field(default_factory=list)   # empty: built from the training captions

    def __post_init__(self):
        super().__post_init__()
        check_heads(self, "vit_dim", "vit_heads")
        check_heads(self, "text_dim", "text_heads")
        if self.image_size % self.patch_size:
            raise ArchError(f"config key 'image_size': must be a multiple of patch_size ({self.patch_size}), "
                            f"got {self.image_size}")
        if self.conv_stem and self.patch_size % 8:      # its three stride-2 convolutions cover 8 pixels
            raise ArchError(f"config key 'patch_size': conv_stem needs a patch_size divisible by 8, "
                            f"got {self.patch_size}")

    def network(self):
        return CLIP(self)


# ----------------------------------------------------------------------------- captions
def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", caption.lower())


def build_vocab(captions) -> list[str]:
    """Sorted words of the captions: the same list for the same data, whatever the order."""
    return sorted({w for c in captions for w in caption_words(c)})


class CaptionTokenizer:
    def __init__(self, vocab: list[str], max_words: int):
        self.ids = {w: i + len(SPECIALS) for i, w in enumerate(vocab)}
        self.vocab_size, self.max_words = len(SPECIALS) + len(vocab), max_words

    def encode(self, caption: str) -> torch.Tensor:
        words = caption_words(caption)[:self.max_words - 1]
        return torch.tensor([CLS] + [self.ids.get(w, UNK) for w in words])

    def batch(self, captions: list[str]):
        """ids [B, L] and mask [B, L] (True = real token)."""
        return pad_stack([self.encode(c) for c in captions], value=PAD)


# ----------------------------------------------------------------------------- models
def conv_stem(dim: int, patch: int) -> nn.Sequential:
    """Five 3x3 convolutions, each with BatchNorm and GELU, three of them stride 2, then a
    patch_size/8 patchify: the same token grid as a linear patch embedding, but each token has seen
    a 27 x 27 pixel neighbourhood through edges and corners (a whole small demo shape). The ViT
    learns shape much faster behind it than behind one linear map per 8x8 block, and BatchNorm is
    what lets this deeper stem train at all (measured: docs/stage_c_vision.md). patch_size is a
    multiple of 8 (VisionArch)."""

    def conv(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*conv(3, dim // 4, 2), *conv(dim // 4, dim // 4, 1), *conv(dim // 4, dim // 2, 2),
                         *conv(dim // 2, dim // 2, 1), *conv(dim // 2, dim, 2),
                         nn.Conv2d(dim, dim, patch // 8, stride=patch // 8))


class ViT(nn.Module):
    """Patch embedding + CLS token + learned positions + transformer; returns all tokens, normed."""

    def __init__(self, arch: VisionArch):
        super().__init__()
        n = (arch.image_size // arch.patch_size) ** 2     # image_size is a multiple of patch_size (VisionArch)
        self.image_size, self.out_dim, self.num_tokens = arch.image_size, arch.vit_dim, n + 1
        self.patch = conv_stem(arch.vit_dim, arch.patch_size) if arch.conv_stem else \
            nn.Conv2d(3, arch.vit_dim, arch.patch_size, stride=arch.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, arch.vit_dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, arch.vit_dim) * 0.02)
        self.body = Transformer(arch.vit_dim, arch.vit_layers, arch.vit_heads, causal=False, rope=False,
                                max_len=n + 1, dropout=arch.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos
        return self.body(x)


class TextEncoder(nn.Module):
    """Word embeddings + learned positions + transformer; the <cls> output sums up the caption.

    It also holds the contrastive temperature (a log-scale, clamped), so the four weight keys of
    the stage cover every trained parameter.
    """

    def __init__(self, arch: VisionArch):
        super().__init__()
        self.embed = nn.Embedding(len(SPECIALS) + len(arch.vocab), arch.text_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(arch.max_words, arch.text_dim) * 0.02)
        self.body = Transformer(arch.text_dim, arch.text_layers, arch.text_heads, causal=False, rope=False,
                                max_len=arch.max_words, dropout=arch.dropout)
        self.log_scale = nn.Parameter(torch.tensor(LOG_SCALE_INIT))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:ids.shape[1]]
        return self.body(x, pad_mask=mask)[:, 0]


class CaptionDecoder(nn.Module):
    """Writes the caption word by word while it sees every ViT token: a causal transformer over
    [image tokens ; <cls> w_1 .. w_n]. To name each shape with its colour, size and place, the
    patch tokens must carry them; in-batch contrastive negatives rarely force that, since they
    seldom differ in one attribute alone (docs/stage_c_vision.md)."""

    def __init__(self, arch: VisionArch, num_image_tokens: int):
        super().__init__()
        d, vocab = arch.text_dim, len(SPECIALS) + len(arch.vocab)
        self.image_in = nn.Linear(arch.vit_dim, d)
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(num_image_tokens + arch.max_words, d) * 0.02)
        self.body = Transformer(d, arch.decoder_layers, arch.text_heads, causal=True, rope=False,
                                max_len=num_image_tokens + arch.max_words, dropout=arch.dropout)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-word logits [B, L, V]: position i (ids[:, i]) predicts word i+1."""
        prefix = self.image_in(tokens)
        x = torch.cat([prefix, self.embed(ids)], dim=1)
        return self.head(self.body(x + self.pos[:x.shape[1]])[:, prefix.shape[1]:])

    def nll(self, tokens, ids, mask) -> torch.Tensor:
        """Per-caption negative log-likelihood [B], summed over its words and its end (after the last
        word the target is <pad>, read as "the caption ends here")."""
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], PAD)], dim=1)
        logits = self(tokens, ids).float()
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (ce * mask).sum(dim=1)


class CLIP(nn.Module):
    """The trained parts (weight keys vit, img_proj, text_proj, text_embed, and caption_decoder when
    decoder_layers > 0) and their use."""

    def __init__(self, arch: VisionArch):
        super().__init__()
        self.arch = arch
        self.vit = ViT(arch)
        self.img_proj = nn.Linear(arch.vit_dim, arch.embed_dim, bias=False)
        self.text_proj = nn.Linear(arch.text_dim, arch.embed_dim, bias=False)
        self.text_embed = TextEncoder(arch)
        self.tokenizer = CaptionTokenizer(arch.vocab, arch.max_words)
        self.caption_decoder = CaptionDecoder(arch, self.vit.num_tokens) if arch.decoder_layers else None

    def parts(self) -> dict[str, nn.Module]:
        parts = {"vit": self.vit, "img_proj": self.img_proj, "text_proj": self.text_proj,
                 "text_embed": self.text_embed}
        if self.caption_decoder is not None:
            parts["caption_decoder"] = self.caption_decoder
        return parts

    def encode_images(self, images):
        """Unit-length image embeddings [B, embed_dim] (from the CLS token)."""
        return F.normalize(self.img_proj(self.vit(images)[:, 0]).float(), dim=-1)

    def encode_texts(self, ids, mask):
        return F.normalize(self.text_proj(self.text_embed(ids, mask)).float(), dim=-1)

    def encode_captions(self, captions: list[str]):
        ids, mask = self.tokenizer.batch(captions)
        device = self.img_proj.weight.device
        return self.encode_texts(ids.to(device), mask.to(device))

    def logit_scale(self) -> torch.Tensor:
        """1 / temperature, learned in log space and clamped to [1, 100]."""
        return self.text_embed.log_scale.clamp(0.0, LOG_SCALE_MAX).exp()

    def logits(self, images, ids, mask):
        """Scaled cosine similarities [B_images, B_captions]."""
        return self.logit_scale() * self.encode_images(images) @ self.encode_texts(ids, mask).T

    def losses(self, images, ids, mask, same) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(InfoNCE, mean caption-word cross-entropy or None without a decoder) of one batch; the
        ViT runs once for both."""
        tokens = self.vit(images)
        image_emb = F.normalize(self.img_proj(tokens[:, 0]).float(), dim=-1)
        contrastive = info_nce(self.logit_scale() * image_emb @ self.encode_texts(ids, mask).T, same)
        if self.caption_decoder is None:
            return contrastive, None
        return contrastive, self.caption_decoder.nll(tokens, ids, mask).sum() / mask.sum()

    @torch.no_grad()
    def caption_scores(self, image, captions: list[str]) -> torch.Tensor:
        """How well each caption fits one image [3, S, S] -> [K]: the decoder's log-likelihood when
        there is one (which also holds its prior over captions: a caption it never saw, such as an
        unseen colour-shape pair, scores lower), else the cosine similarity of the embeddings.
        Used by the attribute probes."""
        ids, mask = self.tokenizer.batch(captions)
        ids, mask = ids.to(image.device), mask.to(image.device)
        if self.caption_decoder is not None:
            tokens = self.vit(image[None]).expand(len(captions), -1, -1)
            return -self.caption_decoder.nll(tokens, ids, mask)
        return (self.encode_images(image[None]) @ self.encode_texts(ids, mask).T)[0]


def info_nce(logits: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy image->caption and caption->image, averaged.

    same [B, B] bool marks pairs that are equally right (identical captions in one batch). The
    loss is then -log of the probability given to all right answers together, so a duplicate
    caption is never pushed away as a negative; with same = identity this is plain InfoNCE.
    """
    if same is None:
        same = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    logits = logits.float()

    def one_way(x, right):
        return (x.logsumexp(dim=1) - x.masked_fill(~right, float("-inf")).logsumexp(dim=1)).mean()
    return (one_way(logits, same) + one_way(logits.T, same.T)) / 2
