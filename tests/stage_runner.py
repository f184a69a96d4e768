"""Run a trainer script exactly as its command line would, with faults injected for tests.

    python tests/stage_runner.py train_text.py --config ... [--set ...]

Environment variables (test-only; the trainers themselves have no such hooks):
  OMNI_TEST_KILL_AT_STEP=N     SIGKILL this process when step N is about to start
  OMNI_TEST_KILL_AFTER_S=T     SIGKILL this process T seconds after it starts (any instant: setup,
                               a step, validation, a save)
  OMNI_TEST_KILL_IN_EVAL=N     SIGKILL this process at the end of the validation after step N,
                               before its result is used (best checkpoint not yet written)
  OMNI_TEST_SIGTERM_AT_STEP=N  send SIGTERM to this process during step N
  OMNI_TEST_SIGTERM_ALL=1      ... and to its DataLoader workers too, as `pkill -f` or a job
                               scheduler signalling the whole process group would
  OMNI_TEST_KILL_IN_SAVE=N     SIGKILL this process halfway through writing the step-N checkpoint
  OMNI_TEST_ENOSPC_IN_SAVE=N   the disk fills up 4 KiB into the step-N checkpoint: its writes
                               raise OSError(ENOSPC), as a full filesystem's would
  OMNI_TEST_ENOSPC_IN_DCP=N    the same in the step-N DCP folder (parallel=fsdp): this rank's
                               shard writes, after a partial file, raise OSError(ENOSPC)
  OMNI_TEST_ENOSPC_IN_TRAINER_PT=N  the same in the trainer.pt of the step-N DCP folder (rank 0)
  OMNI_TEST_SIGINT_IN_SAVE=N   Ctrl-C twice halfway through writing the step-N checkpoint, as an
                               impatient user would (the second one arrives inside the save)
  OMNI_TEST_ONLY_RANK=R        under torchrun, inject the faults above into rank R only
  OMNI_TEST_LOG_BATCHES=PATH   append every training batch's sample indices this rank draws to
                               PATH.rank{RANK}, one JSON list a line

`run_forked(script, args, env)` runs the same thing in a fork of the calling process, which has
imported torch and the stages already: the kill fuzz (test_resume_fuzz.py) starts a trainer
hundreds of times and would otherwise spend most of its time importing.
"""
import errno
import json
import multiprocessing
import os
import runpy
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import omni.checkpoint as ckpt  # noqa: E402
import omni.train.loop as loop  # noqa: E402

real_train_step, real_validate, RealSampler = loop.train_step, loop.validate, loop.ResumableBatchSampler
real_save, real_atomic_write = ckpt.save, ckpt.atomic_write


def install_faults(env) -> None:
    """Patch the core with the faults that `env` (a dict like os.environ) asks for."""
    if env.get("OMNI_TEST_LOG_BATCHES"):
        log_batches(f"{env['OMNI_TEST_LOG_BATCHES']}.rank{env.get('RANK', '0')}")
    if env.get("OMNI_TEST_ONLY_RANK", env.get("RANK", "0")) != env.get("RANK", "0"):
        return
    number = lambda name: int(env.get(name, "-1"))    # noqa: E731
    kill_at, term_at, term_all = number("OMNI_TEST_KILL_AT_STEP"), number("OMNI_TEST_SIGTERM_AT_STEP"), \
        env.get("OMNI_TEST_SIGTERM_ALL") == "1"
    kill_in_save, enospc_in_save = number("OMNI_TEST_KILL_IN_SAVE"), number("OMNI_TEST_ENOSPC_IN_SAVE")
    kill_in_eval = number("OMNI_TEST_KILL_IN_EVAL")
    enospc_in_dcp, enospc_in_trainer = number("OMNI_TEST_ENOSPC_IN_DCP"), number("OMNI_TEST_ENOSPC_IN_TRAINER_PT")
    sigint_in_save = number("OMNI_TEST_SIGINT_IN_SAVE")
    if env.get("OMNI_TEST_KILL_AFTER_S"):
        timer = threading.Timer(float(env["OMNI_TEST_KILL_AFTER_S"]), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def train_step(trainer, batches):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.step == term_at:
            workers = multiprocessing.active_children() if term_all else []
            for pid in [w.pid for w in workers] + [os.getpid()]:
                os.kill(pid, signal.SIGTERM)       # handled at the end of this step
        return real_train_step(trainer, batches)

    def validate(trainer):
        metrics = real_validate(trainer)
        if trainer.step == kill_in_eval:
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics

    def save(path, payload):
        if path.endswith(f"_step_{kill_in_save}.pt"):
            def half_then_die(f):
                f.write(b"PK\x03\x04" + b"\0" * 4096)   # the start of a zip, never finished
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            ckpt.atomic_write(path, half_then_die)
        real_save(path, payload)

    def atomic_write(path, write):
        if path.endswith(f"_step_{enospc_in_save}.pt") or \
                path.endswith(f"_step_{enospc_in_trainer}.dcp.tmp/trainer.pt"):
            return real_atomic_write(path, lambda f: write(FullDisk(f)))
        if path.endswith(f"_step_{sigint_in_save}.pt"):
            return real_atomic_write(path, lambda f: write(CtrlCTwice(f)))
        return real_atomic_write(path, write)

    if enospc_in_dcp >= 0:
        full_disk_in_dcp(f"_step_{enospc_in_dcp}.dcp.tmp")

    loop.train_step, loop.validate, ckpt.save, ckpt.atomic_write = train_step, validate, save, atomic_write


def log_batches(path: str) -> None:
    class LoggedSampler(RealSampler):
        def __iter__(self):
            for batch in super().__iter__():
                with open(path, "a") as f:
                    f.write(json.dumps([i for i, _ in batch]) + "\n")
                yield batch
    loop.ResumableBatchSampler = LoggedSampler


def full_disk_in_dcp(folder_suffix: str) -> None:
    """DCP's file writer, failing in folders whose name ends with `folder_suffix` as a full disk
    would: a partial shard file, then OSError(ENOSPC) (which DCP reports from every rank)."""
    import torch.distributed.checkpoint as dcp

    class FullDiskWriter(dcp.FileSystemWriter):
        def write_data(self, plan, planner):
            if str(self.path).endswith(folder_suffix):
                with open(os.path.join(self.path, f"__{os.environ.get('RANK', '0')}_0.distcp"), "wb") as f:
                    f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write_data(plan, planner)
    dcp.FileSystemWriter = FullDiskWriter


class CtrlCTwice:
    """A file that receives two SIGINTs once 4 KiB are written: the second one inside the save."""

    def __init__(self, f, room: int = 4096):
        self.f, self.room = f, room

    def write(self, data):
        if self.room >= 0 and len(data) > self.room:
            self.room = -1
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        elif self.room >= 0:
            self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room: int = 4096):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def run(script: str, args) -> None:
    path = os.path.join(ROOT, script)
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


def run_forked(script: str, args, env: dict, log_path: str) -> int:
    """Run `script args` with the faults of `env` in a child forked from this process, its output
    going to log_path; returns its exit status (negative: killed by that signal), as subprocess does."""
    pid = os.fork()
    if pid == 0:                       # the child: never returns into the caller's code
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env)
            install_faults(env)
            run(script, args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    install_faults(os.environ)
    run(sys.argv[1], sys.argv[2:])
