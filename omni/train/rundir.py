"""The run folder: one run per save_dir, and one lineage per run folder (docs/training.md, "One run
per folder").

- `RunLock`: `save_dir/.lock`, held with flock(2) for the trainer's whole life. The kernel drops it
  when the process ends, however it ends (SIGKILL too), so a lock file left behind by a dead process
  is simply taken over, with a log line naming it. A second trainer on the folder stops with one
  line naming the holder (pid, host, start time, command), before it touches anything.
- `claim` / `start_branch`: a fresh start (`--no-resume`, `--init_from`) moves the folder's earlier run files
  into `save_dir/replaced/<YYYYmmdd-HHMMSS>/`; `--resume_step N` moves there what the old lineage
  wrote after step N. Nothing is deleted, and resume, keep-last-N and best only ever see the
  current lineage.

Readers (evaluate, infer, inspect, export) take no lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time

from omni import checkpoint as ckpt
from omni.config import UserError
from omni.data.shards import TOKENS_DIR
from omni.logs import METRICS_FILE, TB_DIR, log
from omni.train.state import check_stage_of

LOCK_FILE = ".lock"
REPLACED_DIR = "replaced"
CONFIG_FILE = "config.json"
# Files a stage writes beside its checkpoints that belong to its run (omni/stages/text.py: the
# tokenizer it trained and the token shards made with it).
SIDECARS = {"thinker": (ckpt.TOKENIZER_FILE, TOKENS_DIR)}


class FolderInUse(UserError):
    """save_dir is held by another live run."""


# The lock fds this process holds. A forked child (a DataLoader worker, a process pool) closes its
# copies at once: a flock belongs to the open file, so a worker outliving a SIGKILLed trainer for
# the seconds it takes to notice would otherwise keep the folder locked.
HELD: set[int] = set()


def _forget_locks_in_child() -> None:
    for fd in HELD:
        os.close(fd)
    HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


# ----------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive flock on save_dir/.lock. The file holds the holder's description while it is
    held and is emptied on a clean release; a non-empty file that can be locked was left by a
    process that died (the kernel released its lock)."""

    def __init__(self, save_dir: str, fd: int):
        self.save_dir, self.fd = save_dir, fd

    @classmethod
    def acquire(cls, save_dir: str, rt=None) -> RunLock:
        """Take the folder's lock, or raise FolderInUse naming its holder; changes no file then."""
        path = os.path.join(save_dir, LOCK_FILE)
        try:
            os.makedirs(save_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)    # never truncated before the lock is ours
        except OSError as e:
            raise UserError(f"cannot create the run lock {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {path}: {e.strerror or e}") from None
            raise FolderInUse(f"{save_dir} is in use by another run ({describe(holder)}); "
                              "wait for it or stop it, or choose another save_dir") from None
        stale = read_holder(fd)
        if stale and rt is not None:
            log(rt, f"{save_dir}: taking over the lock left by pid {stale.get('pid', '?')} "
                    f"({describe(stale)}), which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me()) + "\n").encode(), 0)
        HELD.add(fd)
        return cls(save_dir, fd)

    def release(self) -> None:
        """Empty the file (a clean end leaves nothing to take over) and unlock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def me() -> dict:
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_holder(fd: int) -> dict:
    """What the lock file says about its holder ({} when empty; {"command": text} when unparsable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return {}
    if not text:
        return {}
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {"command": text}
    except ValueError:
        return {"command": text[:300]}


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return f"holder unknown: {holder['command']}" if holder.get("command") else "holder unknown"
    return (f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def claim(save_dir: str, spec, opts, rt) -> tuple[RunLock | None, dict | None]:
    """What a trainer does to its folder before the stage is set up: take the lock, clear temporary
    files of killed saves, and, for a fresh start, move the earlier run aside. --init_from's file is
    read and checked first, on every rank: a wrong one stops the run before the folder changes, and
    one that lay in the folder is not looked for after it moved. Returns the lock (None off the main
    rank) and --init_from's dictionary (None without it)."""
    init = None
    if opts.init_from:
        init = ckpt.load(opts.init_from)
        check_stage_of(init, list(spec.weight_keys), spec.prefix, opts.init_from)
    fresh = bool(opts.init_from) or (not opts.resume and opts.resume_step is None)
    held = []

    def prepare():
        held.append(RunLock.acquire(save_dir, rt))
        ckpt.remove_stale_temps(save_dir)     # only now: they may be a live run's saves in progress
        if fresh:
            move_old_run(save_dir, spec.prefix, bool(opts.init_from), rt)
    try:
        on_main(rt, prepare, f"cannot set up the run folder {save_dir}")
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return (held[0] if held else None), init


def on_main(rt, action, failing: str):
    """Run action() on the main rank, every rank learning whether it failed, so none waits at a
    collective for a rank that left: the main rank raises the error (an OSError as a UserError
    starting with `failing`), the others exit 2 (rank 0 printed why). Returns action's result on
    the main rank, None elsewhere."""
    result, error = None, None
    if rt.is_main:
        try:
            result = action()
        except OSError as e:
            error = UserError(f"{failing}: {e.strerror or e}")
        except BaseException as e:      # every rank must hear of it, whatever it is
            error = e
    if rt.sum([float(error is not None)])[0] > 0:
        if error is not None:
            raise error
        raise SystemExit(2)
    return result


# ----------------------------------------------------------------------------- the lineage
def run_files(save_dir: str, prefix: str) -> list[str]:
    """Names of the stage's run files present in save_dir (checkpoints, logs, sidecars)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(step|archive)_\d+\.(pt|dcp)$")
    fixed = {f"{prefix}_best.pt", f"{prefix}.pt", METRICS_FILE, ckpt.TRAINING_STATE, CONFIG_FILE, TB_DIR,
             *SIDECARS.get(prefix, ())}
    return sorted(n for n in os.listdir(save_dir) if pattern.match(n) or n in fixed)


def move_old_run(save_dir: str, prefix: str, init_from: bool, rt) -> None:
    """A fresh start: the earlier run's files go aside, when there are checkpoints or logs of one
    (sidecars alone are kept). --init_from keeps the tokenizer and token shards (its weights were
    trained with them; the moved run gets a copy of the tokenizer)."""
    sidecars = SIDECARS.get(prefix, ())
    names = run_files(save_dir, prefix)
    if not [n for n in names if n not in sidecars]:
        return
    kept = [n for n in names if n in sidecars] if init_from else []
    target = replaced_dir(save_dir)
    for name in names:
        if name not in kept:
            os.rename(os.path.join(save_dir, name), os.path.join(target, name))
        elif os.path.isfile(os.path.join(save_dir, name)):
            shutil.copy2(os.path.join(save_dir, name), os.path.join(target, name))
    option = "--init_from" if init_from else "--no-resume"
    moved = ", ".join(n for n in names if n not in kept)
    log(rt, f"{prefix}: {option} starts a new run at step 0; the earlier run's files ({moved}) moved to {target}"
            + (f" ({', '.join(kept)} kept for the weights it loads)" if kept else ""))


def start_branch(trainer, step: int) -> None:
    """--resume_step N, once step N is restored: the old lineage's files after step N go aside (a
    copy of metrics.jsonl and training_state.json with them; the run then trims metrics.jsonl to
    step N as any resume does). A refused resume has moved nothing."""
    cfg, rt, prefix = trainer.cfg, trainer.stage.rt, trainer.stage.spec.prefix
    moved = on_main(rt, lambda: move_after(cfg.save_dir, prefix, step, rt),
                    f"cannot move the old lineage's files in {cfg.save_dir} aside")
    if rt.sum([float(bool(moved) and ckpt.best_path(cfg.save_dir, prefix) in moved)])[0] > 0:
        restore_branch_best(trainer)


def move_after(save_dir: str, prefix: str, step: int, rt) -> list[str]:
    """Move the files of the lineage in save_dir that lie after `step` aside; returns their paths."""
    later = [path for s, path in files_by_step(save_dir, prefix) if s > step]
    for path in (ckpt.final_path(save_dir, prefix), ckpt.best_path(save_dir, prefix)):
        if os.path.isfile(path) and step_of(path) > step:
            later.append(path)
    if not later:
        return []
    target = replaced_dir(save_dir)
    for path in later:
        os.rename(path, os.path.join(target, os.path.basename(path)))
    for name in (METRICS_FILE, ckpt.TRAINING_STATE):
        if os.path.isfile(os.path.join(save_dir, name)):
            shutil.copy2(os.path.join(save_dir, name), os.path.join(target, name))
    names = sorted(os.path.basename(p) for p in later)
    log(rt, f"{prefix}: --resume_step {step} starts a branch; the old lineage's files after step {step} "
            f"({', '.join(names)}) and a copy of its logs moved to {target}")
    return later


def restore_branch_best(trainer) -> None:
    """After a branch moved the old lineage's later best aside: when the resumed step's own
    validation is this lineage's best, its state is the best file (saved again as {prefix}_best.pt);
    otherwise the branch's next better validation writes one."""
    prefix, rt = trainer.stage.spec.prefix, trainer.stage.rt
    if trainer.best_step == trainer.step:
        trainer.save(ckpt.best_path(trainer.cfg.save_dir, prefix))
        log(rt, f"{prefix}: {prefix}_best.pt is this lineage's best again (step {trainer.step})")
    else:
        log(rt, f"{prefix}: this lineage's best (step {trainer.best_step}) is no longer in the folder; "
                f"the branch's first better validation writes {prefix}_best.pt")


def files_by_step(save_dir: str, prefix: str) -> list[tuple[int, str]]:
    """(step, path) of every step file or folder and every archive."""
    pattern = re.compile(rf"^{re.escape(prefix)}_archive_(\d+)\.pt$")
    archives = [(int(m.group(1)), os.path.join(save_dir, n)) for n in os.listdir(save_dir) if (m := pattern.match(n))]
    return ckpt.step_files(save_dir, prefix) + archives


def step_of(path: str) -> float:
    """The step a checkpoint file was saved at; an unreadable one counts as after every step (it is
    moved aside with the files of the old lineage, not deleted)."""
    try:
        obj = ckpt.load(path)
        return int(obj[ckpt.STEP]) if isinstance(obj, dict) and ckpt.STEP in obj else float("inf")
    except ckpt.CheckpointError:
        return float("inf")


def replaced_dir(save_dir: str) -> str:
    """A new save_dir/replaced/<YYYYmmdd-HHMMSS>[-k]/ folder."""
    base = os.path.join(save_dir, REPLACED_DIR, time.strftime("%Y%m%d-%H%M%S"))
    for k in range(1, 1000):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot make a new folder under {os.path.join(save_dir, REPLACED_DIR)}")
