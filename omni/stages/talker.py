"""Stage D: the RVQ speech codec and the Talker, trained in two phases inside one run.

Phase 1 (the first `codec_steps` optimizer steps) trains the codec: mel reconstruction loss plus
the commitment loss, with EMA codebook updates and dead-code restarts. Phase 2 (the remaining
steps) trains the Talker to predict the codes of the frozen codec from the text. Both phases run
in the shared loop; the phase comes from a training-batch counter saved in the codec's
state_dict, so a run resumed anywhere, even across the switch, continues exactly.
See docs/stage_d_talker.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omni import checkpoint as ckpt
from omni.codec import LOG_FLOOR, CodecArch, SpeechCodec, usage_perplexity
from omni.config import TrainConfig, UserError
from omni.data.audio import AudioTextDataset
from omni.data.common import require_files
from omni.data.manifest import SampleError, read_manifest
from omni.data.sampler import BucketedBatches
from omni.features import MelSpec
from omni.generation import Speaker
from omni.layers import pad_stack
from omni.loading import load_asr
from omni.logs import log
from omni.metrics import cer
from omni.registry import STAGES
from omni.talker import Talker, TalkerArch, text_to_ids
from omni.train.stage import Stage
from omni.transcripts import derive_charset
from omni.vocoder import GriffinLimVocoder


@dataclass
class TalkerConfig(TrainConfig, CodecArch, TalkerArch):
    train_manifest: str = "data/demo/tts_train.jsonl"
    val_manifest: str = "data/demo/tts_val.jsonl"
    extra_train_manifest: str = ""     # more speech + text in other voices (source 1); see the doc
    text_column: str = "text"          # column names in your manifests
    audio_column: str = "audio"
    max_seconds: float = 12.0          # longer clips are skipped as bad samples
    codec_steps: int = 1000            # phase 1 length; the Talker trains on frozen codes afterwards
    asr_ckpt_dir: str = "checkpoints/audio_enc_tiny"   # Stage B model that transcribes spoken val sentences
    eval_sentences: int = 8            # val sentences spoken and transcribed at each validation (0 = off)
    eval_temperature: float = 0.0      # 0 = greedy code choice when speaking them
    griffin_lim_iters: int = 32
    save_dir: str = "checkpoints/talker_tiny"
    demo_dir: str = "data/demo"


class SourcedDataset(AudioTextDataset):
    """Audio-text clips that also say which source (voice) they come from, with the text in the
    Talker's character set (characters outside it dropped and counted)."""

    def __init__(self, records, charset, *args, **kw):
        super().__init__(records, *args, **kw)
        self.charset = charset

    def load(self, record, generator):
        sample = super().load(record, generator)
        text, dropped = self.charset.split(sample["text"])
        if not text:
            raise SampleError("no characters of the Talker's set in the text")
        return {**sample, "text": text, "dropped": sum(dropped.values()), "source": record["source"]}


class TalkerStage(Stage):
    spec = STAGES["D"]
    config_class = TalkerConfig

    def setup(self):
        cfg = self.cfg
        files = {"train_manifest": [cfg.train_manifest], "val_manifest": [cfg.val_manifest]}
        if cfg.extra_train_manifest:
            files["extra_train_manifest"] = [cfg.extra_train_manifest]
        if self.evaluation_only:
            files = {"val_manifest": files["val_manifest"]}
        require_files(cfg, files, self.rt)
        self.mel_spec = MelSpec(n_mels=cfg.n_mels)
        train = None if self.evaluation_only else self.records(cfg.train_manifest, cfg.extra_train_manifest)
        if train is not None and not cfg.charset:
            # Saved in config.json and every checkpoint, so load_speaker rebuilds the same ids.
            # (An evaluated checkpoint brings its own; one saved before the key existed: the legacy set.)
            cfg.charset = derive_charset(r["text"] for r in train)
        codec = SpeechCodec(CodecArch.from_config(cfg))
        talker = Talker(TalkerArch.from_config(cfg), cfg.n_codebooks, cfg.codebook_size)
        self.charset = talker.charset
        self.val_data = self.dataset(self.records(cfg.val_manifest))
        if train is not None:    # an evaluated checkpoint brings its frames_per_char buffer
            self.fit_to_training_data(codec, talker, train)
        self.modules = {"talker": talker, "rvq": codec}
        self.vocoder = GriffinLimVocoder(self.mel_spec, n_iter=cfg.griffin_lim_iters)
        self._asr, self._asr_noted, self._vocoder_cer = None, False, None

    def fit_to_training_data(self, codec: SpeechCodec, talker: Talker, records: list[dict]):
        """Read the training clips, set the Talker's length prior from them, check they fit max_seq_len."""
        cfg = self.cfg
        self.train_data = self.dataset(records)
        self.lengths = self.train_data.lengths()
        texts = [len(self.charset.normalize(r["text"])) for r in records]
        code_frames = [codec.code_frames(n) for n in self.lengths]
        talker.frames_per_char.fill_(sum(code_frames) / max(sum(texts), 1))
        longest = max(t + f + 1 for t, f in zip(texts, code_frames) if f * cfg.downsample <= cfg.max_seconds * 100)
        if longest > cfg.max_seq_len:
            raise UserError(f"config key 'max_seq_len': {cfg.max_seq_len} is shorter than the longest "
                            f"training utterance ({longest} characters + code frames)")
        log(self.rt, f"talker: {len(self.train_data)} training clips, {len(self.charset)} characters "
                     f"{self.charset.chars!r}, {float(talker.frames_per_char):.2f} code "
                     f"frames per character at {100 / cfg.downsample:g} Hz; steps 1-{cfg.codec_steps} train the "
                     f"codec, the rest the Talker")

    def records(self, path: str, extra: str = "") -> list[dict]:
        """The clips of `path` (source 0: the voice to learn) and of `extra` (source 1)."""
        columns = {"text": self.cfg.text_column, "audio": self.cfg.audio_column}
        records = [dict(r, source=0) for r in read_manifest(path, ["audio", "text"], columns)]
        if extra:
            records += [dict(r, source=1) for r in read_manifest(extra, ["audio", "text"], columns)]
        return records

    def dataset(self, records: list[dict]) -> SourcedDataset:
        return SourcedDataset(records, self.charset, self.mel_spec, self.cfg.max_seconds, seed=self.cfg.seed,
                              strict=self.cfg.strict_data)

    def batch_plan(self):
        return BucketedBatches(self.lengths, self.cfg.batch_size, self.cfg.seed)

    def collate(self, samples):
        mel, mask = pad_stack([s["mel"] for s in samples], value=LOG_FLOOR)
        return {"mel": mel, "mask": mask, "text": [text_to_ids(s["text"], self.charset) for s in samples],
                "source": [s["source"] for s in samples], "dropped": sum(s["dropped"] for s in samples)}

    # ------------------------------------------------------------------ phases
    @property
    def codec(self) -> SpeechCodec:
        return self.modules["rvq"]

    def steps_done(self) -> int:
        return int(self.codec.train_batches) // self.cfg.grad_accum_steps

    def loss(self, batch):
        codec_phase = self.steps_done() < self.cfg.codec_steps
        if self.codec.training:          # a training micro-batch (validation runs in eval mode)
            self.codec.train_batches += 1
        return self.codec_loss(batch, update=self.codec.training) if codec_phase else self.talker_loss(batch)

    def codec_loss(self, batch, update: bool):
        recon, codes, cmask, commit = self.codec(batch["mel"], batch["mask"], update=update)
        error = self.codec.mel_error(recon, batch["mel"], batch["mask"])
        metrics = {"mel_l1": error.item() * self.cfg.mel_std, "commit": commit.item(),
                   "n_frames": int(batch["mask"].sum())}
        return error + self.cfg.commitment * commit, metrics

    def frozen_codes(self, batch) -> list[torch.Tensor]:
        codes, cmask = self.codec.encode(batch["mel"], batch["mask"])
        return [c[:n] for c, n in zip(codes, cmask.sum(1).tolist())]

    def talker_loss(self, batch):
        return self.modules["talker"].loss(batch["text"], self.frozen_codes(batch), batch["source"])

    # ------------------------------------------------------------------ validation
    def evaluate(self):
        cfg, sums = self.cfg, {}
        usage = torch.zeros(cfg.n_codebooks, cfg.codebook_size, dtype=torch.float64)
        names = ["mel_l1", "code_loss"] + [f"acc_{k}" for k in range(cfg.n_codebooks)] + ["eos_acc", "len_err", "n"]
        dropped = 0
        for batch in self.eval_batches(self.val_data):
            with self.rt.autocast():
                recon, codes, cmask, _ = self.codec(batch["mel"], batch["mask"])
                error = self.codec.mel_error(recon, batch["mel"], batch["mask"])
                code_list = [c[:n] for c, n in zip(codes, cmask.sum(1).tolist())]
                code_loss, m = self.modules["talker"].loss(batch["text"], code_list, batch["source"])
            n, dropped = len(code_list), dropped + batch["dropped"]
            values = {"mel_l1": error.item() * cfg.mel_std, "code_loss": code_loss.item(), **m, "n": 1}
            for key in names:
                sums[key] = sums.get(key, 0.0) + values[key] * n
            for k in range(cfg.n_codebooks):
                usage[k] += torch.bincount(codes[..., k][cmask].cpu(), minlength=cfg.codebook_size).double()
        totals = self.rt.sum([sums.get(k, 0.0) for k in names] + usage.reshape(-1).tolist() + [dropped])
        dropped = int(totals.pop())
        count = max(totals[len(names) - 1], 1)
        out = {k: totals[i] / count for i, k in enumerate(names[:-1])}
        usage = torch.tensor(totals[len(names):]).view(cfg.n_codebooks, cfg.codebook_size)
        for k in range(cfg.n_codebooks):
            out[f"perplexity_{k}"] = usage_perplexity(usage[k])
            out[f"codes_used_{k}"] = int((usage[k] > 0).sum())
        # Both parts always count, so val_loss compares across the phase switch: a phase-1
        # checkpoint (untrained Talker) never beats a trained one in *_best.pt.
        out = {"val_loss": out["mel_l1"] / cfg.mel_std + out["code_loss"], **out, "dropped_chars": dropped}
        if self.rt.is_main and cfg.eval_sentences > 0:
            with torch.random.fork_rng(devices=[]):   # nothing here may move the training RNG
                out.update(self.intelligibility())
        return out

    def asr(self):
        """The Stage B recogniser, or None (with a one-time note) while there is none."""
        if self._asr is None and ckpt.for_inference(self.cfg.asr_ckpt_dir, STAGES["B"].prefix):
            try:
                self._asr = load_asr(self.cfg.asr_ckpt_dir, self.rt.device)
            except (ImportError, UserError, OSError) as e:
                self._note(f"cannot load the ASR model ({e})")
        elif self._asr is None:
            self._note(f"no Stage B checkpoint in {self.cfg.asr_ckpt_dir}")
        return self._asr

    def _note(self, why: str):
        if not self._asr_noted:
            log(self.rt, f"talker: {why}; skipping the intelligibility metric (CER) for now")
            self._asr_noted = True

    def intelligibility(self) -> dict:
        """CER of the ASR model on: held-out sentences spoken by the Talker ("cer", after the codec
        phase), the same clips passed through the codec ("codec_cer") and through the vocoder only
        ("vocoder_cer", the ceiling Griffin-Lim leaves)."""
        asr = self.asr()
        if asr is None:
            return {}
        samples = [s for s in (self.val_data[(i, 0)] for i in range(min(self.cfg.eval_sentences, len(self.val_data))))
                   if s is not None]
        # Scored in the characters both models know (sample texts are in the Talker's set already).
        refs = [asr.charset.normalize(s["text"]) for s in samples]
        mels = [s["mel"].to(self.rt.device) for s in samples]
        out = {}
        if self._vocoder_cer is None:
            self._vocoder_cer = cer(refs, asr.transcribe([self.vocoder.mel_to_wave(m) for m in mels]))
        out["vocoder_cer"] = self._vocoder_cer
        resynth = [self.codec(m[None], torch.ones(1, len(m), dtype=torch.bool, device=m.device))[0][0] for m in mels]
        out["codec_cer"] = cer(refs, asr.transcribe([self.vocoder.mel_to_wave(m) for m in resynth]))
        if self.steps_done() > self.cfg.codec_steps:
            speaker = Speaker(self.modules["talker"], self.codec, self.vocoder)
            waves = [speaker.speak(s["text"], temperature=self.cfg.eval_temperature, seed=self.cfg.seed + i)
                     for i, s in enumerate(samples)]
            hyps = asr.transcribe(waves)
            out["cer"] = cer(refs, hyps)
            out["seconds_spoken"] = sum(len(w) for w in waves) / self.mel_spec.sample_rate
            log(self.rt, f"talker: said {refs[0]!r}, heard {hyps[0]!r}")
        return out
