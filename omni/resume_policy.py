"""What a resumed run does with a config key whose value differs from the checkpoint's config.

Every TrainConfig key is in exactly one of three classes (tests/test_faults.py fails on a new
key that is in none):
  SCHEDULE  applied: the lr, weight decay, AdamW settings and warmup-cosine schedule are rebuilt
            from the new config at the resumed step (the restored optimizer and scheduler state
            would otherwise keep the old values without a word).
  REFUSED   the order of the training data derives from them, so the data position cannot be
            kept exact: the run stops with one line naming the key and the ways out.
  APPLIED   nothing saved depends on them; they take effect as they are. grad_accum_steps is
            here because the data position is counted in batches, not steps, and stays exact.
A stage's own keys are applied: architecture keys are checked by the weights themselves
("weights ... do not fit this config"); any other change is named in the resume log line.
"""
from __future__ import annotations

from omni.config import UserError, config_dict

SCHEDULE = frozenset({"lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay",
                      "adam_beta1", "adam_beta2", "adamw_impl"})
REFUSED = frozenset({"batch_size", "seed"})
APPLIED = frozenset({"device", "amp", "compile", "grad_accum_steps", "grad_clip", "eval_interval",
                     "eval_batches", "early_stop_steps", "checkpoint_freq", "keep_last_n", "archive_every",
                     "log_interval", "log_to",
                     "save_dir", "num_workers", "cpu_threads", "strict_data", "demo_dir", "demo_size", "progress",
                     "parallel"})


def config_changes(saved: dict, cfg) -> dict[str, tuple]:
    """key -> (value in the checkpoint, value now), for every key both hold with different values."""
    return {key: (saved[key], value) for key, value in config_dict(cfg).items()
            if key in saved and saved[key] != value}


def refuse_data_order_changes(changes: dict[str, tuple], source: str) -> None:
    for key in sorted(changes.keys() & REFUSED):
        old, new = changes[key]
        raise UserError(f"config key '{key}' differs from {source} ({old!r} -> {new!r}): the order of the "
                        f"training data depends on it, so the run cannot resume exactly; set it back to "
                        f"{old!r}, or start a new run from these weights with --init_from {source}")


def describe(changes: dict[str, tuple], step: int) -> str:
    text = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changes.items()))
    if changes.keys() & SCHEDULE:
        text += f" (lr schedule rebuilt from the new config at step {step})"
    return text
