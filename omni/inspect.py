"""Describe a checkpoint without training or a GPU: `python -m omni.inspect PATH`.

PATH is a .pt file, an exported folder (model.safetensors) or a stage's checkpoint folder. Prints
the format (full / weights-only / legacy / export), weight keys with parameter counts, step,
best_val_loss, what training state it holds, and the config.
"""
from __future__ import annotations

import argparse
import json
import os

from omni import checkpoint as ckpt
from omni.cli import run_cli
from omni.config import UserError, read_json
from omni.loading import checkpoint_in, config_inside, read_export


def describe(path: str) -> dict:
    """A summary dictionary of the checkpoint or export at `path`."""
    export = os.path.join(path, ckpt.EXPORT_FILE) if os.path.isdir(path) else path
    if export.endswith(".safetensors") and os.path.isfile(export):
        from safetensors import safe_open
        tensors = read_export(export)       # first: a damaged file ends in one line naming it
        with safe_open(export, "pt") as f:
            meta = f.metadata() or {}
        config_path = os.path.join(os.path.dirname(export), "config.json")
        config = read_json(config_path) if os.path.isfile(config_path) else None
        return {"path": export, "format": "export", "step": meta.get("step"), "best_val_loss": None,
                "weights": count_by_key(tensors), "training_state": [], "config": config}
    if os.path.isdir(path):
        path = checkpoint_in(path)[0]
    obj = ckpt.load(path)
    kind = ckpt.kind_of(obj, path)
    if kind == "legacy":
        return {"path": path, "format": "legacy", "step": None, "best_val_loss": None,
                "weights": count_by_key(obj), "training_state": [], "config": None}
    weights = {}
    for key, sd in ckpt.weight_entries(obj, path).items():
        weights.update(count_by_key({f"{key}.{n}": t for n, t in sd.items()}))
    state = [k for k in ckpt.RESUME_KEYS if k in obj]
    return {"path": path, "format": "full" if kind == "full" else "weights-only", "step": obj.get(ckpt.STEP),
            "best_val_loss": obj.get(ckpt.BEST_VAL_LOSS), "weights": weights, "training_state": state,
            "config": config_inside(obj, path)}


def count_by_key(flat: dict) -> dict[str, int]:
    """Parameters per top-level name ("thinker.body..." counts under "thinker"); tied tensors once."""
    counts, seen = {}, set()
    for name, t in flat.items():
        key = name.split(".", 1)[0]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        counts[key] = counts.get(key, 0) + t.numel()
    return counts


def report(info: dict) -> str:
    lines = [f"path:           {info['path']}", f"format:         {info['format']}",
             f"step:           {info['step'] if info['step'] not in (None, '') else '-'}",
             f"best_val_loss:  {info['best_val_loss'] if info['best_val_loss'] is not None else '-'}",
             f"training state: {', '.join(info['training_state']) or 'none (inference only)'}",
             "parameters:"]
    lines += [f"  {key:<12} {n:>12,}" for key, n in info["weights"].items()]
    lines.append(f"  {'total':<12} {sum(info['weights'].values()):>12,}")
    lines.append("config:" + (" -" if info["config"] is None else ""))
    if info["config"] is not None:
        lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted(info["config"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Describe a checkpoint or an exported folder.")
    p.add_argument("path")
    args = p.parse_args(argv)
    if not os.path.exists(args.path):
        raise UserError(f"not found: {args.path}")
    print(report(describe(args.path)))
    return 0


if __name__ == "__main__":
    run_cli(main)
