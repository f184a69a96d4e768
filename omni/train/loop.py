"""The one training loop every stage runs: build the trainer, then step, log, validate, save and
stop at max_steps (or earlier, with early_stop_steps). See docs/training.md for the contract and
docs/checkpoints.md for the files.

`train_step` and `validate` are looked up in this module at call time, so tests/stage_runner.py
can wrap them to inject faults without the loop carrying test hooks.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from omni import checkpoint as ckpt
from omni.config import UserError, config_dict
from omni.data.sampler import ResumableBatchSampler, mix_seed
from omni.logs import MetricsLog, Progress, log, summary_writer_class
from omni.runtime import Runtime, setup_runtime, teardown
from omni.train import rundir
from omni.train.optim import make_optimizer, make_scheduler
from omni.train.parallel import parallelize
from omni.train.speed import compile_modules
from omni.train.stage import Stage, make_loader, to_device
from omni.train.state import Trainer, find_resume_checkpoint, load_weights


@dataclass
class ResumeOptions:
    resume: bool = True
    resume_step: int | None = None
    init_from: str | None = None


# ----------------------------------------------------------------------------- setup
def check_weight_keys(stage: Stage) -> None:
    """The stage's modules are exactly its registered weight keys, plus any of its optional keys:
    what it saves is what the loaders and the tools expect (omni/registry.py)."""
    spec, keys = stage.spec, set(stage.modules)
    if not set(spec.weight_keys) <= keys <= set(spec.weight_keys) | set(spec.optional_keys):
        raise RuntimeError(f"stage {spec.letter} ({spec.prefix}) built modules {sorted(keys)}; its spec declares "
                           f"{list(spec.weight_keys)} + optional {list(spec.optional_keys)}")


def build_trainer(stage: Stage, opts: ResumeOptions, init: dict | None = None) -> Trainer:
    """Set up the stage, wrap it for its ranks, build the optimizer and the schedule, then load
    what the options ask for (`init`: --init_from's dictionary when the caller read it already).
    --resume_step starts a branch: the old lineage's files after its step go aside once that step
    is restored (omni/train/rundir.py)."""
    cfg, rt = stage.cfg, stage.rt
    torch.manual_seed(cfg.seed)     # the same initial weights on every rank and every fresh run
    stage.setup()
    check_weight_keys(stage)
    for module in stage.modules.values():
        module.to(rt.device)
    compile_modules(stage, cfg)
    rt.broadcast_parameters(stage.modules.values())
    if opts.init_from:
        load_weights(stage, init if init is not None else ckpt.load(opts.init_from), opts.init_from)
        log(rt, f"initialised weights from {opts.init_from}; fresh optimizer at step 0")
    parallel = parallelize(stage, cfg.parallel, rt.world_size)     # FSDP shards the modules in place
    optimizer = make_optimizer(stage.parameters(), cfg)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype is torch.float16 else None
    trainer = Trainer(stage, parallel, optimizer, make_scheduler(optimizer, cfg), scaler)
    torch.manual_seed(mix_seed(cfg.seed, rt.rank, 1))   # dropout etc. differ between ranks
    if not opts.init_from and (opts.resume or opts.resume_step is not None):
        found = find_resume_checkpoint(cfg.save_dir, stage.spec.prefix, opts.resume_step, rt,
                                       include_best=cfg.checkpoint_freq == 0)
        if found:
            trainer.restore(found[1], found[0])
            log(rt, f"resumed from {found[0]} at step {trainer.step}")
            if opts.resume_step is not None:
                rundir.start_branch(trainer, opts.resume_step)
    return trainer


def train(stage_class, cfg, opts: ResumeOptions = ResumeOptions()) -> int:
    """Train a stage to cfg.max_steps; returns the process exit status."""
    if "tensorboard" in cfg.log_to:
        summary_writer_class()      # a missing package stops the run before a long setup, not after
    rt = setup_runtime(cfg)
    lock = None
    try:
        # One run per folder: the lock comes before anything in save_dir is touched, and a fresh
        # start or a branch moves the files of other lineages aside (omni/train/rundir.py).
        lock, init = rundir.claim(cfg.save_dir, stage_class.spec, opts, rt)
        trainer = build_trainer(stage_class(cfg, rt), opts, init)
        if rt.is_main:
            ckpt.write_json(os.path.join(cfg.save_dir, "config.json"), config_dict(cfg))
        status = run_loop(trainer)
        rt.barrier()        # no rank leaves the process group while another still has work in flight
        return status
    finally:
        teardown(rt)
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------- one step, one validation
def next_usable_batch(trainer: Trainer, batches, skipped: list):
    """The next batch holding at least one good sample (its bad ones noted in `skipped`)."""
    batch, bad = next(batches)
    trainer.batches_taken += 1
    skipped += bad
    run = len(bad)
    while batch is None:           # every sample of the batch was bad: take the next one
        if run >= 2 * len(trainer.stage.train_data):    # two epochs' worth: there is no usable sample
            raise UserError(f"no usable training sample in {run} tries (e.g. {bad[-1]})")
        batch, bad = next(batches)
        trainer.batches_taken += 1
        skipped += bad
        run += len(bad)
    return batch


def train_step(trainer: Trainer, batches) -> dict:
    """One optimizer step over grad_accum_steps micro-batches; returns the averaged metrics.

    A step whose loss (any micro-batch, any rank) or total gradient norm is inf or NaN is skipped:
    no optimizer update, `nonfinite_steps` 1 in its metrics and `trainer.nonfinite_streak` one
    longer (a finite step resets it). Its batches are used up and the schedule and step count
    advance, as GradScaler's skipped steps do, so the data position and a resume stay exact."""
    cfg, rt, parallel = trainer.cfg, trainer.stage.rt, trainer.parallel
    sums, skipped, finite = {}, [], True
    for i in range(cfg.grad_accum_steps):
        batch = next_usable_batch(trainer, batches, skipped)
        # gradients are reduced over the ranks once, in the backward of the step's last micro-batch
        with parallel.accumulating() if i < cfg.grad_accum_steps - 1 else contextlib.nullcontext():
            with rt.autocast():
                loss, metrics = parallel.loss(to_device(batch, rt.device))
            scaled = loss / cfg.grad_accum_steps
            (trainer.scaler.scale(scaled) if trainer.scaler else scaled).backward()
        loss_value = loss.item()
        finite = finite and math.isfinite(loss_value)
        for key, value in {"loss": loss_value, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    if trainer.scaler:
        trainer.scaler.unscale_(trainer.optimizer)
    norm = gradient_norm(trainer.stage.parameters(), cfg.grad_clip)
    sums["grad_norm"] = norm * cfg.grad_accum_steps
    # One verdict for all ranks: a loss is one rank's own, and under FSDP so are the gradient shards.
    skip = rt.sum([float(not (finite and math.isfinite(norm)))])[0] > 0
    apply_gradients(trainer, skip)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    trainer.step += 1
    trainer.nonfinite_streak = trainer.nonfinite_streak + 1 if skip else 0
    out = {k: v if k.startswith("n_") else v / cfg.grad_accum_steps for k, v in sums.items()}
    out["skipped_samples"], out["nonfinite_steps"] = skipped, int(skip)
    return out


def gradient_norm(params: list, clip: float) -> float:
    """The total norm of the gradients over every rank (inf or NaN when any gradient is), after
    clipping them to `clip` when it is > 0."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)    # FSDP: a sharded norm


def apply_gradients(trainer: Trainer, skip: bool) -> None:
    """Step the optimizer, unless the step is skipped. GradScaler (amp=fp16) is updated either way:
    on the overflow its unscale_ found, it lowers its scale as on its own skipped steps."""
    if trainer.scaler:
        if not skip:
            trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    elif not skip:
        trainer.optimizer.step()


def validate(trainer: Trainer) -> dict:
    stage = trainer.stage
    for m in stage.modules.values():
        m.eval()
    with torch.no_grad(), trainer.parallel.evaluating():
        metrics = stage.evaluate()
    for m in stage.modules.values():
        m.train()
    # Validation runs in this process, so the datasets know every bad sample it met (each named once).
    bad = [len(getattr(d, "bad_records", ())) for d in (stage.val_data, stage.test_data)]
    bad_val, bad_all = stage.rt.sum([float(bad[0]), float(sum(bad))])
    if bad_all:
        metrics["skipped_samples"] = int(bad_all)
    if stage.val_data is not None and bad_val >= len(stage.val_data):   # nothing validated: no figure, no best
        metrics["val_loss"] = float("nan")
    return metrics


# ----------------------------------------------------------------------------- the loop
def run_loop(trainer: Trainer) -> int:
    """Step until max_steps (or early_stop_steps without a better val_loss): log the metric window,
    validate (keeping the best checkpoint), save on the checkpoint grid, and stop cleanly on
    SIGTERM / Ctrl-C. Returns the exit status."""
    stage, cfg, rt = trainer.stage, trainer.cfg, trainer.stage.rt
    if trainer.done():
        return already_trained(trainer)
    metrics_log = MetricsLog(cfg.save_dir, trainer.step, rt.is_main, cfg.log_to)
    sampler = ResumableBatchSampler(stage.batch_plan(), trainer.start_batch, rt.rank, rt.world_size)
    batches = iter(make_loader(stage.train_data, sampler, stage))
    stop, window = StopSignals(), MetricsWindow()
    progress = Progress(cfg.max_steps, stage.spec.prefix, initial=trainer.step, enabled=rt.is_main and cfg.progress)
    for m in stage.modules.values():
        m.train()
    try:
        while not trainer.done():
            metrics = train_step(trainer, batches)
            window.add(metrics)
            progress.update(1, loss=f"{metrics['loss']:.4f}")
            if due(trainer, cfg.log_interval) or diverged(trainer):
                metrics_log.write(window.record(trainer.step, trainer.scheduler.get_last_lr()[0]))
            if diverged(trainer):
                raise UserError(nonfinite_message(trainer))
            if due(trainer, cfg.eval_interval):
                validate_and_keep_best(trainer, metrics_log)
            stopping = stop_requested(stop, rt) and not trainer.done()
            save_step(trainer, stopping or trainer.plateaued())
            if stopping:
                return stopped(trainer, stop.signum)
    finally:
        stop.restore()
        progress.close()
        metrics_log.close()
        # On an error the traceback keeps the loader alive until exit, when multiprocessing would
        # SIGTERM its workers, which ignore that signal (ignore_stop_signals): stop them now.
        getattr(batches, "_shutdown_workers", lambda: None)()
    return finished(trainer, window)


def due(trainer: Trainer, interval: int) -> bool:
    """Whether the step just taken is on the interval's grid (the last step always is)."""
    return trainer.step % interval == 0 or trainer.step == trainer.cfg.max_steps


class MetricsWindow:
    """The training metrics summed since the last log record, and the run's bad samples and skipped
    steps. A step skipped for non-finite loss or gradients adds only its counts (n_*) and
    `nonfinite_steps`: the window's averages are those of its finite steps."""

    def __init__(self):
        self.sums, self.start = {}, time.perf_counter()
        self.skipped_total, self.skipped_examples = 0, []
        self.nonfinite_total = 0

    def add(self, metrics: dict) -> None:
        dropped = metrics.pop("skipped_samples")
        self.skipped_total += len(dropped)
        self.skipped_examples = list(dict.fromkeys(self.skipped_examples + dropped))[:3]
        nonfinite = metrics.pop("nonfinite_steps")
        self.nonfinite_total += nonfinite
        for key, value in metrics.items():
            if key.startswith("n_") or not nonfinite:
                self.sums[key] = self.sums.get(key, 0.0) + value
        for key, value in (("steps", 1), ("nonfinite_steps", nonfinite)):
            self.sums[key] = self.sums.get(key, 0) + value

    def record(self, step: int, lr: float) -> dict:
        """The train record of the window (then a new window starts)."""
        out = summarize(self.sums, time.perf_counter() - self.start, step, lr, self.skipped_total)
        self.sums, self.start = {}, time.perf_counter()
        return out


def summarize(window: dict, seconds: float, step: int, lr: float, skipped: int) -> dict:
    steps, nonfinite = window.pop("steps"), window.pop("nonfinite_steps")
    record = {"step": step, "split": "train", "lr": lr, "skipped_samples": skipped, "nonfinite_steps": nonfinite,
              "steps_per_s": steps / max(seconds, 1e-9)}
    if nonfinite == steps:          # no finite step to average: the curves show a gap
        record["loss"] = record["grad_norm"] = float("nan")
    for key, value in window.items():
        if key.startswith("n_"):    # counts become rates: n_tokens -> tokens_per_s
            record[key[2:] + "_per_s"] = value / max(seconds, 1e-9)
        else:
            record[key] = value / (steps - nonfinite)
    return record


def validate_and_keep_best(trainer: Trainer, metrics_log: MetricsLog) -> None:
    """Validate, record it, and save {prefix}_best.pt when val_loss improved."""
    rt, prefix, step = trainer.stage.rt, trainer.stage.spec.prefix, trainer.step
    val = validate(trainer)
    metrics_log.write({"step": step, "split": "val", **val})
    improved = val["val_loss"] < trainer.best_val_loss
    log(rt, f"{prefix} step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in val.items())
        + ("  (best)" if improved else ""))
    if improved:
        trainer.best_val_loss, trainer.best_step = val["val_loss"], step
        trainer.save(ckpt.best_path(trainer.cfg.save_dir, prefix))


def save_step(trainer: Trainer, stopping: bool) -> None:
    """A {prefix}_step_N.pt on the checkpoint grid, or when stopping (then nothing is lost, even with
    checkpoint_freq 0), and the cleanup of old step files."""
    cfg, prefix, step, folders = trainer.cfg, trainer.stage.spec.prefix, trainer.step, trainer.parallel.folders
    # parallel=fsdp resumes from step folders only (its final file holds weights): it saves its last step too.
    if (cfg.checkpoint_freq > 0 and step % cfg.checkpoint_freq == 0) or stopping or \
            (folders and step == cfg.max_steps):
        trainer.save(ckpt.step_path(cfg.save_dir, prefix, step, folders))
        if folders and cfg.archive_every and step % cfg.archive_every == 0:
            weights = trainer.payload()          # parallel=fsdp's single files hold weights only
            if trainer.stage.rt.is_main:
                ckpt.save(ckpt.archive_path(cfg.save_dir, prefix, step), weights)
        if trainer.stage.rt.is_main:
            ckpt.keep_last(cfg.save_dir, prefix, cfg.keep_last_n, cfg.archive_every)


def already_trained(trainer: Trainer) -> int:
    cfg, prefix = trainer.cfg, trainer.stage.spec.prefix
    if ended_nonfinite(trainer):      # the run it resumes stopped on it: this one does the same
        raise UserError(nonfinite_message(trainer))
    log(trainer.stage.rt, f"{prefix}: already trained to step {trainer.step} (max_steps={cfg.max_steps}"
                          f"{early_stop_note(trainer)}); nothing to do")
    final = ckpt.final_path(cfg.save_dir, prefix)
    if not os.path.isfile(final):
        trainer.save(final)
    return 0


def stopped(trainer: Trainer, signum: int) -> int:
    log(trainer.stage.rt, f"{trainer.stage.spec.prefix}: stopped by {signal.Signals(signum).name} at step "
                          f"{trainer.step}; checkpoint saved; run the same command again to resume")
    return 128 + signum


def finished(trainer: Trainer, window: MetricsWindow) -> int:
    cfg, rt, prefix = trainer.cfg, trainer.stage.rt, trainer.stage.spec.prefix
    if ended_nonfinite(trainer):
        raise UserError(nonfinite_message(trainer))
    trainer.save(ckpt.final_path(cfg.save_dir, prefix))
    if window.nonfinite_total:
        log(rt, f"{prefix}: skipped {window.nonfinite_total} steps whose loss or gradients were not finite "
                "(metrics.jsonl: nonfinite_steps)")
    if window.skipped_total:
        log(rt, f"{prefix}: skipped {window.skipped_total} bad samples, e.g. {'; '.join(window.skipped_examples)} "
                "(set strict_data=true to stop on them)")
    log(rt, f"{prefix}: finished {trainer.step} steps{early_stop_note(trainer)}; best val_loss "
            f"{trainer.best_val_loss:.4f}; checkpoints in {cfg.save_dir}")
    return 0


def diverged(trainer: Trainer) -> bool:
    """max_nonfinite_steps steps in a row were skipped for non-finite loss or gradients (0: never)."""
    limit = trainer.cfg.max_nonfinite_steps
    return limit > 0 and trainer.nonfinite_streak >= limit


def ended_nonfinite(trainer: Trainer) -> bool:
    """Training ended inside a run of skipped steps: a diverged run is not a finished one, however
    short the run (0 = never stop: it finishes with the weights of the last finite step)."""
    return trainer.cfg.max_nonfinite_steps > 0 and trainer.nonfinite_streak > 0


def nonfinite_message(trainer: Trainer) -> str:
    """The one line that stops a run on non-finite steps, naming them."""
    n, last, prefix = trainer.nonfinite_streak, trainer.step, trainer.stage.spec.prefix
    steps = f"step {last}" if n == 1 else f"steps {last - n + 1}-{last}"
    if diverged(trainer):
        return (f"{prefix}: loss or gradients not finite for {n} steps in a row ({steps}; "
                f"max_nonfinite_steps={trainer.cfg.max_nonfinite_steps}); {trainer.divergence_advice()}")
    return (f"{prefix}: loss or gradients not finite at the end of training ({steps}); {prefix}.pt not written; "
            f"{trainer.divergence_advice()}; or set max_nonfinite_steps=0 to finish with the weights of "
            f"step {last - n}")


def early_stop_note(trainer: Trainer) -> str:
    if trainer.step >= trainer.cfg.max_steps or not trainer.plateaued():
        return ""
    return (f", stopped early: no better val_loss since step {trainer.best_step} "
            f"(early_stop_steps={trainer.cfg.early_stop_steps})")


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM / Ctrl-C ask the loop to save and exit at the end of the current step.

    A second Ctrl-C stops at once, with one line and exit status 130, even inside a save: an
    exception raised there would surface from torch.save's C++ writer as an unrelated RuntimeError
    traceback, so the process ends as a kill would (os._exit). A save cut off that way leaves its
    previous file whole (atomic_write), its temporary file is deleted at the next start, and the
    run lock is released by the kernel.
    """

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            stop_at_once()
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_at_once() -> None:
    """End the process now on a second Ctrl-C: one line (from the first rank), exit status 130."""
    # The signal may have arrived inside a write to these streams: a reentrant one must not stop the exit.
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: a second Ctrl-C stops at once; the checkpoints already saved are whole (one being "
                  "written is dropped): run the same command again to resume", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGINT)


def stop_requested(stop: StopSignals, rt: Runtime) -> bool:
    """Whether any rank received SIGTERM/SIGINT (all ranks must stop at the same step)."""
    return rt.sum([float(stop.signum is not None)])[0] > 0
