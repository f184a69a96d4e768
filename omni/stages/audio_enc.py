"""Stage B: the audio encoder, trained as a character CTC speech recognizer (docs/stage_b_audio.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni.audio_enc import ASR, AudioEncArch, ctc_greedy_decode
from omni.config import TrainConfig
from omni.data.audio import AudioTextDataset, spec_augment
from omni.data.common import require_files
from omni.data.manifest import SampleError, read_manifest
from omni.data.sampler import BucketedBatches
from omni.features import MelSpec
from omni.layers import pad_stack
from omni.logs import log
from omni.metrics import error_counts
from omni.registry import STAGES
from omni.train.stage import Stage
from omni.transcripts import Charset, derive_charset


@dataclass
class AudioEncConfig(TrainConfig, AudioEncArch):
    train_manifest: str = "data/demo/asr_train.jsonl"
    val_manifest: str = "data/demo/asr_val.jsonl"
    test_manifest: str = ""            # also scored at every validation when set (CER/WER only)
    audio_column: str = "audio"        # manifest column names (a LibriSpeech-style list may differ)
    text_column: str = "text"
    max_seconds: float = 30.0          # longer clips are skipped as bad samples
    spec_augment: bool = True          # training only; masks drawn from the per-sample generator
    time_masks: int = 2
    time_width: int = 20               # frames (10 ms each), at most a quarter of the clip
    freq_masks: int = 2
    freq_width: int = 10               # mel bands
    save_dir: str = "checkpoints/audio_enc_tiny"


class SpeechDataset(AudioTextDataset):
    """Adds CTC labels (the transcript in the model's character set; characters outside it are
    dropped and counted) and, when augmenting, SpecAugment drawn from the sample's own generator."""

    def __init__(self, records, charset: Charset, masks: dict | None = None, **kw):
        super().__init__(records, **kw)
        self.charset, self.masks = charset, masks

    def load(self, record, generator):
        sample = super().load(record, generator)
        text, dropped = self.charset.split(sample["text"])
        if not text:
            raise SampleError("no characters of the CTC set in the text")
        sample["text"], sample["dropped"] = text, sum(dropped.values())
        sample["labels"] = torch.tensor([self.charset.ids[c] for c in text])
        if generator is not None and self.masks:
            sample["mel"] = spec_augment(sample["mel"], generator, **self.masks)
        return sample


class AudioEncStage(Stage):
    spec = STAGES["B"]
    config_class = AudioEncConfig

    def setup(self):
        cfg = self.cfg
        manifests = {"train_manifest": "" if self.evaluation_only else cfg.train_manifest,
                     "val_manifest": cfg.val_manifest, "test_manifest": cfg.test_manifest}
        require_files(cfg, {k: [v] for k, v in manifests.items() if v}, self.rt)
        masks = dict(time_masks=cfg.time_masks, time_width=cfg.time_width,
                     freq_masks=cfg.freq_masks, freq_width=cfg.freq_width) if cfg.spec_augment else None
        train = None if self.evaluation_only else self.records(cfg.train_manifest)
        if train is not None and not cfg.charset:
            # Saved in config.json and every checkpoint, so the loaders rebuild the same labels.
            # (An evaluated checkpoint brings its own; one saved before the key existed: the legacy set.)
            cfg.charset = derive_charset(r["text"] for r in train)
        asr = ASR(AudioEncArch.from_config(cfg))
        self.modules = {"enc": asr.enc, "head": asr.head}
        self.asr = asr
        if train is not None:
            self.train_data = self.dataset(train, augment=masks is not None, masks=masks)
        self.val_data = self.dataset(self.records(cfg.val_manifest))
        self.test_data = self.dataset(self.records(cfg.test_manifest)) if cfg.test_manifest else None
        log(self.rt, f"audio_enc: {len(self.train_data or [])} training clips, {len(self.val_data)} validation clips; "
                     f"{len(asr.charset)} characters {asr.charset.chars!r}; "
                     f"{sum(p.numel() for p in asr.parameters()):,} parameters")

    def records(self, path: str) -> list[dict]:
        return read_manifest(path, ["audio", "text"], {"audio": self.cfg.audio_column, "text": self.cfg.text_column})

    def dataset(self, records, **kw) -> SpeechDataset:
        cfg = self.cfg
        return SpeechDataset(records, self.asr.charset, spec=MelSpec(n_mels=cfg.n_mels), max_seconds=cfg.max_seconds,
                             seed=cfg.seed, strict=cfg.strict_data, **kw)

    def batch_plan(self):
        # Similar lengths share a batch: less padding, and CTC cost grows with the longest clip.
        return BucketedBatches(self.train_data.lengths(), self.cfg.batch_size, self.cfg.seed)

    def collate(self, samples):
        mel, mask = pad_stack([s["mel"] for s in samples])
        return {"mel": mel, "mask": mask, "targets": torch.cat([s["labels"] for s in samples]),
                "target_lengths": torch.tensor([len(s["labels"]) for s in samples]),
                "text": [s["text"] for s in samples], "dropped": sum(s["dropped"] for s in samples)}

    def ctc_losses(self, batch):
        """(CTC loss per utterance [B], log-probs [B, T', V], frame counts [B])."""
        log_probs, mask = self.asr(batch["mel"], batch["mask"])
        frames = mask.sum(dim=1)
        # zero_infinity: a clip too fast for the downsampled frame rate adds nothing instead of inf.
        losses = F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], frames, batch["target_lengths"],
                            blank=0, reduction="none", zero_infinity=True)
        return losses / batch["target_lengths"].clamp(min=1), log_probs, frames

    def loss(self, batch):
        losses, _, _ = self.ctc_losses(batch)
        return losses.mean(), {"n_frames": int(batch["mask"].sum()), "n_clips": len(batch["text"])}

    def score(self, dataset) -> list[float]:
        """[loss sum, clips, char edits, chars, word edits, words, characters dropped from the
        references (outside the character set)] over this rank's share."""
        totals = [0.0] * 7
        for batch in self.eval_batches(dataset):
            with self.rt.autocast():
                losses, log_probs, frames = self.ctc_losses(batch)
            hyps = [self.asr.charset.decode(ids) for ids in ctc_greedy_decode(log_probs, frames)]
            counts = (float(losses.sum()), len(hyps), *error_counts(batch["text"], hyps, "char"),
                      *error_counts(batch["text"], hyps, "word"), batch["dropped"])
            totals = [t + c for t, c in zip(totals, counts)]
        return totals

    def evaluate(self):
        loss, n, ce, cn, we, wn, dropped = self.rt.sum(self.score(self.val_data))
        out = {"val_loss": loss / max(n, 1), "cer": ce / max(cn, 1), "wer": we / max(wn, 1),
               "dropped_chars": int(dropped)}
        if self.test_data is not None:
            _, _, ce, cn, we, wn, dropped = self.rt.sum(self.score(self.test_data))
            out.update(test_cer=ce / max(cn, 1), test_wer=we / max(wn, 1), test_dropped_chars=int(dropped))
        return out
