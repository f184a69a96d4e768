"""Loading trained components for inference and for later stages, from any format the suite writes.

This layer knows the paths (a stage folder's best, final or newest step file; an export folder),
the formats (full, weights-only, legacy state_dict, model.safetensors) and the stages' identities
(omni/registry.py); it never imports a stage. The model files build networks from configs and
load nothing themselves.

  load_thinker(dir, device) -> (Thinker, Tokenizer)               Stage A
  load_asr(dir, device) -> ASR;  load_audio_encoder(dir, device)   Stage B
  load_clip(dir, device) -> CLIP;  load_vision_encoder(dir, device) Stage C
  load_speaker(dir, device, vocoder_dir) -> Speaker;  speak_to_file(...)   Stage D (+ F)
  load_vocoder(dir, device) -> NeuralVocoder                         Stage F
  load_omni(dir, device) -> (OmniModel, config);  build_omni        Stage E and what it builds on
  load_component(dir, spec) -> (weights by key, config, path)       any stage
  checkpoint_in / read_checkpoint / stage_prefix_in / read_export / resolve_dir: finding and reading files

Every config a loader reads (inside a checkpoint, or config.json beside it) is checked before a
network is built (`check_config`): bad JSON, a value of the wrong type or out of range, or a model
too large for this machine ends in one line naming the file and the key. Keys this version does not
know are ignored (a checkpoint may come from a newer version); the weights still have to fit.
"""
from __future__ import annotations

import json
import os
import sys

from omni import checkpoint as ckpt
from omni.audio_enc import ASR, AudioEncArch, AudioEncoder
from omni.codec import CodecArch, SpeechCodec
from omni.config import UserError, check_type, read_json
from omni.features import MelSpec
from omni.generation import Speaker, write_wav
from omni.omni_model import OmniModel, Projector
from omni.registry import STAGES, StageSpec, by_prefix, prefixes
from omni.talker import Talker, TalkerArch
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer
from omni.vision import CLIP, VisionArch, ViT
from omni.vocoder import REFINE_ITERS, GriffinLimVocoder, NeuralVocoder, Vocoder, VocoderArch

# The architectures of each stage's model (by checkpoint prefix); Stage E builds on the others'.
ARCHS = {STAGES["A"].prefix: (ThinkerArch,), STAGES["B"].prefix: (AudioEncArch,), STAGES["C"].prefix: (VisionArch,),
         STAGES["D"].prefix: (CodecArch, TalkerArch), STAGES["E"].prefix: (), STAGES["F"].prefix: (VocoderArch,)}
# The other config keys the loaders (and infer.py) read, and their types.
SETTINGS = {STAGES["D"].prefix: {"griffin_lim_iters": int}, STAGES["F"].prefix: {"refine_iters": int},
            STAGES["E"].prefix: {"image_size": int, "image_resize": str, "patch_merge": int, "transcribe": bool}}
# Stage E options that are gone, with the value a model trained under them had (none loads now).
REMOVED_OMNI_OPTIONS = {"colour_apart": True, "object_tokens": True, "audio_frames": False}


# ----------------------------------------------------------------------------- files and formats
def load_component(ckpt_dir: str, spec: StageSpec):
    """(weights by key, config dict, path) of a stage's inference checkpoint in ckpt_dir; the
    stage's optional weight keys are included where present. The config is checked (`check_config`)."""
    keys, optional = list(spec.weight_keys), spec.optional_keys
    export = os.path.join(ckpt_dir, ckpt.EXPORT_FILE)
    if os.path.isfile(export):
        path, obj = export, read_export(export)
    else:
        path = ckpt.for_inference(ckpt_dir, spec.prefix)
        if path is None:
            raise UserError(f"no {spec.prefix} checkpoint (stage {spec.letter}) in {ckpt_dir}: "
                            f"train one with `{spec.command}`")
        obj = ckpt.load(path)
    weights = ckpt.weights_of(obj, keys, path, optional)
    config = None if path == export else config_inside(obj, path)
    return weights, config_for(path, config, spec.prefix), path


def config_inside(obj, path: str) -> dict | None:
    """The config saved in a checkpoint dictionary; None for a legacy state_dict or a file without one."""
    if ckpt.kind_of(obj, path) == "legacy":
        return None
    config = obj.get(ckpt.CONFIG)
    if config is not None and not isinstance(config, dict):
        raise ckpt.CheckpointError(f"{path}: its '{ckpt.CONFIG}' entry is not a dictionary of config keys (it "
                                   f"holds a {type(config).__name__})")
    return config


def config_for(path: str, config: dict | None, prefix: str) -> dict:
    """The checked config of the checkpoint or export at `path`: `config` (from inside it), else the
    config.json beside it."""
    source = path
    if config is None:
        source = os.path.join(os.path.dirname(path), "config.json")
        if not os.path.isfile(source):
            raise UserError(f"{path}: no config inside and no {source} beside it")
        config = read_json(source)
    return check_config(config, prefix, source)


def check_config(config: dict, prefix: str, source: str) -> dict:
    """`config` once every architecture of the stage with checkpoint prefix `prefix` builds from it
    (types, ranges, cross-field rules, the model's size: Arch.from_config), the component folders it
    names (Stage E) are strings and its SETTINGS have their types; else UserError naming `source` and
    the key."""
    spec = by_prefix(prefix)
    for key, letter in spec.components if spec else ():
        if not isinstance(config.get(key), str) or not config[key]:
            raise UserError(f"{source}: config key '{key}': expected the folder of a stage {letter} model, "
                            f"got {config.get(key)!r}")
    for key, tp in SETTINGS.get(prefix, {}).items():
        try:
            if key in config:
                check_type(key, config[key], tp)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    for arch in ARCHS.get(prefix, ()):
        arch.from_config(config, source)
    return config


def read_export(path: str) -> dict:
    """The tensors of an exported model.safetensors, tied names restored (no pickle involved)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable export: {e}") from None
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    return tensors


def resolve_dir(base: str, path: str) -> str:
    """A component folder named in a config: relative to the folder of that config when it exists
    there (exports), else as given (relative to the working directory)."""
    inside = os.path.join(base, path)
    return inside if not os.path.isabs(path) and os.path.isdir(inside) else path


def stage_prefix_in(folder: str) -> str | None:
    """Which stage's model a folder holds: the prefix of its export, else of its first checkpoint."""
    export = os.path.join(folder, ckpt.EXPORT_FILE)
    if os.path.isfile(export):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(export, "pt") as f:
                return (f.metadata() or {}).get("prefix")
        except (SafetensorError, OSError) as e:
            raise ckpt.CheckpointError(f"{export}: unreadable export: {e}") from None
    return next((p for p in prefixes() if ckpt.for_inference(folder, p)), None)


def checkpoint_in(path: str) -> tuple[str, str]:
    """(checkpoint file, stage prefix) for a .pt file or a stage folder."""
    if os.path.isdir(path):
        for prefix in prefixes():
            found = ckpt.for_inference(path, prefix)
            if found:
                return found, prefix
        raise UserError(f"no checkpoint of any stage in {path}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    name = os.path.basename(path)
    for prefix in prefixes():
        if name == f"{prefix}.pt" or name.startswith(f"{prefix}_"):
            return path, prefix
    return path, os.path.splitext(name)[0].split("_step_")[0].removesuffix("_best")


def read_checkpoint(source: str) -> tuple[dict, dict, str, str]:
    """(checkpoint object, config, file, stage prefix); the config from inside the checkpoint, else
    from config.json beside it, checked (`check_config`), and every weight key a state_dict."""
    path, prefix = checkpoint_in(source)
    obj = ckpt.load(path)
    config = config_inside(obj, path)
    if ckpt.kind_of(obj) != "legacy":
        ckpt.weight_entries(obj, path)
    return obj, config_for(path, config, prefix), path, prefix


# ----------------------------------------------------------------------------- the stages' models
def load_thinker(ckpt_dir: str, device) -> tuple[Thinker, Tokenizer]:
    """The trained Thinker in eval mode and the tokenizer beside it."""
    weights, config, _ = load_component(ckpt_dir, STAGES["A"])
    model = Thinker(ThinkerArch.from_config(config))
    model.load_state_dict(weights["model"])
    return model.to(device).eval(), Tokenizer(os.path.join(ckpt_dir, ckpt.TOKENIZER_FILE))


def load_clip(ckpt_dir: str, device="cpu") -> CLIP:
    """The trained image and caption encoders in eval mode (any checkpoint format)."""
    weights, config, _ = load_component(ckpt_dir, STAGES["C"])
    model = CLIP(VisionArch.from_config(config))
    if "caption_decoder" not in weights:    # an export may leave it out: the SFT stage needs the ViT only
        model.caption_decoder = None
    for key, module in model.parts().items():
        module.load_state_dict(weights[key])
    return model.to(device).eval()


def load_vision_encoder(ckpt_dir: str, device="cpu") -> ViT:
    """The trained ViT in eval mode: images [B,3,S,S] in [-1,1] -> tokens [B, 1+N, out_dim]."""
    return load_clip(ckpt_dir, device).vit


def load_asr(ckpt_dir: str, device="cpu") -> ASR:
    """The trained encoder + CTC head in eval mode, ready for `transcribe`."""
    weights, config, _ = load_component(ckpt_dir, STAGES["B"])
    model = ASR(AudioEncArch.from_config(config))
    model.enc.load_state_dict(weights["enc"])
    model.head.load_state_dict(weights["head"])
    return model.to(device).eval()


def load_audio_encoder(ckpt_dir: str, device="cpu") -> AudioEncoder:
    """The trained audio encoder in eval mode (any checkpoint format; config from the checkpoint)."""
    return load_asr(ckpt_dir, device).enc


def load_vocoder(ckpt_dir: str, device="cpu") -> NeuralVocoder:
    """The trained Stage F vocoder in eval mode (any checkpoint format), a `Vocoder`."""
    weights, config, path = load_component(ckpt_dir, STAGES["F"])
    iters = config.get("refine_iters", REFINE_ITERS)
    if iters < 0:
        raise UserError(f"{path}: config key 'refine_iters': must be at least 0, got {iters}")
    model = NeuralVocoder(VocoderArch.from_config(config), refine_iters=iters)
    model.load_state_dict(weights["vocoder"])
    return model.to(device).eval()


def load_speaker(ckpt_dir: str, device="cpu", vocoder_dir: str | None = None) -> Speaker:
    """A Speaker from a Stage D checkpoint folder (best, else final, else newest step file). It speaks
    through the Stage F vocoder in vocoder_dir when that folder holds one, else through Griffin-Lim."""
    weights, config, _ = load_component(ckpt_dir, STAGES["D"])
    codec = SpeechCodec(CodecArch.from_config(config))
    codec.load_state_dict(weights["rvq"])
    talker = Talker(TalkerArch.from_config(config), codec.arch.n_codebooks, codec.arch.codebook_size)
    talker.load_state_dict(weights["talker"])
    vocoder: Vocoder | None = None
    if vocoder_dir and holds_model(vocoder_dir, STAGES["F"]):
        vocoder = load_vocoder(vocoder_dir, device)
    elif vocoder_dir:
        print(f"note: no {STAGES['F'].prefix} model (stage F) in {vocoder_dir}: speaking through Griffin-Lim",
              file=sys.stderr, flush=True)
    if vocoder is None:
        vocoder = GriffinLimVocoder(MelSpec(n_mels=codec.arch.n_mels), n_iter=config.get("griffin_lim_iters", 32))
    elif vocoder.arch.n_mels != codec.arch.n_mels:
        raise UserError(f"{vocoder_dir}: the vocoder reads {vocoder.arch.n_mels} mel bands, the codec in {ckpt_dir} "
                        f"writes {codec.arch.n_mels}")
    return Speaker(talker.to(device).eval(), codec.to(device).eval(), vocoder)


def holds_model(folder: str, spec: StageSpec) -> bool:
    """Whether folder holds an export or an inference checkpoint of the stage."""
    return os.path.isfile(os.path.join(folder, ckpt.EXPORT_FILE)) or ckpt.for_inference(folder, spec.prefix) is not None


def speak_to_file(text: str, path: str, talker_dir: str, device="cpu", temperature: float = 0.0,
                  seed: int = 0) -> float:
    """Speak text into a WAV file with the Talker in talker_dir; returns the duration in seconds."""
    speaker = load_speaker(talker_dir, device)
    wave = speaker.speak(text, temperature=temperature, seed=seed)
    write_wav(path, wave, speaker.sample_rate)
    return len(wave) / speaker.sample_rate


def build_omni(config: dict, thinker_dir: str, audio_enc_dir: str, vision_dir: str, device,
               source: str = "the config") -> OmniModel:
    """The omni model its Stage E config describes (patch_merge, transcribe), on the Thinker,
    audio encoder and vision encoder in the folders of stages A, B and C; its projectors new.
    Training (omni/stages/omni_sft.py) and loading (`load_omni`) both build it here."""
    for key, value in REMOVED_OMNI_OPTIONS.items():
        if config.get(key, not value) == value:
            raise UserError(f"{source}: config key {key!r}: {value} was a demo-world option that is gone "
                            f"(docs/stage_e_sft.md); retrain Stage E with `python sft_omni.py`")
    thinker, tokenizer = load_thinker(thinker_dir, device)
    audio_enc, vision = load_audio_encoder(audio_enc_dir, device), load_vision_encoder(vision_dir, device)
    merge, d = config.get("patch_merge", 1), thinker.arch.d_model
    return OmniModel(thinker, tokenizer, Projector(audio_enc.out_dim, d), Projector(vision.out_dim * merge * merge, d),
                     audio_enc, vision, patch_merge=merge, transcribe=config.get("transcribe", False))


def load_omni(ckpt_dir: str, device):
    """The Stage E model (Thinker, projectors, encoders) from a checkpoint or export folder, and
    its config. The components come from the folders its config names (inside an export: its
    subfolders); the Stage E weights replace the Thinker's."""
    # The encoders' weights are in the checkpoint only when SFT trained them (freeze_encoders false).
    spec = STAGES["E"]
    weights, config, _ = load_component(ckpt_dir, spec)
    dirs = [resolve_dir(ckpt_dir, config[key]) for key, _ in spec.components]
    model = build_omni(config, *dirs, device, source=ckpt_dir)
    parts = model.parts()
    for key, state in weights.items():
        parts[key].load_state_dict(state)
    return model.to(device).eval(), config
