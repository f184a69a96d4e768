"""Stage F: the neural vocoder (log-mel -> waveform), trained on random crops of the TTS clips.

The model is omni/vocoder.py's NeuralVocoder; the loop, checkpoints, exact resume and logging are
the shared core's. Losses need no discriminator: multi-resolution STFT log-magnitude L1 and
spectral convergence of the output waveform, its log-mel L1, and phase losses on the predicted
STFT (anti-wrapped group delay and instantaneous frequency, weighted by the target's magnitude).
Validation also scores whole held-out clips: PESQ (wideband) and STOI of the vocoder and of
Griffin-Lim, when the optional `pesq` / `pystoi` packages import. See docs/stage_f_vocoder.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni.config import TrainConfig, non_negative, positive
from omni.data.audio import AudioTextDataset, read_audio
from omni.data.common import require_files
from omni.data.manifest import read_manifest
from omni.features import LogMel, MelSpec
from omni.logs import log
from omni.registry import STAGES
from omni.train.stage import Stage
from omni.vocoder import REFINE_ITERS, GriffinLimVocoder, NeuralVocoder, VocoderArch


@dataclass
class VocoderConfig(TrainConfig, VocoderArch):
    train_manifest: str = "data/demo/tts_train.jsonl"
    val_manifest: str = "data/demo/tts_val.jsonl"
    audio_column: str = "audio"
    max_seconds: float = 12.0          # longer clips are skipped as bad samples
    crop_frames: int = positive(64)    # mel frames per training crop (100 per second)
    stft_weight: float = non_negative(1.0)    # multi-resolution STFT loss of the output waveform
    mel_weight: float = non_negative(1.0)     # log-mel L1 of the output waveform
    phase_weight: float = non_negative(1.0)   # group delay + instantaneous frequency of the predicted STFT
    refine_iters: int = non_negative(REFINE_ITERS)   # fast Griffin-Lim iterations at synthesis (not in training)
    eval_clips: int = non_negative(20)        # whole val clips scored with PESQ / STOI (0 = none)
    griffin_lim_iters: int = 32               # the baseline those clips are compared with
    save_dir: str = "checkpoints/vocoder_tiny"
    demo_dir: str = "data/demo"


class CropDataset(AudioTextDataset):
    """{"wave": [L], "mel": [crop_frames, n_mels]}: a crop of (crop_frames - 1) * hop samples of each
    clip and its log-mel. With a generator (training) the crop starts at random, drawn from the
    sample's own (seed, epoch, index) generator; without one (validation), in the middle of the clip.
    Clips shorter than a crop are padded with silence."""

    def __init__(self, records, crop_frames: int, **kw):
        super().__init__(records, **kw)
        self.samples = (crop_frames - 1) * self.spec.hop

    def load(self, record, generator):
        wave = read_audio(record["audio"], self.spec.sample_rate, self.max_seconds)
        room = max(len(wave) - self.samples, 0)
        start = int(torch.randint(room + 1, (), generator=generator)) if generator is not None else room // 2
        crop = F.pad(wave[start:start + self.samples], (0, max(self.samples - len(wave), 0)))
        return {"wave": crop, "mel": self.logmel(crop)}


# ----------------------------------------------------------------------------- losses
RESOLUTIONS = ((256, 64), (400, 160), (512, 128), (1024, 256))    # (n_fft, hop) of the STFT loss


def stft(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=wave.device)
    return torch.stft(wave.float(), n_fft, hop, n_fft, window, center=True, return_complex=True)


def stft_loss(wave: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over RESOLUTIONS of log-magnitude L1 + spectral convergence."""
    total = wave.new_zeros(())
    for n_fft, hop in RESOLUTIONS:
        got, want = stft(wave, n_fft, hop).abs(), stft(target, n_fft, hop).abs()
        total = total + F.l1_loss((got + 1e-5).log(), (want + 1e-5).log())
        total = total + (got - want).norm() / want.norm().clamp(min=1e-5)
    return total / len(RESOLUTIONS)


def anti_wrap(x: torch.Tensor) -> torch.Tensor:
    """|x| after wrapping it into [-pi, pi]: phase differences without the 2 pi jumps."""
    return (x - 2 * math.pi * torch.round(x / (2 * math.pi))).abs()


def phase_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Anti-wrapped errors of the group delay (phase difference across frequency) and of the
    instantaneous frequency (across time) of complex STFTs [B, F, T], weighted by the target's
    magnitude (relative to its mean): silent bins have no phase worth learning. The absolute phase
    itself is left free: the mel does not fix where a glottal pulse falls in a frame."""
    mag = target.abs()
    weight = (mag / mag.mean(dim=(1, 2), keepdim=True).clamp(min=1e-6)).clamp(max=10.0)
    got, want = predicted.angle(), target.angle()
    delay = anti_wrap(torch.diff(got, dim=1) - torch.diff(want, dim=1)) * weight[:, 1:]
    freq = anti_wrap(torch.diff(got, dim=2) - torch.diff(want, dim=2)) * weight[:, :, 1:]
    return delay.mean() + freq.mean()


# ----------------------------------------------------------------------------- speech quality
def quality_scores(refs: list[torch.Tensor], waves: list[torch.Tensor], sample_rate: int) -> dict | None:
    """Mean wideband PESQ and STOI of waves against refs (cut to the same length); None when the
    optional `pesq` / `pystoi` packages are not installed."""
    try:
        from pesq import pesq
        from pystoi import stoi
    except ImportError:
        return None
    pesqs, stois = [], []
    for ref, wave in zip(refs, waves):
        n = min(len(ref), len(wave))
        ref, wave = ref[:n].double().numpy(), wave[:n].double().numpy()
        pesqs.append(pesq(sample_rate, ref, wave, "wb"))
        stois.append(stoi(ref, wave, sample_rate, extended=False))
    return {"pesq": sum(pesqs) / len(pesqs), "stoi": sum(stois) / len(stois)}


class VocoderStage(Stage):
    spec = STAGES["F"]
    config_class = VocoderConfig

    def setup(self):
        cfg = self.cfg
        files = {"val_manifest": [cfg.val_manifest]}
        if not self.evaluation_only:
            files["train_manifest"] = [cfg.train_manifest]
        require_files(cfg, files, self.rt)
        self.mel_spec = MelSpec(n_mels=cfg.n_mels)
        self.model = NeuralVocoder(VocoderArch.from_config(cfg), self.mel_spec, cfg.refine_iters)
        self.modules = {"vocoder": self.model}
        self.logmel = LogMel(self.mel_spec).to(self.rt.device)
        if not self.evaluation_only:
            self.train_data = self.dataset(self.records(cfg.train_manifest), augment=True)
        self.val_records = self.records(cfg.val_manifest)
        self.val_data = self.dataset(self.val_records)
        self._baseline = None     # Griffin-Lim's scores on the eval clips: computed once
        log(self.rt, f"vocoder: {len(self.train_data or [])} training clips, crops of {cfg.crop_frames} frames; "
                     f"{sum(p.numel() for p in self.model.parameters()):,} parameters, "
                     f"{self.model.context_frames} frames of context on each side")

    def records(self, path: str) -> list[dict]:
        return [dict(r, text="-") for r in read_manifest(path, ["audio"], {"audio": self.cfg.audio_column})]

    def dataset(self, records, augment: bool = False) -> CropDataset:
        cfg = self.cfg
        return CropDataset(records, cfg.crop_frames, spec=self.mel_spec, max_seconds=cfg.max_seconds,
                           seed=cfg.seed, strict=cfg.strict_data, augment=augment)

    def loss(self, batch):
        cfg, target = self.cfg, batch["wave"]
        wave, predicted = self.model(batch["mel"])
        mel_l1 = F.l1_loss(self.logmel(wave.float()), batch["mel"].float())
        parts = {"stft": stft_loss(wave, target), "mel_l1": mel_l1,
                 "phase": phase_loss(predicted, stft(target, self.model.n_fft, self.model.hop))}
        total = cfg.stft_weight * parts["stft"] + cfg.mel_weight * mel_l1 + cfg.phase_weight * parts["phase"]
        return total, {k: v.item() for k, v in parts.items()}

    # ------------------------------------------------------------------ validation
    def evaluate(self):
        sums = [0.0, 0.0, 0.0]      # loss, mel_l1, crops
        for batch in self.eval_batches(self.val_data):
            with self.rt.autocast():
                loss, parts = self.loss(batch)
            n = len(batch["wave"])
            sums = [sums[0] + loss.item() * n, sums[1] + parts["mel_l1"] * n, sums[2] + n]
        loss, mel_l1, n = self.rt.sum(sums)
        out = {"val_loss": loss / max(n, 1), "mel_l1": mel_l1 / max(n, 1)}
        if self.rt.is_main and self.cfg.eval_clips > 0:
            with torch.random.fork_rng(devices=[]):     # nothing here may move the training RNG
                out.update(self.speech_quality())
        return out

    def speech_quality(self) -> dict:
        """PESQ / STOI of the first eval_clips whole val clips, vocoder and Griffin-Lim."""
        refs = [read_audio(r["audio"], self.mel_spec.sample_rate, self.cfg.max_seconds)
                for r in self.val_records[:self.cfg.eval_clips]]
        mels = [LogMel(self.mel_spec)(w) for w in refs]
        scores = quality_scores(refs, [self.model.mel_to_wave(m) for m in mels], self.mel_spec.sample_rate)
        if scores is None:
            if self._baseline is None:
                log(self.rt, "vocoder: the optional packages pesq and pystoi are not installed: no PESQ / STOI")
                self._baseline = {}
            return {}
        if self._baseline is None:
            griffin_lim = GriffinLimVocoder(self.mel_spec, n_iter=self.cfg.griffin_lim_iters)
            gl = quality_scores(refs, [griffin_lim.mel_to_wave(m) for m in mels], self.mel_spec.sample_rate)
            self._baseline = {f"griffin_lim_{k}": v for k, v in gl.items()}
        return {**scores, **self._baseline}
