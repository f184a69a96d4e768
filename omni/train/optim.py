"""The optimizer and the learning-rate schedule: AdamW without decay on gains and biases, and a
linear warmup into a cosine decay to lr * min_lr_ratio at max_steps."""
from __future__ import annotations

import math

import torch

# adamw_impl -> AdamW keyword arguments. "auto" lets torch choose (a foreach kernel on CUDA, a loop on
# the CPU), as the suite always did; "fused" is one kernel per step (CUDA and CPU).
ADAMW_IMPLS = {"auto": {"foreach": None, "fused": False}, "foreach": {"foreach": True, "fused": False},
               "fused": {"foreach": None, "fused": True}, "loop": {"foreach": False, "fused": False}}


def warmup_cosine(cfg):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def adamw_options(cfg) -> dict:
    """The AdamW settings of a config besides lr and weight decay."""
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2), **ADAMW_IMPLS[cfg.adamw_impl]}


def make_optimizer(params, cfg) -> torch.optim.AdamW:
    # No weight decay on gains and biases (1-D tensors): decaying them only hurts.
    decay = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, **adamw_options(cfg))


def make_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))


def rebuild_schedule(optimizer, scheduler, cfg) -> None:
    """Learning rates, weight decay and AdamW settings from this config at the restored step. A
    restored optimizer and scheduler hold the old run's values; unchanged keys give back the very
    same ones (the scheduler computes lr the same way: base_lr * factor(step))."""
    factor, groups = warmup_cosine(cfg), optimizer.param_groups
    scheduler.base_lrs = [cfg.lr] * len(groups)
    for group in groups:
        group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor(scheduler.last_epoch)
        group.update(adamw_options(cfg))      # the settings the optimizer was just built with
    groups[0]["weight_decay"] = cfg.weight_decay     # groups[1] holds gains and biases: no decay
    scheduler._last_lr = [group["lr"] for group in groups]
