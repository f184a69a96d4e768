"""The shared training core: one loop, checkpoints, resume, AMP, LR schedule.

A stage (omni/stages/*.py) subclasses `Stage` (omni/stage.py) and supplies what differs: its modules (saved under
their weight keys), datasets, batches and loss, and any extra validation metrics. Everything
else lives here once: see docs/training.md for the contract this file keeps.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from omni import checkpoint as ckpt
from omni import resume_policy
from omni.cli import run_cli
from omni.config import UserError, config_dict, load_config
from omni.data.sampler import ResumableBatchSampler, mix_seed
from omni.logs import MetricsLog, Progress, log, summary_writer_class
from omni.runtime import Runtime, setup_runtime, teardown
from omni.stage import Stage, make_loader, to_device


# ----------------------------------------------------------------------------- schedule
def warmup_cosine(cfg):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(params, cfg):
    # No weight decay on gains and biases (1-D tensors): decaying them only hurts.
    decay = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


# ----------------------------------------------------------------------------- state
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
        out.update(step=self.step, best_val_loss=self.best_val_loss, config=config_dict(self.cfg),
                   format_version=ckpt.FORMAT_VERSION)
        if full:
            out.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                       rng=self.stage.rt.gather_rng(),
                       data_state={"batches": self.batches_taken, "batch_size": self.cfg.batch_size,
                                   "world_size": self.stage.rt.world_size})
            if self.scaler is not None:
                out["scaler"] = self.scaler.state_dict()
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
        changes = resume_policy.config_changes(obj.get("config", {}), self.cfg)
        resume_policy.refuse_data_order_changes(changes, source)
        self.load_weights(obj, source)
        try:
            self.optimizer.load_state_dict(obj["optimizer"])
            self.scheduler.load_state_dict(obj["scheduler"])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{source}: optimizer state does not fit this config: {e}") from None
        if self.scaler is not None and "scaler" in obj:
            self.scaler.load_state_dict(obj["scaler"])
        self.step, self.best_val_loss = int(obj["step"]), float(obj["best_val_loss"])
        self.rebuild_schedule()
        data = obj.get("data_state", {})
        self.batches_taken = int(data.get("batches", self.step * self.cfg.grad_accum_steps))
        rt = self.stage.rt
        if changes:
            log(rt, f"resuming with config changes: {resume_policy.describe(changes, self.step)}")
        if not rt.restore_rng(obj.get("rng", [])) or data.get("batch_size") != self.cfg.batch_size:
            log(rt, f"warning: {source} came from another batch size or world size; "
                    "the run continues, but not exactly as an uninterrupted run would")

    def rebuild_schedule(self) -> None:
        """Learning rates and weight decay from this config at the restored step. The restored
        optimizer and scheduler hold the old run's lr and weight decay; unchanged keys give back
        the very same values (the scheduler computes lr the same way: base_lr * factor(step))."""
        factor, groups = warmup_cosine(self.cfg), self.optimizer.param_groups
        self.scheduler.base_lrs = [self.cfg.lr] * len(groups)
        for group in groups:
            group["initial_lr"], group["lr"] = self.cfg.lr, self.cfg.lr * factor(self.scheduler.last_epoch)
        groups[0]["weight_decay"] = self.cfg.weight_decay     # groups[1] holds gains and biases: no decay
        self.scheduler._last_lr = [group["lr"] for group in groups]


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
                candidates.append((int(obj["step"]), path, obj))
        except ckpt.CheckpointError as e:
            log(rt, f"warning: skipping {e}")
    failures = []
    for step, path, obj in sorted(candidates, key=lambda c: c[0], reverse=True):
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


# ----------------------------------------------------------------------------- signals
# (logging, metrics.jsonl, TensorBoard and progress live in omni/logs.py)
class StopSignals:
    """SIGTERM / Ctrl-C ask the loop to save and exit at the end of the current step.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- the loop
@dataclass
class ResumeOptions:
    resume: bool = True
    resume_step: int | None = None
    init_from: str | None = None


def build_trainer(stage: Stage, opts: ResumeOptions) -> Trainer:
    """Set up the stage, the optimizer and the schedule, then load what the options ask for."""
    cfg, rt = stage.cfg, stage.rt
    torch.manual_seed(cfg.seed)     # the same initial weights on every rank and every fresh run
    stage.setup()
    for module in stage.modules.values():
        module.to(rt.device)
    rt.broadcast_parameters(stage.modules.values())
    params = stage.parameters()
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype is torch.float16 else None
    trainer = Trainer(stage, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg)), scaler)
    torch.manual_seed(mix_seed(cfg.seed, rt.rank, 1))   # dropout etc. differ between ranks
    if opts.init_from:
        trainer.load_weights(ckpt.load(opts.init_from), opts.init_from)
        log(rt, f"initialised weights from {opts.init_from}; fresh optimizer at step 0")
    elif opts.resume or opts.resume_step is not None:
        found = find_resume_checkpoint(cfg.save_dir, stage.spec.prefix, opts.resume_step, rt,
                                       include_best=cfg.checkpoint_freq == 0)
        if found:
            trainer.restore(found[1], found[0])
            log(rt, f"resumed from {found[0]} at step {trainer.step}")
    return trainer


def train(stage_class, cfg, opts: ResumeOptions = ResumeOptions()) -> int:
    """Train a stage to cfg.max_steps; returns the process exit status."""
    if "tensorboard" in cfg.log_to:
        summary_writer_class()      # a missing package stops the run before a long setup, not after
    rt = setup_runtime(cfg)
    try:
        if rt.is_main:
            ckpt.remove_stale_temps(cfg.save_dir)
            os.makedirs(cfg.save_dir, exist_ok=True)
        rt.barrier()
        trainer = build_trainer(stage_class(cfg, rt), opts)
        if rt.is_main:
            ckpt.write_json(os.path.join(cfg.save_dir, "config.json"), config_dict(cfg))
        return run_loop(trainer)
    finally:
        teardown(rt)


def train_step(trainer: Trainer, batches) -> dict:
    """One optimizer step over grad_accum_steps micro-batches; returns the averaged metrics."""
    stage, cfg, rt = trainer.stage, trainer.cfg, trainer.stage.rt
    sums, skipped = {}, []
    for _ in range(cfg.grad_accum_steps):
        batch, bad = next(batches)
        trainer.batches_taken += 1
        skipped += bad
        run = len(bad)
        while batch is None:           # every sample of the batch was bad: take the next one
            if run >= 2 * len(stage.train_data):    # two epochs' worth: there is no usable sample
                raise UserError(f"no usable training sample in {run} tries (e.g. {bad[-1]})")
            batch, bad = next(batches)
            trainer.batches_taken += 1
            skipped += bad
            run += len(bad)
        with rt.autocast():
            loss, metrics = stage.loss(to_device(batch, rt.device))
        scaled = loss / cfg.grad_accum_steps
        (trainer.scaler.scale(scaled) if trainer.scaler else scaled).backward()
        for key, value in {"loss": loss.item(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    rt.average_gradients(params)
    if trainer.scaler:
        trainer.scaler.unscale_(trainer.optimizer)
    if cfg.grad_clip > 0:
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) * cfg.grad_accum_steps
    if trainer.scaler:
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    else:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    trainer.step += 1
    out = {k: v if k.startswith("n_") else v / cfg.grad_accum_steps for k, v in sums.items()}
    out["skipped_samples"] = skipped
    return out


def validate(trainer: Trainer) -> dict:
    stage = trainer.stage
    for m in stage.modules.values():
        m.eval()
    with torch.no_grad():
        metrics = stage.evaluate()
    for m in stage.modules.values():
        m.train()
    # Validation runs in this process, so the datasets know every bad sample it met (each named once).
    bad = [len(getattr(d, "bad_records", ())) for d in (stage.val_data, getattr(stage, "test_data", None))]
    bad_val, bad_all = stage.rt.sum([float(bad[0]), float(sum(bad))])
    if bad_all:
        metrics["skipped_samples"] = int(bad_all)
    if stage.val_data is not None and bad_val >= len(stage.val_data):   # nothing validated: no figure, no best
        metrics["val_loss"] = float("nan")
    return metrics


def run_loop(trainer: Trainer) -> int:
    stage, cfg, rt = trainer.stage, trainer.cfg, trainer.stage.rt
    prefix, save_dir = stage.spec.prefix, cfg.save_dir
    final = ckpt.final_path(save_dir, prefix)
    if trainer.step >= cfg.max_steps:
        log(rt, f"{prefix}: already trained to step {trainer.step} (max_steps={cfg.max_steps}); nothing to do")
        if not os.path.isfile(final):
            trainer.save(final)
        return 0
    metrics_log = MetricsLog(save_dir, trainer.step, rt.is_main, cfg.log_to)
    sampler = ResumableBatchSampler(stage.batch_plan(), trainer.batches_taken, rt.rank, rt.world_size)
    batches = iter(make_loader(stage.train_data, sampler, stage))
    stop = StopSignals()
    progress = Progress(cfg.max_steps, prefix, initial=trainer.step, enabled=rt.is_main and cfg.progress)
    window, window_start, skipped_total, skipped_examples = {}, time.perf_counter(), 0, []
    for m in stage.modules.values():
        m.train()
    try:
        while trainer.step < cfg.max_steps:
            metrics = train_step(trainer, batches)
            dropped = metrics.pop("skipped_samples")
            skipped_total += len(dropped)
            skipped_examples = list(dict.fromkeys(skipped_examples + dropped))[:3]
            for key, value in metrics.items():
                window[key] = window.get(key, 0.0) + value
            window["steps"] = window.get("steps", 0) + 1
            progress.update(1, loss=f"{metrics['loss']:.4f}")
            step = trainer.step
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                metrics_log.write(summarize(window, time.perf_counter() - window_start, step,
                                            trainer.scheduler.get_last_lr()[0], skipped_total))
                window, window_start = {}, time.perf_counter()
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val = validate(trainer)
                metrics_log.write({"step": step, "split": "val", **val})
                improved = val["val_loss"] < trainer.best_val_loss
                log(rt, f"{prefix} step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in val.items())
                    + ("  (best)" if improved else ""))
                if improved:
                    trainer.best_val_loss = val["val_loss"]
                    trainer.save(ckpt.best_path(save_dir, prefix))
            stopping = stop_requested(stop, rt)
            # checkpoint_freq 0: no periodic step files, but a stop still saves one (nothing is lost)
            on_grid = cfg.checkpoint_freq > 0 and step % cfg.checkpoint_freq == 0
            if on_grid or (stopping and step < cfg.max_steps):
                trainer.save(ckpt.step_path(save_dir, prefix, step))
                if rt.is_main:
                    ckpt.keep_last(save_dir, prefix, cfg.keep_last_n, cfg.archive_every)
            if stopping and step < cfg.max_steps:
                name = signal.Signals(stop.signum).name
                log(rt, f"{prefix}: stopped by {name} at step {step}; checkpoint saved; "
                        "run the same command again to resume")
                return 128 + stop.signum
    finally:
        stop.restore()
        progress.close()
        metrics_log.close()
        # On an error the traceback keeps the loader alive until exit, when multiprocessing would
        # SIGTERM its workers, which ignore that signal (ignore_stop_signals): stop them now.
        getattr(batches, "_shutdown_workers", lambda: None)()
    trainer.save(final)
    if skipped_total:
        log(rt, f"{prefix}: skipped {skipped_total} bad samples, e.g. {'; '.join(skipped_examples)} "
                "(set strict_data=true to stop on them)")
    log(rt, f"{prefix}: finished {cfg.max_steps} steps; best val_loss {trainer.best_val_loss:.4f}; "
            f"checkpoints in {save_dir}")
    return 0


def summarize(window: dict, seconds: float, step: int, lr: float, skipped: int) -> dict:
    steps = window.pop("steps")
    record = {"step": step, "split": "train", "lr": lr, "skipped_samples": skipped,
              "steps_per_s": steps / max(seconds, 1e-9)}
    for key, value in window.items():
        if key.startswith("n_"):    # counts become rates: n_tokens -> tokens_per_s
            record[key[2:] + "_per_s"] = value / max(seconds, 1e-9)
        else:
            record[key] = value / steps
    return record


def stop_requested(stop: StopSignals, rt: Runtime) -> bool:
    """Whether any rank received SIGTERM/SIGINT (all ranks must stop at the same step)."""
    return rt.sum([float(stop.signum is not None)])[0] > 0


# ----------------------------------------------------------------------------- command line
def trainer_main(stage_class, argv=None) -> None:
    """The command line every trainer shares (see DESIGN.md, command-line conventions)."""
    parser = argparse.ArgumentParser(description=f"Train the {stage_class.spec.prefix} stage.")
    parser.add_argument("--config", help="JSON config file (defaults to the built-in values)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable, type-checked)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start fresh even if save_dir holds checkpoints")
    parser.add_argument("--resume_step", type=int, help="resume from {prefix}_step_N.pt")
    parser.add_argument("--init_from", help="load weights only (any format); fresh optimizer at step 0")
    args = parser.parse_args(argv)

    def main():
        cfg = load_config(stage_class.config_class, args.config, args.set)
        return train(stage_class, cfg, ResumeOptions(args.resume, args.resume_step, args.init_from))
    run_cli(main)
