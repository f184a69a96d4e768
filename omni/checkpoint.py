"""Checkpoint files: atomic writes, safe loads, discovery, keep-last-N cleanup.

The training core (omni/train/) decides *what* goes into a checkpoint and *when*; this
module owns *how* files are written, found and read. Contract (docs/checkpoints.md):

  {prefix}_step_{N}.pt   every checkpoint_freq steps, newest keep_last_n kept (0: all)
  {prefix}_step_{N}.dcp/ the same under parallel=fsdp: a torch.distributed.checkpoint folder,
                         each rank writing its shards, committed by renaming its temporary name
  {prefix}_archive_{N}.pt  a dropped step file at a multiple of archive_every, weights only
                         (never resumed from; inference, inspect and --init_from load it)
  {prefix}_best.pt       lowest validation loss so far      (never cleaned up)
  {prefix}.pt            end of training                    (never cleaned up)
  config.json, training_state.json                          (plain JSON sidecars)

Every load is `torch.load(..., weights_only=True)`: a file can hold tensors and plain Python
values only, so a checkpoint from an untrusted source cannot run code.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile

import torch

from omni.config import UserError

FORMAT_VERSION = 1
TRAINING_STATE = "training_state.json"
EXPORT_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"     # Stage A keeps its tokenizer beside its checkpoints
# The entries of a checkpoint dictionary besides the weight keys, declared once (docs/checkpoints.md).
OPTIMIZER, SCHEDULER, SCALER, RNG, DATA_STATE = "optimizer", "scheduler", "scaler", "rng", "data_state"
BEST_STEP = "best_step"        # the step of best_val_loss (early_stop_steps counts from it)
NONFINITE_STREAK = "nonfinite_streak"   # steps skipped in a row for non-finite loss or gradients (0 if absent)
STEP, BEST_VAL_LOSS, CONFIG, VERSION = "step", "best_val_loss", "config", "format_version"
RESUME_KEYS = (OPTIMIZER, SCHEDULER, SCALER, RNG, DATA_STATE, BEST_STEP, NONFINITE_STREAK)  # only resuming needs these
NON_WEIGHT_KEYS = frozenset(RESUME_KEYS + (STEP, BEST_VAL_LOSS, CONFIG, VERSION))


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or unsafe."""


def atomic_write(path: str, write) -> None:
    """Write a file so that a crash at any instant leaves either the old file or the new one.

    `write(f)` fills a temporary file in the same folder; it is flushed and fsynced, then renamed
    over `path` (rename is atomic within one filesystem), and the folder entry is fsynced. The file
    gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    A disk that is full or a folder that cannot be written raises CheckpointError naming the file,
    its folder and what to do (`write_failure`); the temporary file is removed and the file at
    `path`, if any, is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_folder(folder)
    except OSError as e:
        raise write_failure(e, path) from None


# errno -> what to do; the errors a user can fix themselves
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteFailed(CheckpointError):
    """A write failed and left the files already there untouched; `error` is its OSError."""

    def __init__(self, message: str, error: OSError):
        super().__init__(message)
        self.error = error


def write_failure(error: OSError, path: str) -> WriteFailed:
    """The one-line error of a write of `path` (a file or folder) that failed and left the files
    already there untouched: the reason, and what to do by errno (a full disk: free space; a
    folder that cannot be written: its permissions)."""
    reason = error.strerror or str(error) or type(error).__name__
    head = (f"cannot write {os.path.basename(os.path.normpath(path))} in "
            f"{os.path.dirname(os.path.abspath(path))}: {reason}; the files already there are untouched")
    if error.errno in _FULL:
        return WriteFailed(f"{head}: free space and run the same command again", error)
    if error.errno in _NOT_WRITABLE:
        return WriteFailed(f"{head}: the folder is not writable; check its permissions and run the same "
                           "command again", error)
    return WriteFailed(head, error)


def umask() -> int:
    """The process's umask, read without changing it where /proc tells it (setting it to read it
    would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def hidden_beside(target: str, suffix: str) -> str:
    """`.{name}{suffix}` in the folder of `target` (a file or folder, with or without a trailing /)."""
    target = os.path.abspath(target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{suffix}")


def aside_path(target: str) -> str:
    """Where `commit` keeps the old `target` for an instant."""
    return hidden_beside(target, ".old.tmp")


def commit(tmp: str, target: str) -> None:
    """Rename the finished file or folder `tmp` to `target` (same folder). A file replaces atomically;
    an existing folder is renamed aside (`aside_path`) first and deleted after, so a crash at any
    instant leaves the old or the new one whole, under `target`'s name or a hidden one that
    `remove_stale_temps` (checkpoint folders) or `publish` (exports) cleans up."""
    folder = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target) and not os.path.islink(target):
        old = aside_path(target)
        if os.path.lexists(old):
            remove(old)
        os.rename(target, old)
        os.rename(tmp, target)
        fsync_folder(folder)            # the new one in place for good before the old one goes
        remove(old)
    else:
        os.replace(tmp, target)
    fsync_folder(folder)


def publish(target: str, write, note=print) -> list[str]:
    """Write a file or folder whole or not at all: `write(tmp)` fills `tmp`, a hidden name beside
    `target` (`.{name}.tmp`), and returns the paths it wrote there; every file is fsynced and `tmp`
    is committed over `target` (`commit`). Returns those paths under `target`.

    What an interrupted earlier publish left is cleaned up first, with a `note` line each: its temp
    is deleted; an old one set aside is put back when `target` is missing (the crash fell between
    the two renames), else deleted. An error in `write` removes `tmp` and leaves `target` as it was;
    an OSError becomes `write_failure`'s one line.
    """
    tmp, old = hidden_beside(target, ".tmp"), aside_path(target)
    try:
        if os.path.lexists(old):
            if os.path.lexists(target):
                remove(old)
                note(f"removed {old}, left by an interrupted export")
            else:
                os.rename(old, target)
                note(f"restored {target} from {old}: the export that was replacing it was interrupted")
        if os.path.lexists(tmp):
            remove(tmp)
            note(f"removed {tmp}, left by an interrupted export")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        try:
            written = write(tmp)
            for path in _files_under(tmp):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            commit(tmp, target)
        except BaseException:
            if os.path.lexists(tmp):
                remove(tmp)
            raise
    except WriteFailed as e:            # a file inside tmp: named after the target, tmp is gone
        raise write_failure(e.error, target) from None
    except OSError as e:
        raise write_failure(e, target) from None
    return [target if p == tmp else os.path.join(target, os.path.relpath(p, tmp)) for p in written]


def _files_under(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(top, name) for top, _, names in os.walk(path) for name in names]


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _WriteErrors:
    """A file wrapper that keeps the OSError a write raised: torch.save reports it as a RuntimeError
    without errno ("unexpected pos ..."), which would hide a full disk behind a traceback."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save(path: str, payload: dict) -> None:
    def write(f):
        out = _WriteErrors(f)
        try:
            torch.save(payload, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None
    atomic_write(path, write)


def write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def remove_stale_temps(folder: str) -> None:
    """Delete temporary files and folders left by a save that was killed before its rename."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                remove(os.path.join(folder, name))


def remove(path: str) -> None:
    """Delete a checkpoint file or folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def load(path: str, map_location="cpu"):
    """Load a checkpoint safely; CheckpointError says why a file cannot be used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in reason.lower() or "unsupported global" in str(e).lower():
            reason = "refused: it holds Python objects that could run code (only tensors and plain values load)"
        raise CheckpointError(f"{path}: {reason}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt): {first}") from None


def step_path(save_dir: str, prefix: str, step: int, sharded: bool = False) -> str:
    return os.path.join(save_dir, f"{prefix}_step_{step}.{'dcp' if sharded else 'pt'}")


def best_path(save_dir: str, prefix: str) -> str:
    return os.path.join(save_dir, f"{prefix}_best.pt")


def final_path(save_dir: str, prefix: str) -> str:
    return os.path.join(save_dir, f"{prefix}.pt")


def step_files(save_dir: str, prefix: str) -> list[tuple[int, str]]:
    """(step, path) of every step checkpoint, file or sharded folder, oldest first."""
    pattern = re.compile(rf"^{re.escape(prefix)}_step_(\d+)\.(pt|dcp)$")
    if not os.path.isdir(save_dir):
        return []
    found = [(int(m.group(1)), os.path.join(save_dir, name))
             for name in os.listdir(save_dir) if (m := pattern.match(name))]
    return sorted(found)


def archive_path(save_dir: str, prefix: str, step: int) -> str:
    return os.path.join(save_dir, f"{prefix}_archive_{step}.pt")


def archive(save_dir: str, prefix: str, step: int, path: str) -> str | None:
    """Write the weights of step file `path` to its archive name; None when the file is unreadable
    (a corrupt step file has nothing worth keeping)."""
    try:
        obj = load(path)
    except CheckpointError:
        return None
    target = archive_path(save_dir, prefix, step)
    save(target, slim(obj))
    return target


def keep_last(save_dir: str, prefix: str, n: int, archive_every: int = 0) -> list[str]:
    """Delete all but the newest n step checkpoints (n = 0 keeps all; best and final never match);
    return the removed. A removed one at a multiple of `archive_every` steps is first archived."""
    removed = step_files(save_dir, prefix)[:-n] if n > 0 else []
    for step, path in removed:
        # The archive is written (atomically) before the step file goes: a crash in between
        # leaves both, and the next cleanup archives it again.
        if archive_every and step % archive_every == 0 and not os.path.isdir(path):
            archive(save_dir, prefix, step, path)      # a sharded step wrote its archive when saved
        remove(path)
    return [path for _, path in removed]


def kind_of(obj, source: str | None = None) -> str:
    """'full' (resumable), 'weights' (weights + metadata), or 'legacy' (a bare state_dict); CheckpointError
    (naming `source`, the file, when given) for anything else."""
    if isinstance(obj, dict) and VERSION in obj:
        return "full" if OPTIMIZER in obj else "weights"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "legacy"
    raise CheckpointError((f"{source}: " if source else "") + "not a checkpoint of this suite: expected a "
                          "dictionary of weights")


def weights_of(obj, weight_keys: list[str], source: str, optional: tuple = ()) -> dict[str, dict]:
    """The state_dict of every weight key (and of the optional keys present), from a full,
    weights-only or legacy checkpoint.

    A flat state_dict (legacy, or an export's tensors) carries '<key>.' prefixes on its names, or
    belongs as a whole to a single-module stage.
    """
    kind = kind_of(obj, source)
    if kind != "legacy":
        missing = [k for k in weight_keys if k not in obj]
        if missing:
            raise CheckpointError(f"{source}: missing weight key(s) {missing}; has {sorted(obj)}")
        return {k: check_state_dict(obj[k], k, source) for k in [*weight_keys, *optional] if k in obj}
    split = {k: {n[len(k) + 1:]: t for n, t in obj.items() if n.startswith(k + ".")}
             for k in [*weight_keys, *optional]}
    split = {k: sd for k, sd in split.items() if sd or k in weight_keys}
    if sum(len(sd) for sd in split.values()) == len(obj):      # every name carries a key prefix
        return split
    if len(weight_keys) == 1:
        return {weight_keys[0]: obj}
    empty = [k for k, sd in split.items() if not sd]
    raise CheckpointError(f"{source}: state_dict has no '<key>.' entries for {empty or weight_keys}")


def check_state_dict(sd, key: str, source: str) -> dict:
    """`sd` when it is a state_dict (names -> tensors), else CheckpointError naming the file and the weight
    key: a damaged or foreign file must end in one line, not in load_state_dict's traceback."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: weight key '{key}' is not a dictionary of tensors (it holds a "
                              f"{type(sd).__name__})")
    bad = next((name for name, t in sd.items() if not isinstance(t, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: weight key '{key}' is not a dictionary of tensors ('{bad}' holds a "
                              f"{type(sd[bad]).__name__})")
    return sd


def weight_entries(obj: dict, source: str) -> dict[str, dict]:
    """Every weight key of a full or weights-only checkpoint dictionary (what is not a declared non-weight
    entry) and its state_dict, each checked (`check_state_dict`)."""
    return {k: check_state_dict(v, k, source) for k, v in obj.items() if k not in NON_WEIGHT_KEYS}


def slim(obj: dict) -> dict:
    """A weights-only copy of a full checkpoint dictionary: the weights, step, best_val_loss, config
    and format version, without optimizer, scheduler, scaler, RNG and data position (about a third
    of the size). Inference, `--init_from` and inspect load it; it cannot resume a run."""
    if kind_of(obj) == "legacy":
        return obj
    return {k: v for k, v in obj.items() if k not in RESUME_KEYS}


def for_inference(save_dir: str, prefix: str) -> str | None:
    """The checkpoint to use for inference: best, else final, else the newest step file."""
    for path in (best_path(save_dir, prefix), final_path(save_dir, prefix)):
        if os.path.isfile(path):
            return path
    steps = [path for _, path in step_files(save_dir, prefix) if os.path.isfile(path)]
    return steps[-1] if steps else None


def read_training_state(save_dir: str) -> dict:
    path = os.path.join(save_dir, TRAINING_STATE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
