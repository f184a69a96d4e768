"""Stage D speech codec.

SpeechCodec: log-mel frames (100/s) -> conv encoder with frame stacking (`downsample` mel frames per
code frame) -> residual vector quantizer (`n_codebooks` x `codebook_size`, EMA codebooks, dead-code
restarts, commitment loss) -> conv decoder back to log-mel. The Talker predicts its codes.

The vocoders that turn its log-mel into a waveform are in omni/vocoder.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from omni.config import Arch, above, non_negative, positive, probability

LOG_FLOOR = math.log(1e-5)      # LogMel's value for silence: padding uses it


@dataclass
class CodecArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(n_mels=80, downsample=4, codec_channels=128, latent_dim=64, n_codebooks=2, codebook_size=128,
                     ema_decay=0.99, dead_threshold=1.0, commitment=0.25),
        "base": dict(n_mels=80, downsample=4, codec_channels=256, latent_dim=128, n_codebooks=4, codebook_size=512),
    }
    n_mels: int = positive(80)
    downsample: int = positive(4)          # mel frames per code frame: 4 -> 25 Hz codes, 8 -> 12.5 Hz
    codec_channels: int = positive(128)    # conv width of encoder and decoder
    latent_dim: int = positive(64)         # width of the quantized vectors
    n_codebooks: int = positive(2)
    codebook_size: int = positive(128)
    ema_decay: float = probability(0.99)
    dead_threshold: float = non_negative(1.0)  # a code used less than this many times per batch (EMA) is restarted
    commitment: float = non_negative(0.25)     # weight of the commitment loss
    mel_mean: float = -6.0         # fixed normalisation of log-mel values (roughly the demo data's)
    mel_std: float = above(4.0)

    def network(self):
        return SpeechCodec(self)


# ----------------------------------------------------------------------------- distributed helpers
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    # Under torchrun every rank sees other data; EMA statistics are summed so codebooks stay equal.
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(*tensors):
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


# ----------------------------------------------------------------------------- quantizer
class VectorQuantizer(nn.Module):
    """One codebook with EMA updates. Its state lives in buffers, so it is in the state_dict and
    the optimizer never touches it; randomness (initialisation, restarts) comes from torch's
    global RNG, which the training core saves and restores, so resume stays exact."""

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float):
        super().__init__()
        self.size, self.decay, self.dead_threshold = size, decay, dead_threshold
        self.register_buffer("codebook", torch.randn(size, dim) * 0.1)
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Code of the closest codebook vector for each row of x [N, D]."""
        dist2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.codebook.T + self.codebook.pow(2).sum(1)
        return dist2.argmin(dim=1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA step towards the mean of the vectors x [N, D] assigned to each code, then restarts."""
        if not bool(self.initialized):
            self._init_from(x)
        onehot = F.one_hot(codes, self.size).to(x.dtype)
        counts, sums = _all_reduce(onehot.sum(0)), _all_reduce(onehot.T @ x)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total, eps = self.cluster_size.sum(), 1e-5
        smoothed = (self.cluster_size + eps) / (total + self.size * eps) * total   # Laplace: no /0
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.restart_dead(x)

    def _init_from(self, x: torch.Tensor) -> None:
        # Codes start on data points: a random init leaves most of them unused at first. Their count
        # starts at the threshold, so codes the moving encoder soon leaves behind restart at once.
        picks = x[self._pick(len(x), self.size)]
        self.codebook.copy_(picks)
        self.cluster_size.fill_(self.dead_threshold)
        self.embed_sum.copy_(picks * self.dead_threshold)
        self.initialized.fill_(True)
        _broadcast(self.codebook, self.cluster_size, self.embed_sum)

    @staticmethod
    def _pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n)[:k] if n >= k else torch.randint(n, (k,))

    def restart_dead(self, x: torch.Tensor) -> int:
        """Move codes used less than dead_threshold times per batch onto random vectors of x; they
        get the mean usage as a grace period so they are not restarted again at once."""
        dead = (self.cluster_size < self.dead_threshold).nonzero().squeeze(1)
        if len(dead) == 0 or len(x) == 0:
            return 0
        picks = x[self._pick(len(x), len(dead))]
        grace = max(float(self.cluster_size.mean()), 2 * self.dead_threshold)
        self.codebook[dead] = picks
        self.cluster_size[dead] = grace
        self.embed_sum[dead] = picks * grace
        _broadcast(self.codebook, self.cluster_size, self.embed_sum)
        return len(dead)


class ResidualVQ(nn.Module):
    """Codebook k quantizes what codebooks 0..k-1 left over; the sum of their vectors is the output."""

    def __init__(self, arch: CodecArch):
        super().__init__()
        self.layers = nn.ModuleList(
            VectorQuantizer(arch.codebook_size, arch.latent_dim, arch.ema_decay, arch.dead_threshold)
            for _ in range(arch.n_codebooks))

    def forward(self, z: torch.Tensor, mask: torch.Tensor, update: bool = False):
        """z [B, T, D], mask [B, T] (True = real) -> (straight-through z_q, codes [B, T, n_q],
        commitment loss). update=True moves the codebooks (training, codec phase only)."""
        residual, total = z.float(), torch.zeros_like(z, dtype=torch.float32)
        codes, commit = [], z.new_zeros((), dtype=torch.float32)
        for vq in self.layers:
            c = vq.nearest(residual.reshape(-1, residual.shape[-1])).view(residual.shape[:-1])
            q = vq.codebook[c]
            if mask.any():
                commit = commit + F.mse_loss(residual[mask], q[mask].detach())
            if update:
                vq.update(residual[mask].detach(), c[mask])
            total, residual = total + q, residual - q
            codes.append(c)
        # Straight-through: the decoder's gradient flows to the encoder as if quantizing were identity.
        z_q = z + (total - z).detach().to(z.dtype)
        return z_q, torch.stack(codes, dim=-1), commit

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_q] -> the sum of their codebook vectors [..., D]."""
        return sum(vq.codebook[codes[..., k]] for k, vq in enumerate(self.layers))


def usage_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of code usage counts [K]: K when all codes are used equally, 1 for a single code."""
    p = counts.double() / counts.sum().clamp(min=1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- encoder / decoder
class ResConv(nn.Module):
    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(ch, ch, 1)

    def forward(self, x):    # x [B, C, T]
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))


def res_stack(ch: int) -> nn.Sequential:
    # Dilations 1, 2, 4: each side sees 7 code frames (0.28 s at 25 Hz) of context.
    return nn.Sequential(*(ResConv(ch, d) for d in (1, 2, 4)))


class SpeechCodec(nn.Module):
    """Encoder, residual VQ and decoder. Inputs and outputs are log-mel [B, T, n_mels]."""

    def __init__(self, arch: CodecArch):
        super().__init__()
        self.arch = arch
        c, f = arch.codec_channels, arch.downsample
        self.enc_in = nn.Conv1d(arch.n_mels, c, 3, padding=1)
        self.enc_stack = nn.Linear(c * f, c)        # frame stacking: f mel-rate frames -> one code frame
        self.enc_body = res_stack(c)
        self.enc_out = nn.Conv1d(c, arch.latent_dim, 1)
        self.rvq = ResidualVQ(arch)
        self.dec_in = nn.Conv1d(arch.latent_dim, c, 3, padding=1)
        self.dec_body = res_stack(c)
        self.dec_unstack = nn.Linear(c, c * f)      # one code frame -> f mel-rate frames
        self.dec_smooth = ResConv(c, 1)             # smooths the seams between unstacked groups
        self.dec_out = nn.Conv1d(c, arch.n_mels, 1)
        # Counts training batches (a buffer: saved and restored with the weights); the stage derives
        # its phase from it because the core does not pass the step to Stage.loss.
        self.register_buffer("train_batches", torch.zeros((), dtype=torch.long))

    def code_frames(self, mel_frames: int) -> int:
        return -(-mel_frames // self.arch.downsample)

    def code_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Mel-rate mask [B, T] -> code-rate mask (a code frame is real if any of its frames is)."""
        lengths = mask.sum(1)
        n = self.code_frames(mask.shape[1])
        return torch.arange(n, device=mask.device)[None] < (-(-lengths // self.arch.downsample))[:, None]

    def encode_latent(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, T, n_mels] -> latent [B, ceil(T/f), D] (T padded with silence to a multiple of f)."""
        f, arch = self.arch.downsample, self.arch
        pad = (-mel.shape[1]) % f
        x = F.pad(mel, (0, 0, 0, pad), value=LOG_FLOOR)
        x = (x - arch.mel_mean) / arch.mel_std
        h = F.gelu(self.enc_in(x.transpose(1, 2))).transpose(1, 2)          # [B, T, C]
        h = self.enc_stack(h.reshape(h.shape[0], h.shape[1] // f, -1))      # [B, T/f, C]
        h = self.enc_body(h.transpose(1, 2))
        return self.enc_out(F.gelu(h)).transpose(1, 2)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """latent [B, T', D] -> log-mel [B, T' * f, n_mels]."""
        h = F.gelu(self.dec_body(self.dec_in(z.transpose(1, 2)))).transpose(1, 2)
        h = self.dec_unstack(h).reshape(h.shape[0], -1, self.arch.codec_channels)
        mel = self.dec_out(F.gelu(self.dec_smooth(h.transpose(1, 2)))).transpose(1, 2)
        return mel * self.arch.mel_std + self.arch.mel_mean

    def forward(self, mel: torch.Tensor, mask: torch.Tensor, update: bool = False):
        """(reconstructed log-mel [B, T, n_mels], codes [B, T', n_q], code mask, commitment loss)."""
        z = self.encode_latent(mel)
        cmask = self.code_mask(mask)
        z_q, codes, commit = self.rvq(z, cmask, update)
        recon = self.decode_latent(z_q)[:, :mel.shape[1]]
        return recon, codes, cmask, commit

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, mask: torch.Tensor):
        """Codes [B, T', n_q] and their mask [B, T'] (no codebook updates)."""
        cmask = self.code_mask(mask)
        _, codes, _ = self.rvq(self.encode_latent(mel), cmask, update=False)
        return codes, cmask

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T', n_q] -> log-mel [B, T' * f, n_mels]."""
        return self.decode_latent(self.rvq.lookup(codes))

    @property
    def decode_context(self) -> int:
        """Code frames on each side that a decoded mel frame depends on (the decoder's receptive
        field), so codes can be decoded in chunks: decode codes[a:b] and keep the mel frames of codes
        [a + decode_context, b - decode_context) (or up to an end of the whole sequence): the same as
        decoding all codes at once. Only the convolutions reach across frames."""
        def reach(convs):
            return sum(c.dilation[0] * (c.kernel_size[0] // 2) for c in convs)
        code_rate = reach([self.dec_in] + [block.conv for block in self.dec_body])
        mel_rate = reach([self.dec_smooth.conv, self.dec_out])      # after unstacking: f mel frames a code
        return code_rate + -(-mel_rate // self.arch.downsample)

    def mel_error(self, recon: torch.Tensor, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over real frames, in normalised units (the reconstruction loss)."""
        diff = (recon.float() - mel.float()).abs().mean(-1) / self.arch.mel_std
        return (diff * mask).sum() / mask.sum().clamp(min=1)
