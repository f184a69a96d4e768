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
from omni.config import UserError, config_dict
from omni.data.sampler import mix_seed
from omni.logs import log
from omni.runtime import Runtime
from omni.train import sharded
from omni.train.optim import rebuild_schedule
from omni.train.parallel import Parallel
from omni.train.stage import Stage


@dataclass
class Trainer:
    """Everything a checkpoint holds, and the files it goes to."""
    stage: Stage
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    step: int = 0
    best_val_loss: float = float("inf")
    best_step: int = 0                  # the step whose validation gave best_val_loss
    start_batch: int = 0                # global batches taken before this process started (resume)
    batches_taken: int = 0              # batches this rank has drawn since
    nonfinite_streak: int = 0           # steps skipped in a row for inf/NaN loss or gradients (train_step)

    @property
    def cfg(self):
        return self.stage.cfg

    def state(self) -> dict:
        """Step, best loss, config and, to resume, the schedule, scaler, every rank's RNG and the data
        position (collective calls under torchrun)."""
        rt = self.stage.rt
        # Every rank draws from its own lane of the global stream; a rank that met a wholly bad batch
        # drew one more, and the stream goes on after the furthest lane: nothing is seen twice.
        taken = self.start_batch + rt.largest(self.batches_taken) * rt.world_size
        out = {ckpt.STEP: self.step, ckpt.BEST_VAL_LOSS: self.best_val_loss, ckpt.BEST_STEP: self.best_step,
               ckpt.NONFINITE_STREAK: self.nonfinite_streak, ckpt.CONFIG: config_dict(self.cfg),
               ckpt.VERSION: ckpt.FORMAT_VERSION, ckpt.SCHEDULER: self.scheduler.state_dict(),
               ckpt.RNG: rt.gather_rng(), ckpt.DATA_STATE: {"samples": taken * self.cfg.batch_size,
                                                            "batch_size": self.cfg.batch_size,
                                                            "world_size": rt.world_size}}
        if self.scaler is not None:
            out[ckpt.SCALER] = self.scaler.state_dict()
        return out

    def payload(self, full: bool = True) -> dict:
        """The checkpoint dictionary (a collective call under torchrun). With parallel=fsdp a single
        file holds the gathered weights only: its step folders hold the rest."""
        folders = self.parallel.folders
        weights = sharded.full_weights(self.parallel.root, self.stage.modules) if folders else \
            {key: m.state_dict() for key, m in self.stage.modules.items()}
        out = {**weights, **self.state()}
        if full and not folders:
            return {**out, ckpt.OPTIMIZER: self.optimizer.state_dict()}
        return ckpt.slim(out)

    def save(self, path: str) -> None:
        """Write a checkpoint (a collective call). Weights that are not finite are never written: the
        run stops with one line instead, and the files already there stay the newest."""
        rt = self.stage.rt
        self.check_finite_weights(path)
        if path.endswith(".dcp"):
            sharded.save_folder(path, self.parallel.root, self.optimizer, self.state(), rt)
        else:
            payload = self.payload()
            if rt.is_main:
                ckpt.save(path, payload)
        if rt.is_main:
            self.write_state(os.path.basename(path))
        rt.barrier()

    def check_finite_weights(self, path: str) -> None:
        """UserError naming the step when any weight or buffer of the stage's modules is inf or NaN. One
        pass over the tensors, at save time only; each rank checks its own shards (FSDP) and the ranks'
        verdicts are summed, so every rank stops alike."""
        local = [t.to_local() if hasattr(t, "to_local") else t          # a DTensor: this rank's shard
                 for m in self.stage.modules.values() for t in [*m.parameters(), *m.buffers()]]
        flags = [torch.isfinite(t).all() for t in local if t.is_floating_point() and t.numel()]
        bad = float(not torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else 0.0
        if self.stage.rt.sum([bad])[0]:
            raise UserError(f"{self.stage.spec.prefix}: weights not finite at step {self.step}; "
                            f"{os.path.basename(path)} not written; {self.divergence_advice()}")

    def divergence_advice(self) -> str:
        """The end of the one-line messages that stop a diverged run: where it can go back to, what to change."""
        cfg, prefix = self.cfg, self.stage.spec.prefix
        steps = ckpt.step_files(cfg.save_dir, prefix)
        best = ckpt.best_path(cfg.save_dir, prefix)
        last = steps[-1][1] if steps else best if os.path.isfile(best) else None
        where = f"the last finite checkpoint is {last}" if last else "no checkpoint was written before it"
        return where + ("; lower lr" if cfg.grad_clip > 0 else "; lower lr or set grad_clip (e.g. 1.0)")

    def write_state(self, latest: str) -> None:
        ckpt.write_json(os.path.join(self.cfg.save_dir, ckpt.TRAINING_STATE), {
            "step": self.step, "best_val_loss": _json_float(self.best_val_loss), "latest": latest,
            "max_steps": self.cfg.max_steps, "best_step": self.best_step, "finished": self.done()})

    def done(self) -> bool:
        """Whether training is over: max_steps reached, or stopped early (see `plateaued`)."""
        return self.step >= self.cfg.max_steps or self.plateaued()

    def plateaued(self) -> bool:
        """At a validation step: val_loss has not improved for early_stop_steps steps. Only checked on
        the validation grid, so a run resumed from any checkpoint stops where an unbroken one would."""
        patience, interval = self.cfg.early_stop_steps, self.cfg.eval_interval
        return patience > 0 and self.step % interval == 0 and self.step - self.best_step >= patience

    def restore(self, obj, source: str) -> None:
        """Continue from a checkpoint file's dictionary, or from a step folder and its trainer.pt."""
        changes = resume_policy.config_changes(obj.get(ckpt.CONFIG, {}), self.cfg)
        resume_policy.refuse_data_order_changes(changes, source)
        if os.path.isdir(source):
            sharded.load_folder(source, self.parallel.root, self.optimizer, obj)
        elif self.parallel.folders:
            raise ckpt.CheckpointError(f"{source}: parallel=fsdp resumes from step folders (.dcp) only; resume "
                                       "this file with parallel=ddp, or start from its weights with --init_from")
        else:
            load_weights(self.stage, obj, source)
            try:
                self.optimizer.load_state_dict(obj[ckpt.OPTIMIZER])
            except (ValueError, KeyError) as e:
                raise ckpt.CheckpointError(f"{source}: optimizer state does not fit this config: {e}") from None
        try:
            self.scheduler.load_state_dict(obj[ckpt.SCHEDULER])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{source}: scheduler state does not fit this config: {e}") from None
        if self.scaler is not None and ckpt.SCALER in obj:
            self.scaler.load_state_dict(obj[ckpt.SCALER])
        self.step, self.best_val_loss = int(obj[ckpt.STEP]), float(obj[ckpt.BEST_VAL_LOSS])
        self.best_step = int(obj.get(ckpt.BEST_STEP, self.step))    # older checkpoints: count from here
        self.nonfinite_streak = int(obj.get(ckpt.NONFINITE_STREAK, 0))     # older checkpoints: none
        self.rebuild_schedule()
        self.restore_data_position(obj.get(ckpt.DATA_STATE, {}), obj.get(ckpt.RNG, []), changes)

    def restore_data_position(self, data: dict, rng: list, changes: dict) -> None:
        rt, cfg = self.stage.rt, self.cfg
        # Format 1 counted batches per rank; a one-rank run's count is already global.
        samples = data.get("samples", data.get("batches", self.step * cfg.grad_accum_steps)
                           * data.get("world_size", 1) * cfg.batch_size)
        self.start_batch, self.batches_taken = samples // cfg.batch_size, 0
        if changes:
            log(rt, f"resuming with config changes: {resume_policy.describe(changes, self.step)}")
        if not rt.restore_rng(rng, reseed=mix_seed(cfg.seed, rt.rank, self.step, 2)):
            log(rt, f"resuming {len(rng)} rank(s) on {rt.world_size}: the data continues at sample {samples}, "
                    f"none skipped or repeated; each rank's RNG is reseeded from (seed, rank, step)")

    def rebuild_schedule(self) -> None:
        rebuild_schedule(self.optimizer, self.scheduler, self.cfg)


def check_stage_of(obj, keys: list[str], prefix: str, source: str) -> None:
    """CheckpointError unless the checkpoint dictionary holds the weight `keys` of stage `prefix` (a
    bare state_dict is checked when its weights load)."""
    if ckpt.kind_of(obj, source) != "legacy" and not set(keys) <= set(obj):
        theirs = sorted(k for k in obj if k not in ckpt.NON_WEIGHT_KEYS)
        raise ckpt.CheckpointError(f"{source}: not a {prefix} checkpoint: it holds weights "
                                   f"{theirs}, this stage needs {keys}")


def load_weights(stage: Stage, obj, source: str) -> None:
    """The stage's modules from a checkpoint dictionary (full, weights-only or a bare state_dict)."""
    keys = list(stage.modules)
    check_stage_of(obj, keys, stage.spec.prefix, source)
    for key, sd in ckpt.weights_of(obj, keys, source).items():
        try:
            stage.modules[key].load_state_dict(sd)
        except RuntimeError as e:
            # the first line only names the module; the second says which names or shapes differ
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            detail = " ".join(lines[:2])
            detail = detail if len(detail) <= 240 else detail[:237] + "..."
            raise ckpt.CheckpointError(f"{source}: weights '{key}' do not fit this config: {detail}") from None


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
        found = [path for step, path in ckpt.step_files(save_dir, prefix) if step == resume_step]
        if not found:
            steps = ", ".join(str(step) for step, _ in ckpt.step_files(save_dir, prefix)) or "none"
            raise ckpt.CheckpointError(f"--resume_step {resume_step}: {prefix}_step_{resume_step}.pt not found in "
                                       f"{save_dir} (step files there: {steps})")
        return found[-1], read_candidate(found[-1])
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
            return path, obj if obj is not None else read_candidate(path)
        except ckpt.CheckpointError as e:
            failures.append(path)
            log(rt, f"warning: skipping {e}")
    if failures:
        raise ckpt.CheckpointError(
            f"no loadable checkpoint in {save_dir} ({len(failures)} unreadable); "
            "use --no-resume to start over or --init_from PATH to load weights")
    return None


def read_candidate(path: str) -> dict:
    """A step file's dictionary, or a step folder's trainer.pt once its shards are checked."""
    return sharded.check_folder(path) if os.path.isdir(path) else ckpt.load(path)
