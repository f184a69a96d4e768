"""Audio: read with soundfile, resample with torchaudio, SpecAugment, and the audio-text dataset
(ASR and TTS manifests). The log-mel features themselves are in omni/features.py."""
from __future__ import annotations

import soundfile as sf
import torch
import torchaudio

from omni.data.manifest import ManifestDataset, SampleError, media_file
from omni.features import LogMel, MelSpec


# A clip whose loudest sample stays below -60 dBFS holds no speech: even a quiet recording peaks
# far above that, while digital silence (a muted channel, a failed conversion) sits at 0. Every
# consumer pairs a clip with the words it must carry (an ASR transcript, a TTS target, a spoken
# question), so a silent clip would teach the models that silence means those words: it is a bad
# sample, like an unreadable one.
SILENCE_PEAK = 1e-3


def read_audio(path: str, sample_rate: int, max_seconds: float = 0.0) -> torch.Tensor:
    """Mono float waveform at sample_rate, from any rate and channel count (channels averaged);
    SampleError saying why if the file cannot be used (missing, empty, not audio, longer than
    max_seconds when that is > 0, no samples, NaN/inf samples, or silent)."""
    try:
        if max_seconds > 0:     # from the header: a long recording is never decoded
            info = sf.info(media_file(path))
            if info.frames > max_seconds * info.samplerate:
                raise SampleError(f"{path}: {info.frames / info.samplerate:.1f} s is longer than "
                                  f"max_seconds {max_seconds:g}")
        data, rate = sf.read(media_file(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise SampleError(f"{path}: unreadable audio ({e.error_string})") from None
    wave = torch.from_numpy(data).mean(dim=1)
    if wave.numel() == 0:
        raise SampleError(f"{path}: no audio samples")
    if not torch.isfinite(wave).all():
        raise SampleError(f"{path}: invalid audio (NaN or infinite samples)")
    peak = float(wave.abs().max())
    if peak < SILENCE_PEAK:
        raise SampleError(f"{path}: silent audio (peak {peak:.1e} < {SILENCE_PEAK:g})")
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


def audio_frames(path: str, spec: MelSpec) -> int:
    """Mel frames of a file from its header alone (for length-bucketed batching); 0 if unreadable."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return 0
    return int(info.frames * spec.sample_rate / info.samplerate) // spec.hop + 1


def spec_augment(mel: torch.Tensor, generator: torch.Generator, time_masks: int = 2, time_width: int = 20,
                 freq_masks: int = 2, freq_width: int = 10) -> torch.Tensor:
    """Zero random time and frequency bands of mel [T, F] (SpecAugment), drawn from generator."""
    mel = mel.clone()
    # numpy's sum is single-threaded: torch's mean depends on the thread count, which differs
    # between DataLoader workers and the main process, and resume must not depend on num_workers.
    fill = float(mel.numpy().mean(dtype="float64"))
    for count, width, axis in ((time_masks, time_width, 0), (freq_masks, freq_width, 1)):
        size = mel.shape[axis]
        for _ in range(count):
            w = int(torch.randint(0, min(width, size // 4) + 1, (), generator=generator))
            start = int(torch.randint(0, size - w + 1, (), generator=generator))
            mel.narrow(axis, start, w).fill_(fill)
    return mel


class AudioTextDataset(ManifestDataset):
    """{"mel": [T, n_mels], "text": str, "wave_len": samples} per record of an audio-text manifest."""

    def __init__(self, records, spec: MelSpec = MelSpec(), max_seconds: float = 30.0, **kw):
        super().__init__(records, **kw)
        self.spec, self.max_seconds = spec, max_seconds
        self.logmel = LogMel(spec)

    def lengths(self) -> list[int]:
        return [audio_frames(r["audio"], self.spec) for r in self.records]

    def load(self, record, generator):
        text = str(record["text"]).strip()
        if not text:
            raise SampleError("empty text")
        wave = read_audio(record["audio"], self.spec.sample_rate, self.max_seconds)
        return {"mel": self.logmel(wave), "text": text, "wave_len": wave.numel()}
