"""Export a checkpoint: `python -m omni.export --ckpt PATH --out DIR [--format omni|pt|hf|gguf] [--dtype f32|f16]`.

PATH is a .pt file or a stage's folder (its inference checkpoint: best, else final, else newest
step). DIR receives, by format:

  omni (default)  model.safetensors (the weights, names prefixed by their weight key, no optimizer
                  state: about a third of a full checkpoint), config.json (the stage's config) and,
                  for the Thinker, tokenizer.model.
  pt              {prefix}.pt: the checkpoint dictionary without optimizer, scheduler, scaler, RNG and
                  data position (checkpoint.slim), beside config.json and tokenizer.model.
  hf              the Thinker (Stage A, or the one inside Stage E) as a transformers LlamaForCausalLM
                  folder; see omni/export_llama.py.
  gguf            the Thinker as DIR/thinker-{dtype}.gguf for llama.cpp; see omni/export_llama.py.

An omni (stage E) checkpoint exported as omni or pt also exports the components it builds on into
DIR/thinker, DIR/audio_enc and DIR/vision, and its config points at them, so DIR is self-contained.
`infer.py`, `--init_from` and `python -m omni.inspect` read omni and pt exports like checkpoint folders.

An export is written into a hidden temporary folder beside DIR (`.DIR.tmp`; for gguf, beside its
file) and renamed into place, the previous export set aside and deleted after: one cut off at any
instant leaves the old export whole or the new one, never a mix. omni, pt and hf replace DIR whole,
so they refuse a DIR that holds anything an export does not write.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from omni import checkpoint as ckpt
from omni import export_llama
from omni.cli import run_cli
from omni.config import UserError
from omni.loading import load_component, read_checkpoint, resolve_dir
from omni.registry import STAGES, letter_of
from omni.thinker import ThinkerArch
from omni.tokenizer import Tokenizer

# Stage E's component folders (config key -> subfolder of the export, named by the component's prefix)
COMPONENT_DIRS = {key: STAGES[letter].prefix for key, letter in STAGES["E"].components}
FORMATS = ("omni", "pt", "hf", "gguf")
# Every name an omni, pt or hf export writes in its folder (a gguf is one file in a folder of any kind)
EXPORT_NAMES = frozenset({ckpt.EXPORT_FILE, "config.json", ckpt.TOKENIZER_FILE, "tokenizer.json",
                          "tokenizer_config.json", *COMPONENT_DIRS.values(),
                          *(f"{s.prefix}.pt" for s in STAGES.values())})


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


def export(source: str, out: str, fmt: str = "omni", dtype: str = "f32") -> list[str]:
    """Export `source` into `out` in format `fmt`; returns the files written.

    Every format is written whole or not at all: into a hidden temporary folder (or file, for gguf)
    beside its target, then renamed into place (`ckpt.publish`), so an export cut off at any instant
    leaves the previous export whole, or the new one. omni, pt and hf replace the folder `out`
    whole (`check_replaceable`); gguf replaces its one file in `out`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if dtype != "f32" and fmt not in ("hf", "gguf"):
        raise UserError(f"--dtype {dtype}: only --format hf and gguf convert weights; {fmt} keeps them as trained")
    obj, config, path, prefix = read_checkpoint(source)
    if fmt in ("hf", "gguf"):
        return export_thinker(obj, config, path, prefix, out, fmt, dtype)
    check_replaceable(out)
    return ckpt.publish(out, lambda tmp: write_suite(obj, config, path, prefix, tmp, fmt))


def check_replaceable(out: str) -> None:
    """A folder export replaces `out` whole: refuse one that holds anything an export does not write
    (a checkpoint folder, another format's files), which would be lost."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a folder")
    foreign = sorted(set(os.listdir(out)) - EXPORT_NAMES) if os.path.isdir(out) else []
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"--out {out}: holds {', '.join(foreign[:3])}{more}, which an export does not write; an "
                        "export replaces its folder whole: choose a new or empty folder")


def write_suite(obj, config: dict, path: str, prefix: str, out: str, fmt: str) -> list[str]:
    """Write the omni or pt export of a checkpoint (read by read_checkpoint from `path`) into `out`."""
    folder = os.path.dirname(path)
    os.makedirs(out, exist_ok=True)
    written = []
    if prefix == STAGES["E"].prefix:       # bring the components along, and point the config at them
        config = dict(config)
        for key, sub in COMPONENT_DIRS.items():
            written += write_suite(*read_checkpoint(resolve_dir(folder, config[key])), os.path.join(out, sub), fmt)
            config[key] = sub
    if fmt == "pt":
        target = os.path.join(out, f"{prefix}.pt")
        slim = ckpt.slim(obj)
        ckpt.save(target, slim if ckpt.kind_of(obj) == "legacy" else {**slim, "config": config})
    else:
        tensors, aliases = weight_tensors(obj)
        meta = {"prefix": prefix, "step": str(obj.get("step", "")), "source": os.path.abspath(path),
                "format": "omni-export-1", "aliases": json.dumps(aliases)}
        target = os.path.join(out, ckpt.EXPORT_FILE)
        export_llama.save_safetensors(tensors, target, meta)
    ckpt.write_json(os.path.join(out, "config.json"), config)
    written += [target, os.path.join(out, "config.json")]
    tokenizer = os.path.join(folder, ckpt.TOKENIZER_FILE)
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out, ckpt.TOKENIZER_FILE))
        written.append(os.path.join(out, ckpt.TOKENIZER_FILE))
    return written


def export_thinker(obj, config: dict, path: str, prefix: str, out: str, fmt: str, dtype: str) -> list[str]:
    """The Thinker of a Stage A or Stage E checkpoint as a Llama (hf folder or gguf file)."""
    text, sft = STAGES["A"], STAGES["E"]
    if prefix == text.prefix:
        weights, thinker_dir = ckpt.weights_of(obj, list(text.weight_keys), path)["model"], os.path.dirname(path)
    elif prefix == sft.prefix:
        weights = ckpt.weights_of(obj, list(sft.weight_keys), path, sft.optional_keys)["thinker"]
        thinker_dir = resolve_dir(os.path.dirname(path), config["thinker_dir"])
        # Stage E keeps the Thinker's architecture and tokenizer in the Stage A folder it started from.
        config = load_component(thinker_dir, text)[1]
    else:
        raise UserError(f"{path} is a stage {letter_of(prefix)} ({prefix}) checkpoint: --format {fmt} exports "
                        f"the Thinker, from a stage A (thinker) or stage E (omni) checkpoint")
    tokenizer = os.path.join(thinker_dir, ckpt.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer):
        raise UserError(f"tokenizer not found: {tokenizer} (the Thinker's folder holds it)")
    Tokenizer(tokenizer)        # a damaged one ends in one line naming it, before anything is written
    arch = ThinkerArch.from_config(config)
    if fmt == "hf":
        check_replaceable(out)
        return ckpt.publish(out, lambda tmp: export_llama.write_hf(weights, arch, tokenizer, tmp, dtype))
    return ckpt.publish(os.path.join(out, f"thinker-{dtype}.gguf"),
                        lambda tmp: [export_llama.write_gguf(weights, arch, tokenizer, tmp, dtype)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a checkpoint for inference: the suite's safetensors (omni), a "
                                "weights-only .pt, or the Thinker for transformers (hf) or llama.cpp (gguf).")
    p.add_argument("--ckpt", required=True, help="a .pt checkpoint or a stage's checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", default="omni", choices=FORMATS, help="what to write (default: omni)")
    p.add_argument("--dtype", default="f32", choices=("f32", "f16"), help="weight precision for hf and gguf")
    args = p.parse_args(argv)
    for path in export(args.ckpt, args.out, args.format, args.dtype):
        print(f"{path}  ({os.path.getsize(path) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
