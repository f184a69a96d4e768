"""The features the models read, below both the models and the data code: log-mel spectrograms.

`MelSpec` holds the settings (16 kHz, 100 frames/s, n_mels bands); `LogMel` turns a waveform into
frames. The audio encoder and the speech codec are built for a spec; the datasets compute with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio


@dataclass(frozen=True)
class MelSpec:
    """Log-mel settings shared by the audio encoder and the speech codec: 16 kHz, 100 frames/s."""
    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 80

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop


class LogMel(torch.nn.Module):
    """Waveform [N] or [B, N] -> log-mel frames [..., T, n_mels]."""

    def __init__(self, spec: MelSpec = MelSpec()):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=spec.sample_rate, n_fft=spec.n_fft, hop_length=spec.hop, n_mels=spec.n_mels,
            power=2.0, norm="slaney", mel_scale="slaney")

    def forward(self, wave):
        return torch.log(self.mel(wave) + 1e-5).transpose(-1, -2)
