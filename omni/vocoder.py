"""Vocoders: log-mel frames (as `omni.features.LogMel` makes them) -> 16 kHz waveform.

`Vocoder` is the interface: `mel_to_wave(mel [T, n_mels]) -> wave [(T-1) * hop]` on the CPU, and
`context_frames`, the mel frames on each side an output sample depends on, so that a long mel can
be synthesised in chunks (synthesise mel[a:b], keep the samples of frames [s, e) with
a <= s - context_frames and b >= e + context_frames: the same samples as the whole mel's).

GriffinLimVocoder inverts the very filterbank of LogMel (pseudo-inverse) and recovers phase with
Griffin-Lim from a fixed initial phase: no weights, deterministic, buzzy.
NeuralVocoder (Stage F, Vocos-style) maps normalised log-mel through a stack of ConvNeXt blocks
to the log-magnitude and phase of an STFT (n_fft 400, hop 160); at synthesis a few fast Griffin-Lim
iterations (`refine_iters`) start from that phase and keep that magnitude, then one iSTFT. Every
step is local in time, so chunking is exact.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from omni.config import Arch, above, positive
from omni.features import LogMel, MelSpec


@contextlib.contextmanager
def one_thread():
    """Run small tensor ops on one thread: Griffin-Lim's FFTs are tiny, and on a machine whose cores
    are busy with other work, two threads waiting on each other made it 100x slower (5 s vs 0.04 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Vocoder:
    """Turns log-mel frames (as `omni.features.LogMel` makes them) back into a waveform."""
    sample_rate: int = 16000
    hop: int = 160
    context_frames: int = 8      # mel frames on each side an output sample depends on

    def mel_to_wave(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [T, n_mels] -> float waveform [(T - 1) * hop] on the CPU, at self.sample_rate."""
        raise NotImplementedError


def mel_inverse(spec: MelSpec) -> torch.Tensor:
    """[n_freq, n_mels]: the pseudo-inverse of LogMel's own filterbank (mel power -> linear power).
    Computed on the CPU even while a network is built on the meta device (config size checks)."""
    with torch.device("cpu"):
        fb = LogMel(spec).mel.mel_scale.fb            # [n_freq, n_mels]
        return torch.linalg.pinv(fb.T)


class GriffinLimVocoder(Vocoder):
    """Pseudo-inverse of LogMel's own mel filterbank, then Griffin-Lim from a fixed initial phase
    (rand_init=False): deterministic, no weights, intelligible but buzzy. Its iterations spread
    every sample's dependence over the whole input, so context_frames (8) holds only approximately."""

    def __init__(self, spec: MelSpec = MelSpec(), n_iter: int = 32, momentum: float = 0.99):
        self.spec, self.sample_rate, self.hop = spec, spec.sample_rate, spec.hop
        self.inverse = mel_inverse(spec)
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=spec.n_fft, hop_length=spec.hop, win_length=spec.n_fft, power=2.0, n_iter=n_iter,
            momentum=momentum, rand_init=False)

    def mel_to_wave(self, mel: torch.Tensor) -> torch.Tensor:
        power_mel = (mel.detach().float().cpu().exp() - 1e-5).clamp(min=0)     # undo LogMel's log
        power = (power_mel @ self.inverse.T).clamp(min=0).T                       # [n_freq, T]
        length = (mel.shape[0] - 1) * self.spec.hop                                # LogMel: N // hop + 1 frames
        if length <= 0:
            return torch.zeros(0)
        with one_thread():
            return self.griffin_lim.forward(power)[:length]


# ----------------------------------------------------------------------------- the neural vocoder
@dataclass
class VocoderArch(Arch):
    # Named sizes (config key `size`, docs/training.md): a size is one line; a config's own keys override it.
    SIZES: ClassVar[dict[str, dict]] = {
        "tiny": dict(n_mels=80, vocoder_dim=128, vocoder_layers=6, vocoder_ffn=384),
    }
    n_mels: int = positive(80)
    vocoder_dim: int = positive(128)        # channels of the ConvNeXt stack
    vocoder_layers: int = positive(6)       # ConvNeXt blocks (block i sees 3 x its dilation frames more on each side)
    dilation_cycle: int = positive(1)       # block i's depthwise conv has dilation 2 ** (i % dilation_cycle)
    vocoder_ffn: int = positive(384)        # hidden width of each block's pointwise MLP
    mel_mean: float = -6.0                  # fixed normalisation of the log-mel input (the codec's)
    mel_std: float = above(4.0)

    def network(self):
        return NeuralVocoder(self)


KERNEL = 7           # every conv along time: 3 frames on each side
REFINE_ITERS = 32    # fast Griffin-Lim iterations at synthesis (Stage F's `refine_iters` default)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv along time, LayerNorm, pointwise MLP (GELU), layer scale, residual."""

    def __init__(self, dim: int, hidden: int, dilation: int = 1):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, KERNEL, padding=dilation * (KERNEL // 2), dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):      # x [B, C, T]
        h = self.norm(self.depthwise(x).transpose(1, 2))
        return x + (self.scale * self.down(F.gelu(self.up(h)))).transpose(1, 2)


class NeuralVocoder(nn.Module, Vocoder):
    """log-mel [B, T, n_mels] -> STFT log-magnitude and phase [B, n_freq, T] -> (at synthesis:
    `refine_iters` fast Griffin-Lim iterations) -> iSTFT waveform.

    The magnitude is predicted as a correction of the pseudo-inverse of the mel filterbank (a
    fixed per-frame prior: the network starts from Griffin-Lim's magnitudes); the phase as the angle
    of a predicted (real, imaginary) pair. Convolutions pad with zeros, which only reaches frames
    within the receptive field of a chunk's edges: context_frames covers it and the iSTFT overlap."""

    def __init__(self, arch: VocoderArch, spec: MelSpec | None = None, refine_iters: int = REFINE_ITERS):
        super().__init__()
        self.arch, self.refine_iters = arch, refine_iters
        self.spec = spec or MelSpec(n_mels=arch.n_mels)
        self.sample_rate, self.hop, self.n_fft = self.spec.sample_rate, self.spec.hop, self.spec.n_fft
        n_freq, dim = self.n_fft // 2 + 1, arch.vocoder_dim
        self.embed = nn.Conv1d(arch.n_mels, dim, KERNEL, padding=KERNEL // 2)
        self.norm_in = nn.LayerNorm(dim)
        dilations = [2 ** (i % arch.dilation_cycle) for i in range(arch.vocoder_layers)]
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, arch.vocoder_ffn, d) for d in dilations)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3 * n_freq)        # log-magnitude correction, phase real, phase imaginary
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[n_freq:2 * n_freq] = 1.0    # start at phase 0 rather than an undefined angle
        self.register_buffer("inverse", mel_inverse(self.spec), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.network_context = (KERNEL // 2) * (1 + sum(dilations))

    @property
    def context_frames(self) -> int:
        # The embedding conv and each block's depthwise conv see KERNEL // 2 frames (times its dilation)
        # on a side; each refinement (iSTFT then STFT) 2 more; an output sample lies under the windows
        # of 2 frames on each side of its own.
        return self.network_context + 2 * self.refine_iters + 2

    def prior(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-magnitude [B, n_freq, T] of the filterbank's pseudo-inverse of mel [B, T, n_mels]."""
        power = ((mel.float().exp() - 1e-5).clamp(min=0) @ self.inverse.T).clamp(min=1e-8)
        return 0.5 * power.log().transpose(1, 2)

    def spectrum(self, mel: torch.Tensor) -> torch.Tensor:
        """Complex STFT [B, n_freq, T] predicted from log-mel [B, T, n_mels]."""
        x = (mel.float() - self.arch.mel_mean) / self.arch.mel_std
        h = self.norm_in(self.embed(x.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.norm_out(h.transpose(1, 2))).transpose(1, 2)      # [B, 3 * n_freq, T]
        log_mag, re, im = out.chunk(3, dim=1)
        log_mag = (log_mag + self.prior(mel)).clamp(max=12.0)                 # exp stays finite
        phase = torch.atan2(im, re)
        return torch.polar(log_mag.exp(), phase)

    def istft(self, spec: torch.Tensor) -> torch.Tensor:
        length, window = (spec.shape[-1] - 1) * self.hop, self.window.to(spec.device, spec.real.dtype)
        return torch.istft(spec, self.n_fft, self.hop, self.n_fft, window, center=True, length=length)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(waveform [B, (T-1) * hop], complex STFT [B, n_freq, T]) of log-mel [B, T, n_mels]: the
        network's own output, without refinement (what training sees)."""
        spec = self.spectrum(mel)
        return self.istft(spec), spec

    def refine(self, spec: torch.Tensor, iters: int, momentum: float = 0.99) -> torch.Tensor:
        """Fast Griffin-Lim (Perraudin et al. 2013) from spec's phase, keeping its magnitude: each
        iteration makes the STFT more nearly one a waveform can have. Regression leaves the phase
        roughly right but inconsistent; 32 iterations took PESQ from 3.13 to 3.46 (docs/stage_f_vocoder.md)."""
        if iters == 0:
            return spec
        # In float64: momentum amplifies rounding, and chunked synthesis must match the whole to 1e-5
        # (float32: 4e-5 after 32 iterations on speech; float64: 7e-6, for 1.8x the time).
        spec = spec.to("cpu" if spec.device.type == "mps" else spec.device, torch.complex128)   # MPS has no float64
        magnitude, previous, window = spec.abs(), torch.zeros_like(spec), self.window.to(spec.device, torch.float64)
        for _ in range(iters):
            rebuilt = torch.stft(self.istft(spec), self.n_fft, self.hop, self.n_fft, window, center=True,
                                 return_complex=True)
            projected = torch.polar(magnitude, rebuilt.angle())
            spec, previous = projected + momentum * (projected - previous), projected
        return torch.polar(magnitude, spec.angle())

    @torch.no_grad()
    def mel_to_wave(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.shape[0] < 2:
            return torch.zeros(0)
        device = next(self.parameters()).device
        spec = self.refine(self.spectrum(mel[None].to(device)), self.refine_iters)
        return self.istft(spec)[0].float().cpu()
