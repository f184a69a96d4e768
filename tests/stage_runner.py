"""Run a trainer script exactly as its command line would, with faults injected for tests.

    python tests/stage_runner.py train_text.py --config ... [--set ...]

Environment variables (test-only; the trainers themselves have no such hooks):
  OMNI_TEST_KILL_AT_STEP=N     SIGKILL this process when step N is about to start
  OMNI_TEST_SIGTERM_AT_STEP=N  send SIGTERM to this process during step N
  OMNI_TEST_SIGTERM_ALL=1      ... and to its DataLoader workers too, as `pkill -f` or a job
                               scheduler signalling the whole process group would
  OMNI_TEST_KILL_IN_SAVE=N     SIGKILL this process halfway through writing the step-N checkpoint
"""
import multiprocessing
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import omni.checkpoint as ckpt  # noqa: E402
import omni.training_utils as tu  # noqa: E402

KILL_AT = int(os.environ.get("OMNI_TEST_KILL_AT_STEP", "-1"))
TERM_AT = int(os.environ.get("OMNI_TEST_SIGTERM_AT_STEP", "-1"))
TERM_ALL = os.environ.get("OMNI_TEST_SIGTERM_ALL") == "1"
KILL_IN_SAVE = int(os.environ.get("OMNI_TEST_KILL_IN_SAVE", "-1"))
real_train_step, real_save = tu.train_step, ckpt.save


def train_step(trainer, batches):
    if trainer.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if trainer.step == TERM_AT:
        workers = multiprocessing.active_children() if TERM_ALL else []
        for pid in [w.pid for w in workers] + [os.getpid()]:
            os.kill(pid, signal.SIGTERM)       # handled at the end of this step
    return real_train_step(trainer, batches)


def save(path, payload):
    if path.endswith(f"_step_{KILL_IN_SAVE}.pt"):
        def half_then_die(f):
            f.write(b"PK\x03\x04" + b"\0" * 4096)   # the start of a zip, never finished
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.atomic_write(path, half_then_die)
    real_save(path, payload)


tu.train_step, ckpt.save = train_step, save
script = os.path.join(ROOT, sys.argv[1])
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
