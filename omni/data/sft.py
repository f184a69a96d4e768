"""SFT conversations, optionally with an image or a spoken question."""
from __future__ import annotations

from omni.data.audio import read_audio
from omni.features import LogMel, MelSpec
from omni.data.image import MAX_IMAGE_PIXELS, read_image
from omni.data.manifest import ManifestDataset, SampleError, read_manifest
from omni.data.recolour import drop_repainted, recolour

ROLES = ("user", "assistant")


def read_sft_manifest(path: str) -> list[dict]:
    return read_manifest(path, ["conversation"], optional=("image", "audio", "kind", "topic", "transcript"),
                         types={"conversation": list})


def longest_audio(arch, spec: MelSpec) -> float:
    """Seconds of the longest clip an audio encoder of `arch` (an AudioEncArch) takes: its rotary table
    holds max_positions frames after the `downsample` front end, and a clip of n samples gives
    n // hop + 1 mel frames, ceil(frames / downsample) after it. (4096 x 4 frames: 163.8 s.)"""
    return (arch.max_positions * arch.downsample - 1) * spec.hop / spec.sample_rate


def check_conversation(conversation) -> list[dict]:
    """The turns, validated: a non-empty list of {"role": user|assistant, "content": str} ending
    with an assistant answer."""
    if not isinstance(conversation, list) or not conversation:
        raise SampleError("conversation must be a non-empty list of turns")
    for turn in conversation:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise SampleError(f"bad turn {turn!r}: expected role user|assistant and content text")
    if conversation[-1]["role"] != "assistant" or not conversation[-1]["content"].strip():
        raise SampleError("conversation must end with a non-empty assistant answer")
    return conversation


class SFTDataset(ManifestDataset):
    """{"conversation", "kind", "topic" (or None), "image": [3,S,S] or None, "mel": [T, n_mels] or None}."""

    def __init__(self, records, image_size: int = 64, spec: MelSpec = MelSpec(), resize: str = "squash",
                 recolour_share: float = 0.0, max_pixels: int = MAX_IMAGE_PIXELS, max_audio_seconds: float = 0.0,
                 **kw):
        """Larger images than max_pixels and longer clips than max_audio_seconds (> 0; see
        `longest_audio`) are bad samples, found from the files' headers."""
        super().__init__(records, **kw)
        self.image_size, self.spec, self.resize = image_size, spec, resize
        self.max_pixels, self.max_audio_seconds = max_pixels, max_audio_seconds
        self.recolour_share = recolour_share    # demo world only (omni/data/recolour.py); needs augment
        self.logmel = LogMel(spec)

    def load(self, record, generator):
        sample = {"conversation": check_conversation(record["conversation"]),
                  "kind": record.get("kind", "text"), "topic": record.get("topic"), "image": None, "mel": None}
        if "image" in record:
            sample["image"] = read_image(record["image"], self.image_size, self.resize, self.max_pixels)
            if generator is not None and self.recolour_share:
                self.recolour(sample, generator)
        if "audio" in record:
            sample["mel"] = self.logmel(read_audio(record["audio"], self.spec.sample_rate, self.max_audio_seconds))
        return sample

    def recolour(self, sample: dict, generator) -> None:
        """Repaint objects off-palette and keep the turns still true (omni/data/recolour.py); a sample left
        with no turn, or whose turns do not alternate user/assistant, keeps its image."""
        turns = sample["conversation"]
        if [t["role"] for t in turns] != list(ROLES) * (len(turns) // 2):
            return
        image, removed = recolour(sample["image"], generator, self.recolour_share)
        kept = drop_repainted(turns, removed) if removed else turns
        if kept:
            sample["image"], sample["conversation"] = image, kept
