"""Score a checkpoint: `python -m omni.evaluate --ckpt PATH [--manifest FILE] [--set key=value ...]`.

Contract (docs/evaluate.md):
- PATH is a stage folder (its inference checkpoint: best, else final, else the newest step), a .pt
  file (full, weights-only, or a legacy state_dict with config.json beside it) or an export folder
  (`python -m omni.export`). The stage comes from the file name's prefix or the export's metadata.
- The stage is built from the checkpoint's own config, with FILE (when given) as its validation
  data and no test split, then the `--set` overrides, type-checked like a trainer's. Keys of the
  checkpoint's config this version does not know are ignored, as every loader does (omni/loading.py). Built with
  `evaluation_only`, it reads no training data. The weights are loaded, and the stage's own
  `evaluate()` runs through the training core's `validate()`: for the same checkpoint and split the
  figures are those training logged in metrics.jsonl (figures of the training data itself, such as
  stage A's unigram entropy, are left out).
- Nothing is written into the checkpoint's folder: the stage's save_dir is a temporary folder.
- stdout gets one JSON line (stage, checkpoint, format, step, manifest, then the metrics) and an
  aligned table (`--json`: the line only); the stage's progress notes go to stderr. Bad input
  (path, manifest, key) ends with one line `error: ...` and exit status 2.
- One process: it is not meant to be started under torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

from omni import checkpoint as ckpt
from omni.cli import run_cli
from omni.config import UserError, build_config, parse_override
from omni.export import COMPONENT_DIRS
from omni.loading import checkpoint_in, config_for, read_checkpoint, read_export, resolve_dir, stage_prefix_in
from omni.registry import letter_of, prefixes
from omni.runtime import setup_runtime, teardown
from omni.stages import stage_class
from omni.tokenizer import Tokenizer
from omni.train.loop import ResumeOptions, build_trainer, validate
from omni.train.state import load_weights

FORMATS = {"full": "full", "weights": "weights-only", "legacy": "legacy"}


@dataclass
class Source:
    """A checkpoint opened for evaluation: its weights (a checkpoint dictionary or flat tensors)
    and the config it was trained with."""
    path: str          # the file the weights come from
    folder: str        # where its sidecars (config.json, tokenizer.model, component folders) are
    prefix: str
    format: str        # full | weights-only | legacy | export
    step: int | None
    weights: dict
    config: dict


def open_checkpoint(target: str) -> Source:
    """The weights, config and stage of an export folder, a stage folder or a .pt file."""
    export = os.path.join(target, ckpt.EXPORT_FILE)
    if os.path.isdir(target) and os.path.isfile(export):
        from safetensors import safe_open
        prefix = stage_prefix_in(target)            # first: a damaged file gets a clear line
        with safe_open(export, "pt") as f:
            step = (f.metadata() or {}).get("step", "")
        path, fmt, step = export, "export", int(step) if step.isdigit() else None
        check_prefix(path, prefix)
        weights, config = read_export(export), config_for(export, None, prefix)
    else:
        check_prefix(*checkpoint_in(target))       # before loading: a stray file gets a clear line
        weights, config, path, prefix = read_checkpoint(target)
        fmt = FORMATS[ckpt.kind_of(weights)]
        step = weights.get("step") if fmt != "legacy" else None
    return Source(path, os.path.dirname(path), prefix, fmt, step, weights, config)


def check_prefix(path: str, prefix: str | None) -> None:
    if prefix not in prefixes():
        raise UserError(f"{path}: cannot tell which stage it belongs to (a checkpoint's name starts with "
                        f"one of {', '.join(prefixes())}; an export names it in its metadata)")


def stage_config(source: Source, stage_cls, manifest: str | None, overrides, save_dir: str):
    """The stage's typed config: the checkpoint's, pointed at its sidecars and at `manifest`, with
    the overrides on top (they win)."""
    values = dict(source.config, save_dir=save_dir)
    if manifest is not None:
        values[stage_cls.val_key] = manifest
        if "test_manifest" in values:       # score the given manifest only
            values["test_manifest"] = ""
    if "tokenizer_model" in values:         # stage A: the tokenizer beside the weights, copied to save_dir
        values["tokenizer_model"] = os.path.join(source.folder, ckpt.TOKENIZER_FILE)
        if os.path.isfile(values["tokenizer_model"]):   # a damaged one is named here, not as its copy
            Tokenizer(values["tokenizer_model"])
    for key in COMPONENT_DIRS:              # stage E: an export's component subfolders
        if key in values:
            values[key] = resolve_dir(source.folder, values[key])
    cls = stage_cls.config_class
    try:                # the checkpoint's own values first, so that an error in them names its file
        build_config(cls, values, source=source.path, ignore_unknown=True)
    except UserError as e:
        raise UserError(f"{source.path}: {e}") from None
    for text in overrides:
        key, value = parse_override(text, cls)
        values[key] = value
    return build_config(cls, values, source=source.path, ignore_unknown=True)


def evaluate(target: str, manifest: str | None = None, overrides=()) -> dict:
    """The evaluation record of the checkpoint at `target`: identification, then the metrics."""
    if manifest is not None and not os.path.isfile(manifest):
        raise UserError(f"--manifest: file not found: {manifest}")
    source = open_checkpoint(target)
    letter = letter_of(source.prefix)
    stage_cls = stage_class(letter)
    with tempfile.TemporaryDirectory(prefix="omni-evaluate-") as save_dir:
        cfg = stage_config(source, stage_cls, manifest, overrides, save_dir)
        rt = setup_runtime(cfg)
        try:
            # The stage's notes are progress, not results: stdout carries only the record.
            with contextlib.redirect_stdout(sys.stderr):
                trainer = build_trainer(stage_cls(cfg, rt, evaluation_only=True), ResumeOptions(resume=False))
                load_weights(trainer.stage, source.weights, source.path)
                metrics = validate(trainer)
        finally:
            teardown(rt)
    return {"stage": letter, "checkpoint": source.path, "format": source.format, "step": source.step,
            "manifest": getattr(cfg, stage_cls.val_key), **metrics}


def json_line(record: dict) -> str:
    """The record as strict JSON (a non-finite number becomes null)."""
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps({k: clean(v) for k, v in record.items()})


def table(record: dict) -> str:
    width = max(len(k) for k in record)
    def shown(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        return "-" if v is None else str(v)
    return "\n".join(f"{k:<{width}}  {shown(v)}" for k, v in record.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Validation metrics of a checkpoint of any stage, on any manifest.")
    p.add_argument("--ckpt", required=True, help="a stage folder, a .pt file or an export folder")
    p.add_argument("--manifest", help="the data to score (the stage's validation key; default: the checkpoint's "
                                      "own validation split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (repeatable, type-checked)")
    p.add_argument("--json", action="store_true", help="print the JSON line only")
    args = p.parse_args(argv)
    record = evaluate(args.ckpt, args.manifest, args.set)
    print(json_line(record))
    if not args.json:
        print(table(record))
    return 0


if __name__ == "__main__":
    run_cli(main)
