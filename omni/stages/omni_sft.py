"""Stage E: multimodal SFT. The Thinker learns to answer about images and speech through projectors
from the (frozen) encoders of stages B and C."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omni.config import TrainConfig, UserError, choice, fraction, inherit, inherited, positive
from omni.data.audio import audio_frames
from omni.data.common import require_files
from omni.data.image import MAX_IMAGE_PIXELS, RESIZE_MODES
from omni.data.manifest import SampleError, read_manifest
from omni.data.sft import SFTDataset, check_conversation, longest_audio, read_sft_manifest
from omni.features import MelSpec
from omni.loading import build_omni
from omni.logs import log
from omni.metrics import error_counts
from omni.omni_model import AnswerSmoothing, Media, OmniModel, merge_patches
from omni.registry import STAGES
from omni.train.stage import Stage

ASR_PROMPT = "what did you hear?"          # auxiliary task: write down the speech
CAPTION_PROMPT = "describe the picture"    # auxiliary task: caption the image
SCORED = {"image_qa": "image", "speech_qa": "speech", "text": "text", "caption": "caption"}   # kind -> metric name
HEARD = "heard_word_acc"    # with transcribe: words of the spoken questions' transcripts the Thinker heard right


@dataclass
class OmniSFTConfig(TrainConfig):
    thinker_dir: str = "checkpoints/thinker_tiny"
    audio_enc_dir: str = "checkpoints/audio_enc_tiny"
    vision_dir: str = "checkpoints/vision_tiny"
    train_manifest: str = "data/demo/sft_train.jsonl"
    val_manifest: str = "data/demo/sft_val.jsonl"
    test_manifest: str = "data/demo/sft_test.jsonl"   # reported separately ("" = none)
    asr_manifest: str = ""          # optional auxiliary transcription task (audio, text)
    caption_manifest: str = ""      # optional auxiliary captioning task (image, caption)
    freeze_encoders: bool = True
    train_vision: bool = False      # train the vision encoder even when freeze_encoders is true
    vision_cache: bool = False      # the frozen ViT sees each image once (OmniModel.vision_cache): for
                                    # small image sets seen every epoch, like the demo world's
    freeze_thinker: bool = False
    # spoken questions (chain of modality): the Thinker first writes what it heard (the records'
    # "transcript"), then answers from those words; false: it answers with the frames in view
    transcribe: bool = False
    patch_merge: int = positive(1)  # image tokens: merge x merge neighbouring ViT patches each (CLS dropped)
    image_size: int = inherited()   # 0: the vision encoder's (vision_dir); saved filled in
    n_mels: int = inherited()       # 0: the audio encoder's (audio_enc_dir); saved filled in
    image_resize: str = choice(*RESIZE_MODES)   # as the vision stage was trained (omni/data/image.py)
    # larger images (width x height, from the header) are bad samples, never decoded (omni/data/image.py)
    max_image_pixels: int = positive(MAX_IMAGE_PIXELS)
    answer_smoothing: float = fraction()  # image answers: first token smoothed within its answer type
    qa_eval_limit: int = 0          # answers generated per split for accuracy; 0 = all
    max_answer_tokens: int = 16
    save_dir: str = "checkpoints/omni_sft_tiny"

    def __post_init__(self):
        super().__post_init__()
        if self.vision_cache and (self.train_vision or not self.freeze_encoders):
            raise UserError("config key 'vision_cache': true needs a frozen vision encoder "
                            "(freeze_encoders true, train_vision false)")


def figure_names(kind: str, topic: str | None) -> list[str]:
    """The figures a scored conversation counts towards: "image_acc" and "image_colour", or
    "caption_word_acc" (captions are long: words right, 1 - word error rate)."""
    name = SCORED[kind]
    if kind == "caption":
        return [f"{name}_word_acc"]
    return [f"{name}_acc"] + ([f"{name}_{topic}"] if topic else [])


class AnswerCounts:
    """Right and asked per figure. The names come from the records, which every rank reads alike,
    so all ranks sum the same list (a rank that saw no question of a topic adds zeros)."""

    def __init__(self, records: list[dict], heard: bool = False):
        names = {n for r in records if r.get("kind", "text") in SCORED
                 for n in figure_names(r.get("kind", "text"), r.get("topic"))}
        self.names = sorted(names | ({HEARD} if heard else set()))
        self.right, self.asked = dict.fromkeys(self.names, 0.0), dict.fromkeys(self.names, 0.0)

    def add(self, kind: str, topic: str | None, expected: str, got: str) -> None:
        expected, got = expected.strip(), got.strip()
        for name in figure_names(kind, topic):
            if kind == "caption":
                self.add_words(name, expected, got)
            else:
                self.right[name] += float(got == expected)
                self.asked[name] += 1

    def add_words(self, name: str, expected: str, got: str) -> None:
        """Words of `expected` that `got` has right: 1 - word error rate, summed over the calls."""
        edits, words = error_counts(expected.strip(), got.strip(), "word")
        self.right[name] += max(words - edits, 0)
        self.asked[name] += words

    def results(self, sum_over_ranks=lambda xs: xs) -> dict:
        n = len(self.names)
        sums = sum_over_ranks([self.right[k] for k in self.names] + [self.asked[k] for k in self.names])
        return {k: sums[i] / sums[n + i] for i, k in enumerate(self.names) if sums[n + i]}


def auxiliary_records(path: str, media: str, text: str, prompt: str, kind: str) -> list[dict]:
    """Turn (media, text) manifest rows into single-turn conversations."""
    return [{"_source": r["_source"], media: r[media], "kind": kind,
             "conversation": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r[text]}]}
            for r in read_manifest(path, [media, text])]


def listening_records(path: str) -> list[dict]:
    """(audio, text) manifest rows as listening-only samples: with transcribe, the Thinker learns to
    write what it hears from them (OmniModel.listening_sequence), with no question to answer."""
    return [{"_source": r["_source"], "audio": r["audio"], "transcript": r["text"], "kind": "asr", "conversation": []}
            for r in read_manifest(path, ["audio", "text"])]


@torch.no_grad()
def check_sequence_lengths(model: OmniModel, records: list[dict], spec: MelSpec, thinker_dir: str) -> None:
    """UserError naming the manifest line of the first conversation whose sequence would exceed the
    Thinker's max_seq_len (found at start-up: in training it would stop the run mid-way).

    The lengths are the ones `OmniModel.sequences` builds, with the media's positions known before
    any encoder runs: the image's tokens, the audio's frames from the file's header, and with
    `transcribe` the listening step (frames and transcript) beside the answer (transcript, no
    frames). Records that will be bad samples (an unreadable or over-long clip, a malformed
    conversation) are left to the loader, which skips and counts them."""
    limit, d = model.thinker.arch.max_seq_len, model.thinker.arch.d_model
    vision = model.vision_encoder
    try:
        image_tokens = merge_patches(torch.zeros(1, vision.num_tokens, 1), model.patch_merge).shape[1]
    except ValueError as e:         # a merge that does not tile the vision encoder's grid
        raise UserError(f"config key 'patch_merge': {e}") from None
    encoder = model.audio_encoder.arch
    for record in records:
        try:
            conversation = check_conversation(record["conversation"], model.transcribe and "audio" in record)
        except SampleError:
            continue
        if model.transcribe and "audio" in record and not isinstance(record.get("transcript"), str):
            continue
        media = Media()
        if "image" in record:
            media.image = torch.zeros(image_tokens, d, device=model.device)
        if "audio" in record:
            frames = math.ceil(audio_frames(record["audio"], spec) / encoder.downsample)
            if not 0 < frames <= encoder.max_positions:
                continue
            media.audio = torch.zeros(frames, d, device=model.device)
            media.heard = record.get("transcript", "")
        sample = {"conversation": conversation, "transcript": media.heard}
        for embeds, _, _ in model.sequences([sample], [media]):
            if embeds.shape[0] > limit:
                raise UserError(f"{record['_source']}: a sequence of {embeds.shape[0]} positions (image "
                                f"{image_tokens if media.image is not None else 0} tokens, audio "
                                f"{0 if media.audio is None else media.audio.shape[0]} frames) exceeds the "
                                f"Thinker's max_seq_len {limit} ({thinker_dir}): shorten it or leave it out")


class OmniSFTStage(Stage):
    spec = STAGES["E"]       # + the optional keys "audio_enc", "vision" when they are trained
    config_class = OmniSFTConfig

    def setup(self):
        cfg, rt = self.cfg, self.rt
        manifests = {"train_manifest": [cfg.train_manifest], "val_manifest": [cfg.val_manifest],
                     "test_manifest": [cfg.test_manifest] if cfg.test_manifest else [],
                     "asr_manifest": [cfg.asr_manifest] if cfg.asr_manifest else [],
                     "caption_manifest": [cfg.caption_manifest] if cfg.caption_manifest else []}
        if self.evaluation_only:
            manifests = {k: v for k, v in manifests.items() if k in ("val_manifest", "test_manifest")}
        require_files(cfg, manifests, rt)
        self.model = build_omni(vars(cfg), cfg.thinker_dir, cfg.audio_enc_dir, cfg.vision_dir, rt.device)
        thinker, tokenizer = self.model.thinker, self.model.tok
        audio_enc, vision = self.model.audio_encoder, self.model.vision_encoder
        # The media must reach the encoders as they were trained: the config takes their sizes.
        inherit(cfg, "image_size", vision.image_size, cfg.vision_dir)
        inherit(cfg, "n_mels", audio_enc.arch.n_mels, cfg.audio_enc_dir)
        self.modules = {"thinker": thinker, "proj_a": self.model.proj_a, "proj_v": self.model.proj_v}
        self.trained_encoders = tuple(name for name in ("audio_enc", "vision")
                                      if not cfg.freeze_encoders or (name == "vision" and cfg.train_vision))
        for name, enc in (("audio_enc", audio_enc), ("vision", vision)):
            enc.requires_grad_(name in self.trained_encoders)
            if name in self.trained_encoders:
                self.modules[name] = enc
            else:
                enc.to(rt.device).eval()
        if cfg.vision_cache:
            self.model.vision_cache = {}        # each image through the frozen ViT once (OmniModel)
        thinker.requires_grad_(not cfg.freeze_thinker)

        # a clip longer than the audio encoder takes is a bad sample, like an unreadable one
        spec = MelSpec(n_mels=cfg.n_mels)
        kw = {"image_size": cfg.image_size, "spec": spec, "resize": cfg.image_resize, "strict": cfg.strict_data,
              "seed": cfg.seed, "max_pixels": cfg.max_image_pixels,
              "max_audio_seconds": longest_audio(audio_enc.arch, spec), "transcribe": cfg.transcribe}
        records = []
        if not self.evaluation_only:
            records = read_sft_manifest(cfg.train_manifest)
            if cfg.asr_manifest and cfg.transcribe:
                records += listening_records(cfg.asr_manifest)
            elif cfg.asr_manifest:
                records += auxiliary_records(cfg.asr_manifest, "audio", "text", ASR_PROMPT, "asr")
            if cfg.caption_manifest:
                records += auxiliary_records(cfg.caption_manifest, "image", "caption", CAPTION_PROMPT, "caption")
            self.train_data = SFTDataset(records, **kw)
        self.smoothing = AnswerSmoothing(records, tokenizer, cfg.answer_smoothing) if cfg.answer_smoothing else None
        self.val_data = SFTDataset(read_sft_manifest(cfg.val_manifest), **kw)
        self.test_data = SFTDataset(read_sft_manifest(cfg.test_manifest), **kw) if cfg.test_manifest else None
        for data in (self.train_data, self.val_data, self.test_data):
            if data is not None:
                check_sequence_lengths(self.model, data.records, spec, cfg.thinker_dir)
        trained = sum(p.numel() for p in self.parameters())
        log(rt, f"omni: {len(records)} training conversations, {len(self.val_data)} validation; "
                f"{trained:,} trained parameters (trained encoders: {', '.join(self.trained_encoders) or 'none'})")

    def collate(self, samples):
        return samples        # sequences are built on the device, after the encoders run

    def loss(self, batch):
        smoothing = self.smoothing if self.model.thinker.training else None   # the validation loss stays plain
        loss, n = self.model.batch_loss(batch, self.trained_encoders, smoothing)
        return loss, {"n_answer_tokens": n}

    def evaluate(self):
        metrics = {"val_loss": self.mean_loss(self.val_data)}
        for split, data in (("val", self.val_data), ("test", self.test_data)):
            if data is not None:
                metrics.update({f"{split}_{k}": v for k, v in self.answer_accuracy(data).items()})
        return metrics

    def answer_accuracy(self, dataset) -> dict:
        """Exact-match accuracy of greedy answers per kind of question ("image_acc", ...) and per
        topic where records name one ("image_colour", ...); word accuracy of captions, and with
        `transcribe` of what the Thinker heard in the spoken questions (HEARD)."""
        indices = list(range(len(dataset)))
        if self.cfg.qa_eval_limit:
            indices = indices[:self.cfg.qa_eval_limit]
        records = [dataset.records[i] for i in indices]
        counts = AnswerCounts(records, heard=self.model.transcribe and any("transcript" in r for r in records))
        for i in indices[self.rt.rank::self.rt.world_size]:
            sample = dataset[(i, 0)]
            if sample is None or sample["kind"] not in SCORED or len(sample["conversation"]) != 2:
                continue
            question, expected = (t["content"] for t in sample["conversation"])
            limit = self.cfg.max_answer_tokens * (3 if sample["kind"] == "caption" else 1)
            with self.rt.autocast():
                media = self.model.encode_media([sample["image"]], [sample["mel"]])[0]
                ids = list(self.model.answer(question, max_new_tokens=limit, media=media))
            counts.add(sample["kind"], sample["topic"], expected, self.model.tok.decode(ids))
            if media.heard is not None and sample.get("transcript"):
                counts.add_words(HEARD, sample["transcript"], media.heard)
        return counts.results(self.rt.sum)
