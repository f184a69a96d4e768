"""Export a checkpoint for inference: `python -m omni.export --ckpt PATH --out DIR`.

DIR gets model.safetensors (the weights, names prefixed by their weight key, no optimizer state:
about a third of a full checkpoint), config.json (the stage's config) and, for the Thinker,
tokenizer.model. PATH is a .pt file or a stage's folder (its inference checkpoint: best, else
final, else newest step). An omni (stage E) checkpoint also exports the components it builds on
into DIR/thinker, DIR/audio_enc and DIR/vision, and its config.json points at them, so DIR is
self-contained. `infer.py` and `python -m omni.inspect` read export folders like checkpoint folders.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from omni import checkpoint as ckpt
from omni.config import UserError
from omni.inference import resolve_dir
from omni.stages import prefixes
from omni.training_utils import run_cli

COMPONENT_DIRS = {"thinker_dir": "thinker", "audio_enc_dir": "audio_enc", "vision_dir": "vision"}


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


def weight_tensors(obj) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat {"<key>.<name>": tensor} of a checkpoint's weights (a legacy state_dict keeps its names),
    and the aliases: safetensors refuses tensors sharing memory (tied embeddings), so each shared
    tensor is stored once and its other names are recorded as aliases of it."""
    if ckpt.kind_of(obj) == "legacy":
        flat = obj
    else:
        flat = {f"{key}.{name}": t for key, sd in obj.items() if key not in ckpt.NON_WEIGHT_KEYS
                for name, t in sd.items()}
    tensors, aliases, first_name = {}, {}, {}
    for name, t in flat.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if ident in first_name:
            aliases[name] = first_name[ident]
        else:
            first_name[ident] = name
            tensors[name] = t.detach().contiguous()
    return tensors, aliases


def export(source: str, out: str) -> list[str]:
    """Export `source` into `out`; returns the files written."""
    path, prefix = checkpoint_in(source)
    obj = ckpt.load(path)
    folder = os.path.dirname(path)
    config = obj.get("config") if ckpt.kind_of(obj) != "legacy" else None
    if config is None and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    if config is None:
        raise UserError(f"{path}: no config inside and no config.json beside it")
    os.makedirs(out, exist_ok=True)
    written = []
    if prefix == "omni":       # bring the components along, and point the config at them
        config = dict(config)
        for key, sub in COMPONENT_DIRS.items():
            written += export(resolve_dir(folder, config[key]), os.path.join(out, sub))
            config[key] = sub
    tensors, aliases = weight_tensors(obj)
    meta = {"prefix": prefix, "step": str(obj.get("step", "")), "source": os.path.abspath(path),
            "format": "omni-export-1", "aliases": json.dumps(aliases)}
    target = os.path.join(out, ckpt.EXPORT_FILE)
    save_file(tensors, target, metadata=meta)
    ckpt.write_json(os.path.join(out, "config.json"), config)
    written += [target, os.path.join(out, "config.json")]
    tokenizer = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.model"))
        written.append(os.path.join(out, "tokenizer.model"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint to safetensors for inference.")
    p.add_argument("--ckpt", required=True, help="a .pt checkpoint or a stage's checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write")
    args = p.parse_args(argv)
    for path in export(args.ckpt, args.out):
        print(f"{path}  ({os.path.getsize(path) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
