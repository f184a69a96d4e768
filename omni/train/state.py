"""What a checkpoint holds and how a run gets it back: the `Trainer` state (stage modules,
optimizer, scheduler, scaler, step, best validation loss, data position), its payload and its
restore, and the search for the newest loadable checkpoint to resume from.

The payload's keys are declared once in omni/checkpoint.py; the contract is docs/checkpoints.md.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from omni import checkpoint as ckpt
from omni import resume_policy
from omni.config import config_dict
from omni.logs import log
from omni.runtime import Runtime
from omni.train.optim import rebuild_schedule
from omni.train.stage import Stage


@dataclass
class Trainer:
    """Everything a checkpoint holds, and the files it goes to."""
    stage: Stage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    step: int = 0
    best_val_loss: float = float("inf")
    batches_taken: int = 0              # per-rank batches drawn from the sampler so far

    @property
    def cfg(self):
        return self.stage.cfg

    def payload(self, full: bool = True) -> dict:
        """The checkpoint dictionary (a collective call under torchrun: RNG states are gathered)."""
        out = {key: m.state_dict() for key, m in self.stage.modules.items()}
        out.update({ckpt.STEP: self.step, ckpt.BEST_VAL_LOSS: self.best_val_loss,
                    ckpt.CONFIG: config_dict(self.cfg), ckpt.VERSION: ckpt.FORMAT_VERSION})
        if full:
            out.update({ckpt.OPTIMIZER: self.optimizer.state_dict(), ckpt.SCHEDULER: self.scheduler.state_dict(),
                        ckpt.RNG: self.stage.rt.gather_rng(),
                        ckpt.DATA_STATE: {"batches": self.batches_taken, "batch_size": self.cfg.batch_size,
                                          "world_size": self.stage.rt.world_size}})
            if self.scaler is not None:
                out[ckpt.SCALER] = self.scaler.state_dict()
        return out

    def save(self, path: str) -> None:
        payload = self.payload()
        if self.stage.rt.is_main:
            ckpt.save(path, payload)
            self.write_state(os.path.basename(path))
        self.stage.rt.barrier()

    def write_state(self, latest: str) -> None:
        ckpt.write_json(os.path.join(self.cfg.save_dir, ckpt.TRAINING_STATE), {
            "step": self.step, "best_val_loss": _json_float(self.best_val_loss), "latest": latest,
            "max_steps": self.cfg.max_steps, "finished": self.step >= self.cfg.max_steps})

    def load_weights(self, obj, source: str) -> None:
        keys = list(self.stage.modules)
        if ckpt.kind_of(obj) != "legacy" and not set(keys) <= set(obj):
            theirs = sorted(k for k in obj if k not in ckpt.NON_WEIGHT_KEYS)
            raise ckpt.CheckpointError(f"{source}: not a {self.stage.spec.prefix} checkpoint: it holds weights "
                                       f"{theirs}, this stage needs {keys}")
        for key, sd in ckpt.weights_of(obj, keys, source).items():
            try:
                self.stage.modules[key].load_state_dict(sd)
            except RuntimeError as e:
                # the first line only names the module; the second says which names or shapes differ
                lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
                detail = " ".join(lines[:2])
                detail = detail if len(detail) <= 240 else detail[:237] + "..."
                raise ckpt.CheckpointError(f"{source}: weights '{key}' do not fit this config: {detail}") from None

    def restore(self, obj, source: str) -> None:
        changes = resume_policy.config_changes(obj.get(ckpt.CONFIG, {}), self.cfg)
        resume_policy.refuse_data_order_changes(changes, source)
        self.load_weights(obj, source)
        try:
            self.optimizer.load_state_dict(obj[ckpt.OPTIMIZER])
            self.scheduler.load_state_dict(obj[ckpt.SCHEDULER])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{source}: optimizer state does not fit this config: {e}") from None
        if self.scaler is not None and ckpt.SCALER in obj:
            self.scaler.load_state_dict(obj[ckpt.SCALER])
        self.step, self.best_val_loss = int(obj[ckpt.STEP]), float(obj[ckpt.BEST_VAL_LOSS])
        self.rebuild_schedule()
        data = obj.get(ckpt.DATA_STATE, {})
        self.batches_taken = int(data.get("batches", self.step * self.cfg.grad_accum_steps))
        rt = self.stage.rt
        if changes:
            log(rt, f"resuming with config changes: {resume_policy.describe(changes, self.step)}")
        if not rt.restore_rng(obj.get(ckpt.RNG, [])) or data.get("batch_size") != self.cfg.batch_size:
            log(rt, f"warning: {source} came from another batch size or world size; "
                    "the run continues, but not exactly as an uninterrupted run would")

    def rebuild_schedule(self) -> None:
        rebuild_schedule(self.optimizer, self.scheduler, self.cfg)


def _json_float(x: float):
    return x if math.isfinite(x) else None


def find_resume_checkpoint(save_dir: str, prefix: str, resume_step: int | None, rt: Runtime,
                           include_best: bool = False):
    """(path, payload) of the newest loadable checkpoint, or None when there is none at all.

    Candidates are the step files and the final file when it is a full checkpoint; with
    include_best (checkpoint_freq 0, so no step files) the best file too: it holds the whole state
    of its step, so the run repeats the steps after it exactly instead of starting over.
    A truncated, corrupt or unsafe file is reported and skipped; if every file fails, that is
    an error: starting over silently would overwrite the run.
    """
    if resume_step is not None:
        path = ckpt.step_path(save_dir, prefix, resume_step)
        if not os.path.isfile(path):
            steps = ", ".join(str(step) for step, _ in ckpt.step_files(save_dir, prefix)) or "none"
            raise ckpt.CheckpointError(f"--resume_step {resume_step}: {os.path.basename(path)} not found in {save_dir} "
                                       f"(step files there: {steps})")
        return path, ckpt.load(path)
    candidates = [(step, path, None) for step, path in ckpt.step_files(save_dir, prefix)]
    whole = [ckpt.final_path(save_dir, prefix)] + ([ckpt.best_path(save_dir, prefix)] if include_best else [])
    for path in filter(os.path.isfile, whole):
        try:
            obj = ckpt.load(path)
            if ckpt.kind_of(obj) == "full":
                candidates.append((int(obj[ckpt.STEP]), path, obj))
        except ckpt.CheckpointError as e:
            log(rt, f"warning: skipping {e}")
    failures = []
    for _, path, obj in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            return path, obj if obj is not None else ckpt.load(path)
        except ckpt.CheckpointError as e:
            failures.append(path)
            log(rt, f"warning: skipping {e}")
    if failures:
        raise ckpt.CheckpointError(
            f"no loadable checkpoint in {save_dir} ({len(failures)} unreadable); "
            "use --no-resume to start over or --init_from PATH to load weights")
    return None
