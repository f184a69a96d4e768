"""The five stages, by letter: script, module and class (imported only when needed)."""
from __future__ import annotations

import importlib

STAGES = {
    "A": ("train_text.py", "omni.stages.text", "TextStage"),
    "B": ("train_audio_enc.py", "omni.stages.audio_enc", "AudioEncStage"),
    "C": ("train_vision.py", "omni.stages.vision", "VisionStage"),
    "D": ("train_talker.py", "omni.stages.talker", "TalkerStage"),
    "E": ("sft_omni.py", "omni.stages.omni_sft", "OmniSFTStage"),
}


def stage_class(letter: str):
    _, module, name = STAGES[letter]
    return getattr(importlib.import_module(module), name)


def prefixes() -> list[str]:
    """Checkpoint prefixes of the stages, A to E."""
    return [stage_class(letter).prefix for letter in STAGES]


def letter_of(prefix: str) -> str:
    """The stage letter of a checkpoint prefix ("thinker" -> "A")."""
    return next((letter for letter in STAGES if stage_class(letter).prefix == prefix), "?")
