"""Loading trained components for inference, from any checkpoint format the suite writes."""
from __future__ import annotations

import json
import os

import torch

from omni import checkpoint as ckpt
from omni.config import UserError
from omni.registry import STAGES, StageSpec, prefixes
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer


def load_component(ckpt_dir: str, spec: StageSpec):
    """(weights by key, config dict, path) of a stage's inference checkpoint in ckpt_dir; the
    stage's optional weight keys are included where present."""
    keys, optional = list(spec.weight_keys), spec.optional_keys
    export = os.path.join(ckpt_dir, ckpt.EXPORT_FILE)
    if os.path.isfile(export):
        path, config = export, None
        weights = ckpt.weights_of(read_export(export), keys, export, optional)
    else:
        path = ckpt.for_inference(ckpt_dir, spec.prefix)
        if path is None:
            raise UserError(f"no {spec.prefix} checkpoint (stage {spec.letter}) in {ckpt_dir}: "
                            f"train one with `{spec.command}`")
        obj = ckpt.load(path)
        weights = ckpt.weights_of(obj, keys, path, optional)
        config = obj.get("config") if ckpt.kind_of(obj) != "legacy" else None
    if config is None:
        config_path = os.path.join(ckpt_dir, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path}: no config inside and no {config_path} beside it")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return weights, config, path


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


def load_thinker(ckpt_dir: str, device) -> tuple[Thinker, Tokenizer]:
    from omni.stages.text import TOKENIZER_FILE
    weights, config, path = load_component(ckpt_dir, STAGES["A"])
    model = Thinker(ThinkerArch.from_config(config))
    model.load_state_dict(weights["model"])
    return model.to(device).eval(), Tokenizer(os.path.join(ckpt_dir, TOKENIZER_FILE))


def stream_text(token_ids, tokenizer: Tokenizer):
    """Yield pieces of decoded text as token ids come from an iterator (stops at </s>)."""
    out, shown = [], ""
    for tid in token_ids:
        tid = int(tid)
        if tid == tokenizer.eos_id:
            break
        out.append(tid)
        text = tokenizer.decode(out)
        # Emit only the new suffix; SentencePiece may merge a leading space once the next piece comes.
        if text.startswith(shown):
            yield text[len(shown):]
            shown = text


def generate_text(model: Thinker, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0, device="cpu"):
    """Yield the Thinker's continuation of a plain-text prompt, piece by piece."""
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return stream_text(model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      eos_id=tokenizer.eos_id, generator=generator), tokenizer)


def load_omni_parts(thinker_dir: str, audio_enc_dir: str, vision_dir: str, device):
    """(Thinker, tokenizer, audio encoder, vision encoder) from the folders of stages A, B, C."""
    from omni.audio_enc import load_audio_encoder
    from omni.vision import load_vision_encoder
    thinker, tokenizer = load_thinker(thinker_dir, device)
    return thinker, tokenizer, load_audio_encoder(audio_enc_dir, device), load_vision_encoder(vision_dir, device)


def stage_prefix_in(folder: str) -> str | None:
    """Which stage's model a folder holds: the prefix of its export, else of its first checkpoint."""
    export = os.path.join(folder, ckpt.EXPORT_FILE)
    if os.path.isfile(export):
        from safetensors import safe_open
        with safe_open(export, "pt") as f:
            return (f.metadata() or {}).get("prefix")
    return next((p for p in prefixes() if ckpt.for_inference(folder, p)), None)


def load_omni(ckpt_dir: str, device):
    """The Stage E model (Thinker, projectors, encoders) from a checkpoint or export folder, and
    its config. The components come from the folders its config names (inside an export: its
    subfolders); the Stage E weights replace the Thinker's."""
    from omni.omni_model import OmniModel, Projector
    # The encoders' weights are in the checkpoint only when SFT trained them (freeze_encoders false).
    spec = STAGES["E"]
    weights, config, _ = load_component(ckpt_dir, spec)
    dirs = [resolve_dir(ckpt_dir, config[key]) for key, _ in spec.components]
    thinker, tokenizer, audio_enc, vision = load_omni_parts(*dirs, device)
    d = thinker.arch.d_model
    model = OmniModel(thinker, tokenizer, Projector(audio_enc.out_dim, d), Projector(vision.out_dim, d),
                      audio_enc, vision)
    attrs = {"thinker": "thinker", "proj_a": "proj_a", "proj_v": "proj_v", "audio_enc": "audio_encoder",
             "vision": "vision_encoder"}
    for key, state in weights.items():
        getattr(model, attrs[key]).load_state_dict(state)
    return model.to(device).eval(), config
