"""Stage E: multimodal SFT. The Thinker learns to answer about images and speech through projectors
from the (frozen) encoders of stages B and C."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omni.colours import MAX_OBJECTS
from omni.config import TrainConfig, UserError, choice, fraction, inherit, inherited, positive
from omni.data.audio import audio_frames
from omni.data.image import MAX_IMAGE_PIXELS, RESIZE_MODES
from omni.data.common import require_files
from omni.data.manifest import SampleError, read_manifest
from omni.metrics import error_counts
from omni.data.sft import SFTDataset, check_conversation, longest_audio, read_sft_manifest
from omni.features import MelSpec
from omni.loading import load_omni_parts
from omni.omni_model import AnswerSmoothing, Media, OmniModel, Projector, vision_projector
from omni.logs import log
from omni.registry import STAGES
from omni.train.stage import Stage

ASR_PROMPT = "what did you hear?"          # auxiliary task: write down the speech
CAPTION_PROMPT = "describe the picture"    # auxiliary task: caption the image
SCORED = {"image_qa": "image", "speech_qa": "speech", "text": "text", "caption": "caption"}   # kind -> metric name


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
    audio_transcript: bool = False  # also write Stage B's CTC transcript of the audio into the prompt
    audio_frames: bool = True       # false: a spoken question reaches the Thinker as that transcript alone
    image_size: int = inherited()   # 0: the vision encoder's (vision_dir); saved filled in
    n_mels: int = inherited()       # 0: the audio encoder's (audio_enc_dir); saved filled in
    image_resize: str = choice(*RESIZE_MODES)   # as the vision stage was trained (omni/data/image.py)
    # larger images (width x height, from the header) are bad samples, never decoded (omni/data/image.py)
    max_image_pixels: int = positive(MAX_IMAGE_PIXELS)
    # Demo-world options for colour-shape pairs held out from training (omni/colours.py, data/recolour.py):
    colour_apart: bool = False      # the ViT sees silhouettes; patch colours are added after the projector
    object_tokens: bool = False     # with colour_apart: one image token per object, not per patch
    recolour_share: float = fraction()    # training objects repainted off-palette, turns on their colour dropped
    answer_smoothing: float = fraction()  # image answers: first token smoothed within its answer type
    qa_eval_limit: int = 0          # answers generated per split for accuracy; 0 = all
    max_answer_tokens: int = 16

    def __post_init__(self):
        super().__post_init__()
        if not self.audio_frames and not self.audio_transcript:
            raise UserError("config key 'audio_frames': false needs audio_transcript true "
                            "(a spoken question would reach the Thinker empty)")
        if self.vision_cache and (self.train_vision or not self.freeze_encoders):
            raise UserError("config key 'vision_cache': true needs a frozen vision encoder "
                            "(freeze_encoders true, train_vision false)")
        if self.object_tokens and not self.colour_apart:
            raise UserError("config key 'object_tokens': true needs colour_apart true "
                            "(objects are found as the flat-colour regions of a silhouette)")


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

    def __init__(self, records: list[dict]):
        names = {n for r in records if r.get("kind", "text") in SCORED
                 for n in figure_names(r.get("kind", "text"), r.get("topic"))}
        self.names = sorted(names)
        self.right, self.asked = dict.fromkeys(self.names, 0.0), dict.fromkeys(self.names, 0.0)

    def add(self, kind: str, topic: str | None, expected: str, got: str) -> None:
        expected, got = expected.strip(), got.strip()
        for name in figure_names(kind, topic):
            if kind == "caption":
                edits, words = error_counts(expected, got, "word")
                self.right[name] += max(words - edits, 0)
                self.asked[name] += words
            else:
                self.right[name] += float(got == expected)
                self.asked[name] += 1

    def results(self, sum_over_ranks=lambda xs: xs) -> dict:
        n = len(self.names)
        sums = sum_over_ranks([self.right[k] for k in self.names] + [self.asked[k] for k in self.names])
        return {k: sums[i] / sums[n + i] for i, k in enumerate(self.names) if sums[n + i]}


def auxiliary_records(path: str, media: str, text: str, prompt: str, kind: str) -> list[dict]:
    """Turn (media, text) manifest rows into single-turn conversations."""
    return [{"_source": r["_source"], media: r[media], "kind": kind,
             "conversation": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r[text]}]}
            for r in read_manifest(path, [media, text])]


@torch.no_grad()
def check_sequence_lengths(model: OmniModel, records: list[dict], spec: MelSpec, thinker_dir: str) -> None:
    """UserError naming the manifest line of the first conversation whose sequence would exceed the
    Thinker's max_seq_len (found at start-up: in training it would stop the run mid-way).

    The length is the one `OmniModel.training_sequence` builds, with the media's positions known
    before any encoder runs: the image's tokens (with object tokens, the most there can be), the
    audio's frames from the file's header (when frames reach the Thinker). Stage B's transcript,
    known only once the audio encoder has run, is not counted. Records that will be bad samples
    (an unreadable or over-long clip, a malformed conversation) are left to the loader, which
    skips and counts them."""
    limit, d = model.thinker.arch.max_seq_len, model.thinker.arch.d_model
    image_tokens = 1 + MAX_OBJECTS if model.objects else model.vision_encoder.num_tokens
    encoder = model.audio_encoder.arch
    for record in records:
        try:
            conversation = check_conversation(record["conversation"])
        except SampleError:
            continue
        media, sizes = Media(), {"image": 0, "audio": 0}
        if "image" in record:
            sizes["image"] = image_tokens + 2       # with <img> </img>
            media.image = torch.zeros(image_tokens, d, device=model.device)
        if "audio" in record:
            frames = math.ceil(audio_frames(record["audio"], spec) / encoder.downsample)
            if not 0 < frames <= encoder.max_positions:
                continue
            frames = frames if model.audio_frames else 0
            sizes["audio"] = frames + 2             # with <audio> </audio>
            media.audio = torch.zeros(frames, d, device=model.device)
        length = model.training_sequence(conversation, media)[0].shape[0]
        if length > limit:
            raise UserError(f"{record['_source']}: a conversation of {length} positions (image {sizes['image']}, "
                            f"audio {sizes['audio']}, text {length - sizes['image'] - sizes['audio']}) exceeds "
                            f"the Thinker's max_seq_len {limit} ({thinker_dir}): shorten it or leave it out")


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
        parts = load_omni_parts(cfg.thinker_dir, cfg.audio_enc_dir, cfg.vision_dir, rt.device)
        thinker, tokenizer, audio_enc, vision, reader = parts
        # The media must reach the encoders as they were trained: the config takes their sizes.
        inherit(cfg, "image_size", vision.image_size, cfg.vision_dir)
        inherit(cfg, "n_mels", audio_enc.arch.n_mels, cfg.audio_enc_dir)
        d = thinker.arch.d_model
        self.model = OmniModel(thinker, tokenizer, Projector(audio_enc.out_dim, d),
                               vision_projector(vision.out_dim, d, cfg.colour_apart, cfg.object_tokens),
                               audio_enc, vision, reader.requires_grad_(False) if cfg.audio_transcript else None,
                               audio_frames=cfg.audio_frames, objects=cfg.object_tokens)
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
        self.model.proj_a.requires_grad_(cfg.audio_frames)     # without frames it is never used

        # a clip longer than the audio encoder takes is a bad sample, like an unreadable one
        spec = MelSpec(n_mels=cfg.n_mels)
        kw = {"image_size": cfg.image_size, "spec": spec, "resize": cfg.image_resize, "strict": cfg.strict_data,
              "seed": cfg.seed, "max_pixels": cfg.max_image_pixels,
              "max_audio_seconds": longest_audio(audio_enc.arch, spec)}
        records = []
        if not self.evaluation_only:
            records = read_sft_manifest(cfg.train_manifest)
            if cfg.asr_manifest:
                records += auxiliary_records(cfg.asr_manifest, "audio", "text", ASR_PROMPT, "asr")
            if cfg.caption_manifest:
                records += auxiliary_records(cfg.caption_manifest, "image", "caption", CAPTION_PROMPT, "caption")
            share = cfg.recolour_share
            self.train_data = SFTDataset(records, **kw, recolour_share=share, augment=share > 0)
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
        topic where records name one ("image_colour", ...); word accuracy of captions."""
        indices = list(range(len(dataset)))
        if self.cfg.qa_eval_limit:
            indices = indices[:self.cfg.qa_eval_limit]
        counts = AnswerCounts([dataset.records[i] for i in indices])
        for i in indices[self.rt.rank::self.rt.world_size]:
            sample = dataset[(i, 0)]
            if sample is None or sample["kind"] not in SCORED or len(sample["conversation"]) != 2:
                continue
            question, expected = (t["content"] for t in sample["conversation"])
            limit = self.cfg.max_answer_tokens * (3 if sample["kind"] == "caption" else 1)
            with self.rt.autocast():
                ids = list(self.model.answer(question, sample["image"], sample["mel"], limit))
            counts.add(sample["kind"], sample["topic"], expected, self.model.tok.decode(ids))
        return counts.results(self.rt.sum)
