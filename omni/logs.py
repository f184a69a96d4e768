"""What a run tells its user: messages, the metrics record, the TensorBoard mirror, progress.

- `log(rt, message)`: one line on stdout from rank 0 (drawn above a progress bar, if any).
- `MetricsLog`: `{save_dir}/metrics.jsonl` is the record of a run, one JSON object a line. It is
  always written (the pipeline's table, the curves and the TensorBoard mirror read it). With
  "tensorboard" in `log_to`, the same records also go to event files under `{save_dir}/tb`.
  On resume, records past the resumed step (written by the run that was cut off) are dropped from
  metrics.jsonl, and the event files are replaced by one rebuilt from the trimmed metrics.jsonl,
  so neither log holds a step twice. `read_records` is its one reader: a line that is not a whole
  record (the torn last line of an append cut by a full disk or a crash) is dropped with a note.
- `Progress`: a tqdm bar when its stream is a terminal; otherwise (a pipe, `make demo > log`) a
  plain line every tenth of the work or every 30 s, with no carriage returns.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm

from omni import checkpoint as ckpt
from omni.config import UserError

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
EVENT_PREFIX = "events.out.tfevents."


def log(rt, message: str) -> None:
    if rt.is_main:
        note(message)


# ----------------------------------------------------------------------------- metrics
def summary_writer_class():
    """torch's TensorBoard SummaryWriter, or a UserError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except ImportError:
        raise UserError("config key 'log_to': 'tensorboard' needs the tensorboard package: "
                        "pip install -e '.[tensorboard]'") from None
    return SummaryWriter


def note(message: str) -> None:
    """A line on stdout from whoever calls it (drawn above a progress bar, if any)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def read_records(path: str, on_bad=note) -> list[dict]:
    """The records of a metrics.jsonl, in order. A line that is not a JSON object with an integer
    "step" is dropped and `on_bad` told, naming the file and line: the last line is torn when an
    append was cut off (a full disk, a kill); any other is damaged."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            what = "a torn last line" if number == len(lines) else "a line that is not a metrics record"
            on_bad(f"{path}: dropped {what} (line {number})")
    return records


def scalars(record: dict) -> dict[str, float]:
    """TensorBoard tag -> value of one metrics.jsonl record: '{split}/{key}' for each number."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class MetricsLog:
    """metrics.jsonl, trimmed to the resumed step, and its TensorBoard mirror (see the module doc).
    Only the main rank writes (`active`); every rank checks that TensorBoard can be imported, so a
    missing package stops all ranks alike."""

    def __init__(self, save_dir: str, resumed_step: int, active: bool, log_to=("jsonl",)):
        self.path, self.active, self.writer = os.path.join(save_dir, METRICS_FILE), active, None
        writer_class = summary_writer_class() if "tensorboard" in log_to else None
        if not active:
            return
        kept = []
        if os.path.isfile(self.path):
            kept = [r for r in read_records(self.path) if r["step"] <= resumed_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            ckpt.atomic_write(self.path, lambda f: f.write(text.encode()))
        if writer_class is not None:
            self.writer = self._rebuild_events(os.path.join(save_dir, TB_DIR), kept, writer_class)

    @staticmethod
    def _rebuild_events(tb_dir: str, records: list[dict], writer_class):
        # Old event files may hold steps past the resume point (TensorBoard cannot delete events),
        # so they are replaced by one file replaying the kept records. A crash in between is
        # harmless: the next start rebuilds from metrics.jsonl again.
        if os.path.isdir(tb_dir):
            for name in os.listdir(tb_dir):
                if name.startswith(EVENT_PREFIX):
                    os.unlink(os.path.join(tb_dir, name))
        writer = writer_class(log_dir=tb_dir)
        for record in records:
            for tag, value in scalars(record).items():
                writer.add_scalar(tag, value, record["step"])
        writer.flush()
        return writer

    def write(self, record: dict) -> None:
        """Append one record. A write that fails (a full disk) cuts the file back to its length
        before it, so no torn line is left, and raises `ckpt.write_failure`'s one line."""
        if not self.active:
            return
        line = (json.dumps(record) + "\n").encode()
        try:
            append_whole(self.path, line)
        except OSError as e:
            raise ckpt.write_failure(e, self.path) from None
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()          # a live TensorBoard sees each record as it comes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def append_whole(path: str, data: bytes) -> None:
    """Append `data` to `path`, or on an OSError truncate the file back to where it ended (when
    that is possible) and re-raise. Unbuffered, so nothing half-written is flushed again later."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass            # then read_records drops the torn line at the next start
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- progress
def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or closed
        return False


def duration(seconds: float) -> str:
    """Short human duration: 45s, 4m05s, 2h03m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress through `total` units: a tqdm bar on a terminal, periodic plain lines elsewhere.

    A line is written when a further tenth of `total` is done, when `interval_s` seconds passed
    since the last line, and at the end:
        thinker: step 300/1000 (30%)  loss 2.3456  4.12 steps/s  eta 2m50s
    Rate and eta count only the units done since this object was made (a resumed run's start
    does not inflate them). `enabled=False` shows nothing.
    """

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream=None, interval_s: float = 30.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stdout
        self.interval_s, self.clock = interval_s, clock
        self.lines = enabled and not is_terminal(self.stream)
        self.bar = None
        if enabled and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        self.start_n, self.start_t = initial, clock()
        self.last_t, self.last_tenth = self.start_t, self._tenth(initial)

    def _tenth(self, n: int) -> int:
        return n * 10 // max(self.total, 1)

    def update(self, n: int = 1, **postfix: str) -> None:
        """Advance by n; `postfix` (name -> formatted value) is shown beside the count."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        if not self.lines:
            return
        now, tenth = self.clock(), self._tenth(self.n)
        if tenth > self.last_tenth or now - self.last_t >= self.interval_s:
            self.last_t, self.last_tenth = now, tenth
            self.stream.write(self.line(now, postfix) + "\n")
            self.stream.flush()

    def line(self, now: float, postfix: dict) -> str:
        rate = (self.n - self.start_n) / max(now - self.start_t, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%)"]
        parts += [f"{k} {v}" for k, v in postfix.items()]
        parts += [f"{rate:.3g} {self.unit}s/s", f"eta {duration(eta)}"]
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
