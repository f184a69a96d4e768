"""Run the training stages in order (A -> F): `python -m omni.pipeline [configs/pipeline_demo.json]`.

Builds the demo world when the config names one, then runs each stage's trainer as a subprocess
with the same command line a user would type, so every stage resumes on its own. A stage whose
final checkpoint exists with the same resolved config is skipped. The stages marked "background"
run one after another in a second lane beside the others (`BackgroundLane`; output in each one's
save_dir/pipeline.log); the pipeline waits for them before the table. A failing stage stops its
lane with its error (a background stage already started runs to its end); the other stages'
outputs stay as they are. At the end: a table per
stage (steps, wall time, final validation metrics, folder) and loss/metric curves as PNG.
SIGTERM or Ctrl-C stops the running trainers (each saves its step) and then the pipeline, with
status 128 + signal (`Children`).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from omni import checkpoint as ckpt
from omni.cli import run_cli
from omni.config import UserError, config_dict, inherits, load_config, read_json
from omni.logs import METRICS_FILE, read_records
from omni.registry import STAGES
from omni.stages import stage_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join("configs", "pipeline_demo.json")
BACKGROUND_LOG = "pipeline.log"     # a background stage's output, in its save_dir


@dataclass
class StageRun:
    letter: str
    config: str
    overrides: list[str] = field(default_factory=list)
    status: str = "pending"
    seconds: float = 0.0
    save_dir: str = ""
    steps: int = 0
    metrics: dict = field(default_factory=dict)
    background: bool = False             # the next stages start without waiting for this one
    waiter: threading.Thread | None = None
    exit_code: int = 0


def read_pipeline(path: str) -> tuple[dict, list[StageRun]]:
    spec = read_json(path, "pipeline config")
    runs = []
    for i, entry in enumerate(spec.get("stages", [])):
        letter = entry.get("stage")
        if letter not in STAGES:
            raise UserError(f"{path}: stages[{i}].stage must be one of {', '.join(STAGES)}, got {letter!r}")
        if not os.path.isfile(entry.get("config", "")):
            raise UserError(f"{path}: stages[{i}].config: file not found: {entry.get('config')}")
        overrides = entry.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f"{path}: stages[{i}].set must be a list of \"key=value\" strings")
        if not isinstance(entry.get("background", False), bool):
            raise UserError(f"{path}: stages[{i}].background must be true or false")
        runs.append(StageRun(letter, entry["config"], overrides, background=entry.get("background", False)))
    if not runs:
        raise UserError(f"{path}: no stages listed")
    return spec, runs


def is_finished(run: StageRun, resolved: dict) -> bool:
    """Final checkpoint present, training finished, and the same resolved config."""
    prefix = STAGES[run.letter].prefix
    state = ckpt.read_training_state(run.save_dir)
    saved = os.path.join(run.save_dir, "config.json")
    if not (os.path.isfile(ckpt.final_path(run.save_dir, prefix)) and state.get("finished") and os.path.isfile(saved)):
        return False
    with open(saved, encoding="utf-8") as f:
        trained = json.load(f)
    # A key added to the suite after this run was trained counts as unchanged at its default.
    defaults = config_dict(stage_class(run.letter).config_class())
    trained = {**{k: v for k, v in defaults.items() if k not in trained}, **trained}
    # An empty value is filled in by the stage from its data (Stage C's caption vocabulary, the
    # character set of Stages B and D) or from the models it loads (Stage E's image size and mels).
    # A size is only a name for architecture keys, which are compared themselves.
    config_class = stage_class(run.letter).config_class
    same = trained.keys() == resolved.keys() and all(
        v in ([], trained[k]) or (k == "charset" and v == "") or k == "size" or inherits(config_class, k, v)
        for k, v in resolved.items())
    if not same:
        print(f"stage {run.letter}: the config differs from the finished run in {run.save_dir}; "
              "its trainer decides (raise max_steps to train on, or use a new save_dir to start over)")
    return same


def best_val_metrics(save_dir: str) -> dict:
    """The validation whose weights inference loads ({prefix}_best.pt: the first lowest val_loss),
    with its step."""
    path = os.path.join(save_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return {}
    vals = [r for r in read_records(path) if r.get("split") == "val"]
    best = min(vals, key=lambda v: v.get("val_loss", float("inf")), default={})
    return {k: v for k, v in best.items() if k != "split"}


def start_stage(run: StageRun, extra: list[str], children: Children | None = None) -> None:
    """Skip the stage when it is finished, else start its trainer: its output goes to the terminal,
    or, for a background stage, to save_dir/pipeline.log. The trainer runs in a session of its own
    and is registered with `children`, which passes the pipeline's stop signals on to it."""
    cls = stage_class(run.letter)
    overrides = run.overrides + extra
    resolved = config_dict(load_config(cls.config_class, run.config, overrides))
    run.save_dir = resolved["save_dir"]
    if is_finished(run, resolved):
        run.status = "skipped (finished)"
        return
    cmd = [sys.executable, os.path.join(ROOT, STAGES[run.letter].script), "--config", run.config]
    for o in overrides:
        cmd += ["--set", o]
    output = None
    if run.background:
        os.makedirs(run.save_dir, exist_ok=True)
        output = open(os.path.join(run.save_dir, BACKGROUND_LOG), "a", encoding="utf-8")
    where = f"  (in the background; output in {run.save_dir}/{BACKGROUND_LOG})" if output else ""
    print(f"\n=== stage {run.letter}: {' '.join(cmd[1:])}{where}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT if output else None,
                            start_new_session=children is not None)
    if children is not None:
        children.add(proc)
    if output:
        output.close()       # the trainer holds its own copy

    def wait() -> None:      # in a thread, so a background stage's wall time ends when it does
        run.exit_code = proc.wait()
        run.seconds = time.perf_counter() - start
    run.waiter = threading.Thread(target=wait, daemon=True)
    run.waiter.start()


class Children:
    """The trainers the pipeline started. While installed (in the main thread), a SIGTERM or SIGINT
    the pipeline receives goes on to every running trainer (SIGHUP, a closed terminal, as SIGTERM),
    which saves its step and exits 128 + signal as it does on its own; the pipeline starts no further
    stage, waits for them and exits 128 + signal. The trainers have sessions of their own, so a
    Ctrl-C at the terminal reaches each once, through here: twice would stop them without a save.
    A SIGKILLed pipeline cannot pass anything on; its orphan trainer still holds its folder's lock,
    so a restarted pipeline's trainer on that folder stops with the lock's one-line error."""
    SIGNALS = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.signum: int | None = None
        self.previous = {}

    def __enter__(self) -> Children:
        if threading.current_thread() is threading.main_thread():     # signal handlers live there only
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        for proc in self.procs:
            self.forward(proc, signum)

    def add(self, proc: subprocess.Popen) -> None:
        self.procs.append(proc)
        if self.signum:       # the signal came while it was being started
            self.forward(proc, self.signum)

    def forward(self, proc: subprocess.Popen, signum: int) -> None:
        proc.send_signal(self.SIGNALS[signum])      # nothing when it has already been waited for


class BackgroundLane:
    """The background stages, run in a thread one after another, beside the foreground stages: on
    two cores one lane in front and one behind keeps both busy, and a second background stage (the
    vocoder after the Talker) does not take the foreground's core. A stage starts once the main loop
    has reached it and the one before it in the lane has ended well; after a failure the rest of
    the lane stays pending. `close` says no more stages come, waits, and raises what the thread raised."""

    def __init__(self, extra: list[str], children: Children):
        self.extra, self.children = extra, children
        self.reached: queue.Queue = queue.Queue()
        self.started: list[StageRun] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def reach(self, run: StageRun) -> None:
        self.reached.put(run)

    def close(self) -> None:
        self.reached.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while (run := self.reached.get()) is not None:
                if self.children.signum:
                    continue
                start_stage(run, self.extra, self.children)
                self.started.append(run)
                if run.waiter is not None:
                    run.waiter.join()
                    if run.exit_code != 0:
                        break
        except BaseException as e:      # a config error: raised again in the main thread by close()
            self.error = e


def finish_stage(run: StageRun) -> int:
    """Wait for the stage's trainer (if one was started); then read its steps and figures."""
    if run.waiter is not None:
        run.waiter.join()
        run.waiter = None
        if run.exit_code != 0:
            run.status = f"failed (exit {run.exit_code})"
            return run.exit_code
        run.status = "trained"
    run.steps = ckpt.read_training_state(run.save_dir).get("step", 0)
    run.metrics = best_val_metrics(run.save_dir)
    draw_curves(run.save_dir)
    return 0


def draw_curves(save_dir: str) -> None:
    try:
        from omni.plot import plot_run  # optional: matplotlib
    except ImportError:      # matplotlib is optional
        return
    plot_run(save_dir)


def table(runs: list[StageRun]) -> str:
    """One row per stage, then every figure of the validation whose weights infer.py loads (the best
    one, its step first): the validation split's and, on their own line, the held-out test split's."""
    rows = [("stage", "status", "steps", "wall time", "checkpoints")]
    for r in runs:
        rows.append((r.letter, r.status, str(r.steps), f"{r.seconds / 60:.1f} min" if r.seconds else "-",
                     r.save_dir or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for r in runs:
        step = [f"best step {r.metrics['step']}"] if "step" in r.metrics else []
        for split, figures in split_figures(r.metrics).items():
            cells = [f"{k} {v:.3g}" for k, v in figures.items()]
            lines += wrap(f"{r.letter} {split}:", (step if split == "val" else []) + cells)
    return "\n".join(lines)


def split_figures(metrics: dict) -> dict:
    """{"val": {name: value}, "test": {...}}: test_* names go to test, the rest to val."""
    out = {"val": {}, "test": {}}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            split = "test" if k.startswith("test_") else "val"
            out[split][k.removeprefix(f"{split}_")] = v
    return {k: v for k, v in out.items() if v}


def wrap(head: str, cells: list[str], width: int = 110) -> list[str]:
    lines, line = [], head.ljust(8)
    for cell in cells:
        if len(line) + len(cell) + 2 > width and line.strip() != head:
            lines.append(line.rstrip(", "))
            line = " " * 8
        line += cell + ", "
    return lines + [line.rstrip(", ")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=f"Run the training stages ({min(STAGES)}-{max(STAGES)}) in order.")
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every stage")
    args = p.parse_args(argv)
    spec, runs = read_pipeline(args.config)
    if spec.get("demo_dir"):
        from omni.data.demo import ensure_demo_world  # optional: only when the config names a demo world
        ensure_demo_world(spec["demo_dir"], spec.get("demo_size", "small"))
    failed = []
    with Children() as children:
        lane = BackgroundLane(args.set, children)
        try:
            for run in runs:
                if children.signum:
                    break
                if run.background:
                    lane.reach(run)
                    continue
                start_stage(run, args.set, children)
                if finish_stage(run):
                    failed.append(run)
                    break
        finally:
            lane.close()     # waits for the background stages (a failed foreground stage stops none)
        failed += [run for run in lane.started if finish_stage(run)]
    if children.signum:
        print(f"\npipeline stopped by {signal.Signals(children.signum).name}: its running stages saved their "
              "checkpoints and stopped; run the pipeline again to resume.", file=sys.stderr)
        print("\n" + table(runs))
        return 128 + children.signum
    for run in failed:
        print(f"\nstage {run.letter} failed (exit {run.exit_code}); the other stages' outputs are kept. "
              "Fix the error and run the pipeline again: it resumes there.", file=sys.stderr)
    print("\n" + table(runs))
    return failed[0].exit_code if failed else 0


if __name__ == "__main__":
    run_cli(main)
