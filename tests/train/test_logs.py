"""Logs: metrics.jsonl and its TensorBoard mirror hold every step exactly once across a SIGKILL and
a resume; `log_to` is checked; progress is a bar on a terminal and plain periodic lines elsewhere."""
import glob
import io
import json
import os
import re
import sys

import pytest

from conftest import run_script, thinker_config, write_config
from omni import logs
from omni.config import UserError
from omni.stages.text import TextStage
from omni.train.main import trainer_main

PROGRESS_LINE = re.compile(r"^thinker: step (\d+)/12 \(\d+%\)  loss \d+\.\d{4}  [\d.e+]+ steps/s  eta \S+$")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, corpus):
    """A 12-step run with TensorBoard on, killed after step 8 (train records 1-8 and validations at 4
    and 8 written, checkpoints at 3 and 6), then resumed from step 6: steps 7 and 8 run twice."""
    root = tmp_path_factory.mktemp("tb")
    cfg = thinker_config(corpus, root / "run", log_to=["jsonl", "tensorboard"], progress=True)
    path = write_config(root / "run.json", cfg)
    killed = run_script("train_text.py", "--config", path, runner=True, env={"OMNI_TEST_KILL_AT_STEP": "8"})
    assert killed.returncode == -9, killed.stderr
    assert glob.glob(os.path.join(cfg["save_dir"], "tb", "events.out.tfevents.*"))
    resumed = run_script("train_text.py", "--config", path, runner=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "thinker_step_6.pt at step 6" in resumed.stdout
    return cfg, killed, resumed


def read_events(tb_dir: str) -> list[tuple[str, int, float]]:
    """Every scalar of every event file, read with TensorBoard's own loader, duplicates and all."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    found = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        for event in LegacyEventFileLoader(path).Load():
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_tensorboard_mirrors_metrics_jsonl_once_per_step_after_kill_and_resume(killed_and_resumed):
    cfg, _, _ = killed_and_resumed
    with open(os.path.join(cfg["save_dir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 8, 12]

    expected = {(f"{r['split']}/{k}", r["step"]): float(v) for r in records for k, v in r.items()
                if k not in ("step", "split") and isinstance(v, (int, float))}
    events = read_events(os.path.join(cfg["save_dir"], "tb"))
    keys = [(tag, step) for tag, step, _ in events]
    assert len(keys) == len(set(keys)), "a (tag, step) was written twice"
    assert set(keys) == set(expected)
    for tag, step, value in events:      # TensorBoard stores float32
        assert value == pytest.approx(expected[(tag, step)], rel=1e-6, abs=1e-30), (tag, step)
    assert {s for t, s in keys if t == "val/val_loss"} == {4, 8, 12}


def test_progress_in_a_pipe_is_plain_periodic_lines(killed_and_resumed):
    _, killed, resumed = killed_and_resumed
    for proc in (killed, resumed):
        assert "\r" not in proc.stdout + proc.stderr
    steps = [int(m.group(1)) for line in resumed.stdout.splitlines() if (m := PROGRESS_LINE.match(line))]
    # resumed at 6 of 12: a line as each further tenth completes (8, 9, 10, 11) and at the end
    assert steps == [8, 9, 10, 11, 12], resumed.stdout
    assert [int(m.group(1)) for line in killed.stdout.splitlines() if (m := PROGRESS_LINE.match(line))] \
        == [2, 3, 4, 5, 6, 8]


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        trainer_main(TextStage, list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_unknown_log_to_entry_is_a_one_line_error(capsys, tmp_path):
    code, err = run_main(capsys, "--set", f"save_dir={tmp_path}", "--set", 'log_to=["jsonl", "wandb"]')
    assert code == 2 and len(err) == 1, err
    assert err[0] == "error: config key 'log_to[1]': must be one of jsonl, tensorboard, got 'wandb'"


def test_missing_tensorboard_stops_before_setup_naming_the_extra(capsys, tmp_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if not installed
    cfg = thinker_config(corpus, tmp_path / "run", log_to=["jsonl", "tensorboard"])
    code, err = run_main(capsys, "--config", write_config(tmp_path / "c.json", cfg))
    assert code == 2 and len(err) == 1, err
    assert "tensorboard" in err[0] and "pip install -e '.[tensorboard]'" in err[0]
    assert not os.path.exists(tmp_path / "run")         # stopped before the stage's setup


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_every_tenth_and_every_interval():
    out, clock = io.StringIO(), FakeClock()
    p = logs.Progress(100, "job", unit="clip", stream=out, clock=clock)
    for _ in range(100):
        clock.now += 0.5
        p.update(1, loss="1.0000")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0] == "job: clip 10/100 (10%)  loss 1.0000  2 clips/s  eta 45s"
    assert lines[-1] == "job: clip 100/100 (100%)  loss 1.0000  2 clips/s  eta 0s"

    out, clock = io.StringIO(), FakeClock()
    p = logs.Progress(1000, "slow", initial=500, stream=out, interval_s=30, clock=clock)
    for _ in range(3):          # far less than a tenth, but 40 s apart: one line each
        clock.now += 40
        p.update(1)
    assert out.getvalue().splitlines() == ["slow: step 501/1000 (50%)  0.025 steps/s  eta 5h32m",
                                           "slow: step 502/1000 (50%)  0.025 steps/s  eta 5h32m",
                                           "slow: step 503/1000 (50%)  0.025 steps/s  eta 5h31m"]


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled():
    term = Terminal()
    p = logs.Progress(5, "bar", stream=term)
    for _ in range(5):
        p.update(1)
    p.close()
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()
    quiet = io.StringIO()
    p = logs.Progress(5, "off", stream=quiet, enabled=False)
    p.update(5)
    p.close()
    assert quiet.getvalue() == ""


def test_demo_world_builder_writes_plain_lines_to_a_pipe(tmp_path, capsys):
    from omni.data.demo import build_demo_world
    counts = {"images": (6, 2, 2), "text": (20, 5, 5), "asr": (4, 2, 2), "tts": (4, 2, 2),
              "speech_qa": (2, 1, 1), "image_qa": (6, 2, 2), "text_sft": (2, 1, 1)}
    build_demo_world(tmp_path / "world", size="tiny", counts=counts, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("speech: clip ")]
    assert 2 <= len(lines) <= 11 and re.search(r"\((100)%\)", lines[-1]), err


def test_missing_tensorboard_in_metrics_log_raises_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=re.escape("pip install -e '.[tensorboard]'")):
        logs.MetricsLog(str(tmp_path), 0, active=False, log_to=["tensorboard"])   # every rank checks
