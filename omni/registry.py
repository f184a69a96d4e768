"""The six stages as data: who each one is, written once (no torch, no stage imports).

A `StageSpec` holds a stage's identity: its letter, the script that trains it, the module and class
that implement it, its checkpoint prefix, the weight keys its checkpoints hold, and its default
config. The trainer, the loaders, the pipeline, export, inspect, evaluate, the tests and the error
messages all read it here, so reading a prefix or a command never imports a stage.

    STAGES["D"].prefix          -> "talker"
    by_prefix("omni").letter    -> "E"
    spec.command                -> "python train_talker.py --config configs/talker_tiny.json"

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
    components: tuple[tuple[str, str], ...] = ()   # (config key of a folder, letter of the stage it loads)

    @property
    def command(self) -> str:
        """The command that trains this stage (error messages name it)."""
        return f"python {self.script} --config {self.config}"


STAGES: dict[str, StageSpec] = {s.letter: s for s in (
    StageSpec("A", "thinker", "train_text.py", "omni.stages.text", "TextStage", "configs/thinker_tiny.json",
              ("model",)),
    StageSpec("B", "audio_enc", "train_audio_enc.py", "omni.stages.audio_enc", "AudioEncStage",
              "configs/audio_enc_tiny.json", ("enc", "head")),
    # The caption decoder is saved when decoder_layers > 0; loading a ViT never needs it.
    StageSpec("C", "vision", "train_vision.py", "omni.stages.vision", "VisionStage", "configs/vision_tiny.json",
              ("vit", "img_proj", "text_proj", "text_embed"), optional_keys=("caption_decoder",)),
    StageSpec("D", "talker", "train_talker.py", "omni.stages.talker", "TalkerStage", "configs/talker_tiny.json",
              ("talker", "rvq")),
    # The encoders are saved only when SFT trains them (freeze_encoders false).
    StageSpec("E", "omni", "sft_omni.py", "omni.stages.omni_sft", "OmniSFTStage", "configs/omni_sft_tiny.json",
              ("thinker", "proj_a", "proj_v"), optional_keys=("audio_enc", "vision"),
              components=(("thinker_dir", "A"), ("audio_enc_dir", "B"), ("vision_dir", "C"))),
    StageSpec("F", "vocoder", "train_vocoder.py", "omni.stages.vocoder", "VocoderStage", "configs/vocoder_tiny.json",
              ("vocoder",)),
)}


def prefixes() -> list[str]:
    """Checkpoint prefixes of the stages, A to F."""
    return [s.prefix for s in STAGES.values()]


def by_prefix(prefix: str) -> StageSpec | None:
    return next((s for s in STAGES.values() if s.prefix == prefix), None)


def letter_of(prefix: str) -> str:
    """The stage letter of a checkpoint prefix ("thinker" -> "A"; "?" for none)."""
    spec = by_prefix(prefix)
    return spec.letter if spec else "?"
