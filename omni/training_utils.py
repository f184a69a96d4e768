"""The shared training core: one loop, checkpoints, resume, AMP, LR schedule, logging.

A stage (omni/stages/*.py) subclasses `Stage` and supplies what differs: its modules (saved under
their weight keys), datasets, batches and loss, and any extra validation metrics. Everything
else lives here once: see docs/training.md for the contract this file keeps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from omni import checkpoint as ckpt
from omni.config import TrainConfig, UserError, config_dict, load_config
from omni.data.sampler import ResumableBatchSampler, ShuffledBatches, mix_seed
from omni.runtime import Runtime, setup_runtime, teardown


# ----------------------------------------------------------------------------- stages
class Stage:
    """What one training stage supplies to the shared loop. Subclasses set the class attributes
    and fill `modules`, `train_data` and `val_data` in `setup()`."""
    prefix = "model"                 # checkpoint file prefix
    weight_keys = ("model",)         # the keys of `modules` that inference needs
    config_class = TrainConfig
    make_command = ""                # the command that trains this stage (for error messages)

    def __init__(self, cfg, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.modules: dict[str, torch.nn.Module] = {}   # weight key -> module, all saved
        self.train_data = self.val_data = None

    def setup(self) -> None:
        raise NotImplementedError

    def batch_plan(self):
        return ShuffledBatches(len(self.train_data), self.cfg.batch_size, self.cfg.seed)

    def collate(self, samples):
        return default_collate(samples)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Mean loss of a batch, and metrics to log (numbers; keys 'n_*' are counts summed into rates)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Validation metrics; must hold 'val_loss', which decides the best checkpoint."""
        return {"val_loss": self.mean_loss(self.val_data)}

    # Helpers for stages -----------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def eval_batches(self, dataset):
        """This rank's share of the validation set, in order, as device batches."""
        b, n = self.cfg.batch_size, len(dataset)
        batches = [[(i, 0) for i in range(s, min(s + b, n))] for s in range(0, n, b)]
        if self.cfg.eval_batches:
            batches = batches[:self.cfg.eval_batches]
        loader = make_loader(dataset, batches[self.rt.rank::self.rt.world_size], self, workers=0)
        for batch, _ in loader:
            if batch is not None:
                yield to_device(batch, self.rt.device)

    def mean_loss(self, dataset) -> float:
        total = count = 0.0
        for batch in self.eval_batches(dataset):
            with self.rt.autocast():
                loss, _ = self.loss(batch)
            n = batch_size_of(batch)
            total, count = total + loss.item() * n, count + n
        total, count = self.rt.sum([total, count])
        return total / max(count, 1)


def batch_size_of(batch) -> int:
    """Samples in a batch: a tensor's first dimension, a dict's or tuple's first entry's, a list's length."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    return batch_size_of(batch[0]) if isinstance(batch, tuple) else len(batch)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class SkipBadSamples:
    """Collate that drops samples a dataset returned as None and reports how many it dropped."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        good = [s for s in samples if s is not None]
        return (self.collate(good) if good else None), len(samples) - len(good)


def ignore_stop_signals(_worker_id: int) -> None:
    # A SIGTERM sent to the whole process group (pkill, a scheduler pre-empting the job) or Ctrl-C
    # must reach only the main process, which saves and exits; a worker killed by it would make the
    # main process fail before it can save.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, stage: Stage, workers: int | None = None) -> DataLoader:
    workers = stage.cfg.num_workers if workers is None else workers
    # A private generator: creating a loader must not draw from the global RNG, or a resumed run
    # (which creates its loader at another point) would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=SkipBadSamples(stage.collate),
                      num_workers=workers, pin_memory=stage.rt.device.type == "cuda",
                      worker_init_fn=ignore_stop_signals if workers else None,
                      generator=torch.Generator().manual_seed(stage.cfg.seed))


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
        for key, sd in ckpt.weights_of(obj, list(self.stage.modules), source).items():
            try:
                self.stage.modules[key].load_state_dict(sd)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise ckpt.CheckpointError(f"{source}: weights '{key}' do not fit this config: {first}") from None

    def restore(self, obj, source: str) -> None:
        self.load_weights(obj, source)
        try:
            self.optimizer.load_state_dict(obj["optimizer"])
            self.scheduler.load_state_dict(obj["scheduler"])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{source}: optimizer state does not fit this config: {e}") from None
        if self.scaler is not None and "scaler" in obj:
            self.scaler.load_state_dict(obj["scaler"])
        self.step, self.best_val_loss = int(obj["step"]), float(obj["best_val_loss"])
        data = obj.get("data_state", {})
        self.batches_taken = int(data.get("batches", self.step * self.cfg.grad_accum_steps))
        rt = self.stage.rt
        if not rt.restore_rng(obj.get("rng", [])) or data.get("batch_size") != self.cfg.batch_size:
            log(rt, f"warning: {source} came from another batch size or world size; "
                    "the run continues, but not exactly as an uninterrupted run would")


def _json_float(x: float):
    return x if math.isfinite(x) else None


def find_resume_checkpoint(save_dir: str, prefix: str, resume_step: int | None, rt: Runtime):
    """(path, payload) of the newest loadable checkpoint, or None when there is none at all.

    A truncated, corrupt or unsafe file is reported and skipped; if every file fails, that is
    an error: starting over silently would overwrite the run.
    """
    if resume_step is not None:
        path = ckpt.step_path(save_dir, prefix, resume_step)
        return path, ckpt.load(path)
    candidates = [(step, path, None) for step, path in ckpt.step_files(save_dir, prefix)]
    final = ckpt.final_path(save_dir, prefix)
    if os.path.isfile(final):
        try:
            obj = ckpt.load(final)
            if ckpt.kind_of(obj) == "full":
                candidates.append((int(obj["step"]), final, obj))
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


# ----------------------------------------------------------------------------- logging
def log(rt: Runtime, message: str) -> None:
    if rt.is_main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl. On resume, lines past the resumed step
    (written by the run that was cut off) are dropped so the curves have no duplicates."""

    def __init__(self, path: str, resumed_step: int, active: bool):
        self.path, self.active = path, active
        if active and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            ckpt.atomic_write(path, lambda f: f.write("".join(kept).encode()))

    def write(self, record: dict) -> None:
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


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
        found = find_resume_checkpoint(cfg.save_dir, stage.prefix, opts.resume_step, rt)
        if found:
            trainer.restore(found[1], found[0])
            log(rt, f"resumed from {found[0]} at step {trainer.step}")
    return trainer


def train(stage_class, cfg, opts: ResumeOptions = ResumeOptions()) -> int:
    """Train a stage to cfg.max_steps; returns the process exit status."""
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
    sums, skipped = {}, 0
    for _ in range(cfg.grad_accum_steps):
        batch, bad = next(batches)
        trainer.batches_taken += 1
        skipped += bad
        while batch is None:           # every sample of the batch was bad: take the next one
            batch, bad = next(batches)
            trainer.batches_taken += 1
            skipped += bad
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
    return metrics


def run_loop(trainer: Trainer) -> int:
    stage, cfg, rt = trainer.stage, trainer.cfg, trainer.stage.rt
    prefix, save_dir = stage.prefix, cfg.save_dir
    final = ckpt.final_path(save_dir, prefix)
    if trainer.step >= cfg.max_steps:
        log(rt, f"{prefix}: already trained to step {trainer.step} (max_steps={cfg.max_steps}); nothing to do")
        if not os.path.isfile(final):
            trainer.save(final)
        return 0
    sampler = ResumableBatchSampler(stage.batch_plan(), trainer.batches_taken, rt.rank, rt.world_size)
    batches = iter(make_loader(stage.train_data, sampler, stage))
    metrics_log = MetricsLog(os.path.join(save_dir, "metrics.jsonl"), trainer.step, rt.is_main)
    stop = StopSignals()
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc=prefix, dynamic_ncols=True,
               disable=True if not (rt.is_main and cfg.progress) else None)
    window, window_start, skipped_total = {}, time.perf_counter(), 0
    for m in stage.modules.values():
        m.train()
    try:
        while trainer.step < cfg.max_steps:
            metrics = train_step(trainer, batches)
            skipped_total += metrics.pop("skipped_samples")
            for key, value in metrics.items():
                window[key] = window.get(key, 0.0) + value
            window["steps"] = window.get("steps", 0) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
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
            if step % cfg.checkpoint_freq == 0 or (stopping and step < cfg.max_steps):
                trainer.save(ckpt.step_path(save_dir, prefix, step))
                if rt.is_main:
                    ckpt.keep_last(save_dir, prefix, cfg.keep_last_n)
            if stopping and step < cfg.max_steps:
                name = signal.Signals(stop.signum).name
                log(rt, f"{prefix}: stopped by {name} at step {step}; checkpoint saved; "
                        "run the same command again to resume")
                return 128 + stop.signum
    finally:
        stop.restore()
        bar.close()
    trainer.save(final)
    if skipped_total:
        log(rt, f"{prefix}: skipped {skipped_total} bad samples (set strict_data=true to stop on them)")
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
def one_line(error: Exception) -> str:
    """The user-facing line of an error; errors re-raised from DataLoader workers carry a
    traceback in their message, whose last line is the original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    if len(lines) > 1 and ": " in last and last.split(": ", 1)[0].endswith("Error"):
        last = last.split(": ", 1)[1]
    return last


def run_cli(main) -> None:
    """Run `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def trainer_main(stage_class, argv=None) -> None:
    """The command line every trainer shares (see DESIGN.md, command-line conventions)."""
    parser = argparse.ArgumentParser(description=f"Train the {stage_class.prefix} stage.")
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
