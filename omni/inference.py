"""Loading trained components for inference, from any checkpoint format the suite writes."""
from __future__ import annotations

import json
import os

import torch

from omni import checkpoint as ckpt
from omni.config import UserError
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer


def load_component(ckpt_dir: str, prefix: str, weight_keys: list[str], make_command: str):
    """(weights by key, config dict, path) of a stage's inference checkpoint in ckpt_dir."""
    path = ckpt.for_inference(ckpt_dir, prefix)
    if path is None:
        raise UserError(f"no {prefix} checkpoint in {ckpt_dir}: train one with `{make_command}`")
    obj = ckpt.load(path)
    weights = ckpt.weights_of(obj, weight_keys, path)
    config = obj.get("config") if ckpt.kind_of(obj) != "legacy" else None
    if config is None:
        config_path = os.path.join(ckpt_dir, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{path}: no config inside and no {config_path} beside it")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return weights, config, path


def load_thinker(ckpt_dir: str, device) -> tuple[Thinker, Tokenizer]:
    from omni.stages.text import TOKENIZER_FILE, TextStage
    weights, config, path = load_component(ckpt_dir, TextStage.prefix, ["model"], TextStage.make_command)
    model = Thinker(ThinkerArch.from_config(config))
    model.load_state_dict(weights["model"])
    return model.to(device).eval(), Tokenizer(os.path.join(ckpt_dir, TOKENIZER_FILE))


def generate_text(model: Thinker, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0, device="cpu"):
    """Yield pieces of decoded text as the tokens come (the prompt is not repeated)."""
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out, shown = [], ""
    for nxt in model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              eos_id=tokenizer.eos_id, generator=generator):
        if nxt.item() == tokenizer.eos_id:
            break
        out.append(nxt.item())
        text = tokenizer.decode(out)
        # Emit only the new suffix; SentencePiece may merge a leading space once the next piece comes.
        if text.startswith(shown):
            yield text[len(shown):]
            shown = text
