"""SFT conversations, optionally with an image or a spoken question."""
from __future__ import annotations

from omni.data.audio import read_audio
from omni.features import LogMel, MelSpec
from omni.data.image import MAX_IMAGE_PIXELS, read_image
from omni.data.manifest import ManifestDataset, SampleError, read_manifest

ROLES = ("user", "assistant")


def read_sft_manifest(path: str) -> list[dict]:
    return read_manifest(path, ["conversation"], optional=("image", "audio", "kind", "topic", "transcript"),
                         types={"conversation": list})


def longest_audio(arch, spec: MelSpec) -> float:
    """Seconds of the longest clip an audio encoder of `arch` (an AudioEncArch) takes: its rotary table
    holds max_positions frames after the `downsample` front end, and a clip of n samples gives
    n // hop + 1 mel frames, ceil(frames / downsample) after it. (4096 x 4 frames: 163.8 s.)"""
    return (arch.max_positions * arch.downsample - 1) * spec.hop / spec.sample_rate


def check_conversation(conversation, listening: bool = False) -> list[dict]:
    """The turns, validated: a non-empty list of {"role": user|assistant, "content": str} ending
    with an assistant answer; with `listening` (a spoken record with its transcript) it may be empty."""
    if listening and conversation == []:
        return conversation
    if not isinstance(conversation, list) or not conversation:
        raise SampleError("conversation must be a non-empty list of turns")
    for turn in conversation:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise SampleError(f"bad turn {turn!r}: expected role user|assistant and content text")
    if conversation[-1]["role"] != "assistant" or not conversation[-1]["content"].strip():
        raise SampleError("conversation must end with a non-empty assistant answer")
    return conversation


class SFTDataset(ManifestDataset):
    """{"conversation", "kind", "topic" (or None), "transcript" (or None), "image": [3,S,S] or None,
    "mel": [T, n_mels] or None}. A record with audio and a transcript may have no turns: with
    `transcribe` (Stage E's chain of modality) it trains listening only; without, it is a bad sample."""

    def __init__(self, records, image_size: int = 64, spec: MelSpec = MelSpec(), resize: str = "squash",
                 max_pixels: int = MAX_IMAGE_PIXELS, max_audio_seconds: float = 0.0,
                 transcribe: bool = False, **kw):
        """Larger images than max_pixels and longer clips than max_audio_seconds (> 0; see
        `longest_audio`) are bad samples, found from the files' headers."""
        super().__init__(records, **kw)
        self.image_size, self.spec, self.resize = image_size, spec, resize
        self.max_pixels, self.max_audio_seconds = max_pixels, max_audio_seconds
        self.transcribe = transcribe    # spoken records need a transcript
        self.logmel = LogMel(spec)

    def load(self, record, generator):
        transcript = record.get("transcript")
        if transcript is not None and (not isinstance(transcript, str) or not transcript.strip()):
            raise SampleError("transcript must be non-empty text")
        if self.transcribe and "audio" in record and transcript is None:
            raise SampleError("a spoken record without a transcript (transcribe: the Thinker learns to write it)")
        listening = self.transcribe and "audio" in record
        sample = {"conversation": check_conversation(record["conversation"], listening),
                  "kind": record.get("kind", "text"), "topic": record.get("topic"), "transcript": transcript,
                  "image": None, "mel": None}
        if "image" in record:
            sample["image"] = read_image(record["image"], self.image_size, self.resize, self.max_pixels)
        if "audio" in record:
            sample["mel"] = self.logmel(read_audio(record["audio"], self.spec.sample_rate, self.max_audio_seconds))
        return sample
