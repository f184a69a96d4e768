"""What a resumed run does with a config key whose value differs from the checkpoint's config.

Every TrainConfig key is in exactly one of three classes (tests/system/test_faults.py fails on a new
key that is in none):
  SCHEDULE  applied: the lr, weight decay, AdamW settings and warmup-cosine schedule are rebuilt
            from the new config at the resumed step (the restored optimizer and scheduler state
            would otherwise keep the old values without a word).
  REFUSED   the order of the training data derives from them, so the data position cannot be
            kept exact: the run stops with one line naming the key and the ways out.
  APPLIED   nothing saved depends on them; they take effect as they are. grad_accum_steps is
            here because the data position is counted in batches, not steps, and stays exact.
A stage's own keys are applied, except two kinds, refused like REFUSED:
  architecture keys  the fields of the stage config's Arch bases (ThinkerArch, ...: `arch_keys`, read
            from the class): the weights were trained as that model. Some changes alter no shape
            (n_heads, n_kv_heads, rope_theta, a charset of the same length) and would reinterpret
            the weights without a word.
  TOKENIZER the tokenizer a run made at its first start stays in save_dir; these keys would no
            longer describe it.
Any other change is named in the resume log line. The way out of a refusal is --init_from: a new run
from the checkpoint's weights with the new config (its weights must still fit the new shapes).
"""
from __future__ import annotations

import dataclasses

from omni.config import Arch, TrainConfig, UserError, config_dict

SCHEDULE = frozenset({"lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay",
                      "adam_beta1", "adam_beta2", "adamw_impl"})
REFUSED = frozenset({"batch_size", "seed"})
APPLIED = frozenset({"device", "amp", "compile", "grad_accum_steps", "grad_clip", "eval_interval",
                     "eval_batches", "early_stop_steps", "checkpoint_freq", "keep_last_n", "archive_every",
                     "log_interval", "log_to",
                     "max_nonfinite_steps", "size",
                     "save_dir", "num_workers", "cpu_threads", "strict_data", "demo_dir", "demo_size", "progress",
                     "parallel"})


TOKENIZER = frozenset({"tokenizer_model", "tokenizer_sample_bytes"})     # Stage A (omni/stages/text.py)

WHY_DATA_ORDER = "the order of the training data depends on it, so the run cannot resume exactly"
WHY_ARCH = "it is an architecture key, so the saved weights would be read as another model"
WHY_TOKENIZER = "the run keeps the tokenizer.model it made at its first start, which this key no longer describes"


class Changes(dict):
    """key -> (value in the checkpoint, value now); `refused` maps each key that cannot change on resume
    to why (filled by config_changes, which knows the config's class)."""
    refused: dict[str, str]


def arch_keys(cls) -> frozenset[str]:
    """The architecture keys of a stage config class: the fields of its Arch bases (none for a stage that
    builds its model from other checkpoints, Stage E)."""
    return frozenset(f.name for base in cls.__mro__ if issubclass(base, Arch) and not issubclass(base, TrainConfig)
                     and dataclasses.is_dataclass(base) for f in dataclasses.fields(base))


def config_changes(saved: dict, cfg) -> Changes:
    """key -> (value in the checkpoint, value now), for every key both hold with different values."""
    changes = Changes({key: (saved[key], value) for key, value in config_dict(cfg).items()
                       if key in saved and saved[key] != value})
    whys = {**dict.fromkeys(TOKENIZER, WHY_TOKENIZER), **dict.fromkeys(arch_keys(type(cfg)), WHY_ARCH),
            **dict.fromkeys(REFUSED, WHY_DATA_ORDER)}
    changes.refused = {key: whys[key] for key in changes if key in whys}
    return changes


def refuse_data_order_changes(changes: Changes, source: str) -> None:
    """UserError naming the first key (by name) that cannot change on resume (data order, architecture,
    tokenizer), its old and new values, and the ways out."""
    for key in sorted(changes.refused):
        old, new = (_short(v) for v in changes[key])
        raise UserError(f"config key '{key}' differs from {source} ({old} -> {new}): {changes.refused[key]}; "
                        f"set it back to {old}, or start a new run from these weights with --init_from {source}")


def _short(value, limit: int = 60) -> str:
    """repr of a value, cut to `limit` characters (a vocabulary or a character set can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(changes: dict[str, tuple], step: int) -> str:
    text = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changes.items()))
    if changes.keys() & SCHEDULE:
        text += f" (lr schedule rebuilt from the new config at step {step})"
    return text
