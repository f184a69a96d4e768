"""The six stages as data: who each one is, written once (no torch, no stage imports).

A `StageSpec` holds a stage's identity and its contract with the rest of the suite: its letter,
the script that trains it, the module and class that implement it, its checkpoint prefix, the
weight keys its checkpoints hold, its default config, whether `parallel=fsdp` shards it, the splits
its validation scores, and the folders of other stages it reads (the models it is built from, and
those it only uses, such as Stage D's recogniser for its CER). The trainer, the loaders, the
pipeline, export, inspect, evaluate, the data preparation, the tests and the error messages all
read it here, so reading a prefix or a command never imports a stage.

    STAGES["D"].prefix          -> "talker"
    by_prefix("omni").letter    -> "E"
    spec.command                -> "python train_talker.py --config configs/talker_tiny.json"
    STAGES["D"].inputs          -> (("asr_ckpt_dir", "B"),)

`omni.stages.stage_class(letter)` imports a stage's class when a caller needs the stage itself.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    letter: str
    prefix: str                          # checkpoint file prefix: {prefix}_step_N.pt, {prefix}_best.pt, {prefix}.pt
    script: str                          # the entry point that trains it
    module: str                          # the module of its Stage class
    cls: str                             # the Stage class name
    config: str                          # its default (tiny) config
    weight_keys: tuple[str, ...]         # modules every checkpoint of the stage holds
    optional_keys: tuple[str, ...] = ()  # modules it holds only in some configs
    # (config key of a folder, letter of the stage whose model it is built from): required, checked
    # when its checkpoint loads, exported along with it
    components: tuple[tuple[str, str], ...] = ()
    # (config key of a folder, letter of the stage whose model it uses): optional ("" or a folder
    # without a model: it goes without), not part of its model
    reads: tuple[tuple[str, str], ...] = ()
    sharded: bool = False                # parallel=fsdp shards it (FSDP2); the others train with ddp
    splits: tuple[str, ...] = ("val",)   # what its validation scores: "val", and "test" ({split}_manifest keys)

    @property
    def command(self) -> str:
        """The command that trains this stage (error messages name it)."""
        return f"python {self.script} --config {self.config}"

    @property
    def default_save_dir(self) -> str:
        """The folder its default config trains into (where the stages that read it look by default)."""
        return f"checkpoints/{self.config.rsplit('/', 1)[-1].removesuffix('.json')}"

    @property
    def inputs(self) -> tuple[tuple[str, str], ...]:
        """Every (config key, letter) of another stage's folder it reads: components, then reads."""
        return self.components + self.reads


STAGES: dict[str, StageSpec] = {s.letter: s for s in (
    # The Thinker-sized stages, A and E, shard under FSDP; the small encoders and the Talker gain nothing.
    StageSpec("A", "thinker", "train_text.py", "omni.stages.text", "TextStage", "configs/thinker_tiny.json",
              ("model",), sharded=True),
    StageSpec("B", "audio_enc", "train_audio_enc.py", "omni.stages.audio_enc", "AudioEncStage",
              "configs/audio_enc_tiny.json", ("enc", "head"), splits=("val", "test")),
    # The caption decoder is saved when decoder_layers > 0; loading a ViT never needs it.
    StageSpec("C", "vision", "train_vision.py", "omni.stages.vision", "VisionStage", "configs/vision_tiny.json",
              ("vit", "img_proj", "text_proj", "text_embed"), optional_keys=("caption_decoder",),
              splits=("val", "test")),
    # Stage B's recogniser transcribes the Talker's speech for the CER metric, when there is one.
    StageSpec("D", "talker", "train_talker.py", "omni.stages.talker", "TalkerStage", "configs/talker_tiny.json",
              ("talker", "rvq"), reads=(("asr_ckpt_dir", "B"),)),
    # The encoders are saved only when SFT trains them (freeze_encoders false).
    StageSpec("E", "omni", "sft_omni.py", "omni.stages.omni_sft", "OmniSFTStage", "configs/omni_sft_tiny.json",
              ("thinker", "proj_a", "proj_v"), optional_keys=("audio_enc", "vision"),
              components=(("thinker_dir", "A"), ("audio_enc_dir", "B"), ("vision_dir", "C")),
              sharded=True, splits=("val", "test")),
    StageSpec("F", "vocoder", "train_vocoder.py", "omni.stages.vocoder", "VocoderStage", "configs/vocoder_tiny.json",
              ("vocoder",)),
)}


def prefixes() -> list[str]:
    """Checkpoint prefixes of the stages, A to F."""
    return [s.prefix for s in STAGES.values()]


def sharded() -> list[str]:
    """Letters of the stages parallel=fsdp shards."""
    return [s.letter for s in STAGES.values() if s.sharded]


def by_prefix(prefix: str) -> StageSpec | None:
    return next((s for s in STAGES.values() if s.prefix == prefix), None)


def letter_of(prefix: str) -> str:
    """The stage letter of a checkpoint prefix ("thinker" -> "A"; "?" for none)."""
    spec = by_prefix(prefix)
    return spec.letter if spec else "?"
