"""One run per folder (omni/train/rundir.py): a second trainer on a held folder stops in one line and
touches nothing; the lock goes with its process however it ends; a fresh start moves an earlier run
aside and a --resume_step branch the old lineage's later files, so retention, resume and best only
ever see the current lineage."""
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_pt, run_script, thinker_config, tree_bytes, write_config
from omni.config import UserError, build_config
from omni.stages.text import TextConfig, TextStage
from omni.train.loop import ResumeOptions, train
from omni.train.rundir import LOCK_FILE, REPLACED_DIR

OLD_RUN = {"config.json", "metrics.jsonl", "training_state.json", "thinker.pt", "thinker_best.pt",
           "tokenizer.model", "tokens"}


def text_cfg(corpus, save_dir, **kw):
    return build_config(TextConfig, thinker_config(corpus, save_dir, **kw))


def holder(save_dir) -> dict:
    """What save_dir/.lock says ({} when it is missing or empty)."""
    try:
        with open(os.path.join(save_dir, LOCK_FILE)) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    return json.loads(text) if text.strip() else {}


def lock_is_free(save_dir) -> bool:
    with open(os.path.join(save_dir, LOCK_FILE)) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def replaced_runs(save_dir) -> list[str]:
    root = save_dir / REPLACED_DIR
    return [root / d for d in sorted(os.listdir(root))] if os.path.isdir(root) else []


def test_a_second_trainer_on_a_held_folder_exits_2_naming_the_holder_and_changes_nothing(corpus, tmp_path):
    save_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.json", thinker_config(corpus, save_dir, max_steps=100000,
                                                                checkpoint_freq=1000, eval_interval=1000))
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.Popen([sys.executable, "train_text.py", "--config", config], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: holder(save_dir).get("pid") == first.pid and (save_dir / "metrics.jsonl").is_file(),
                 "the first trainer to train")
        os.kill(first.pid, signal.SIGSTOP)       # frozen, it still holds the folder and writes nothing
        before = tree_bytes(save_dir)
        second = subprocess.run([sys.executable, "train_text.py", "--config", config], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert re.fullmatch(
            rf"error: {re.escape(str(save_dir))} is in use by another run \(pid {first.pid} on "
            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d: python\S* "
            rf"\S*train_text\.py --config {re.escape(config)}\); wait for it or stop it, or choose another "
            r"save_dir\n", second.stderr), second.stderr
        assert tree_bytes(save_dir) == before
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_released_at_a_normal_end_and_on_an_error(corpus, tmp_path):
    cfg = text_cfg(corpus, tmp_path / "run", max_steps=4)
    assert train(TextStage, cfg) == 0
    assert holder(cfg.save_dir) == {} and lock_is_free(cfg.save_dir)
    broken = text_cfg(corpus, tmp_path / "run", max_steps=8, val_file=str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="missing.txt"):
        train(TextStage, broken)
    assert holder(cfg.save_dir) == {} and lock_is_free(cfg.save_dir)


def test_a_lock_left_by_a_killed_trainer_is_taken_over_with_a_log_line(corpus, tmp_path, capsys):
    # With DataLoader workers: they outlive the killed trainer for a few seconds, without its lock.
    cfg = thinker_config(corpus, tmp_path / "run", num_workers=2)
    # Not run_script: its pipes would wait for the workers too, and a user restarts at once.
    killed = subprocess.Popen([sys.executable, "tests/stage_runner.py", "train_text.py", "--config",
                               write_config(tmp_path / "run.json", cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": ROOT, "OMNI_TEST_KILL_AT_STEP": "5"})
    assert killed.wait(timeout=300) == -9
    dead = holder(cfg["save_dir"])
    assert "train_text.py" in dead["command"] and not alive(dead["pid"]) and lock_is_free(cfg["save_dir"])
    assert train(TextStage, build_config(TextConfig, cfg)) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock left by pid {dead['pid']} " in out and "which is no longer running" in out
    assert f"resumed from {cfg['save_dir']}/thinker_step_3.pt at step 3" in out


def test_no_resume_moves_the_old_run_aside_and_a_crash_resumes_the_new_one(corpus, tmp_path, capsys):
    save_dir = tmp_path / "run"
    old = text_cfg(corpus, save_dir, checkpoint_freq=3, keep_last_n=2)
    assert train(TextStage, old) == 0
    old_files = tree_bytes(save_dir)
    assert {"thinker_step_9.pt", "thinker_step_12.pt"} <= set(old_files)
    # The new run: another seed, step files every 2 steps (keep 2), killed at step 7.
    new = thinker_config(corpus, save_dir, seed=5, max_steps=8, checkpoint_freq=2, keep_last_n=2)
    killed = run_script("train_text.py", "--config", write_config(tmp_path / "new.json", new), "--no-resume",
                        env={"OMNI_TEST_KILL_AT_STEP": "7"}, runner=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "--no-resume starts a new run at step 0; the earlier run's files (" in killed.stdout
    [moved] = replaced_runs(save_dir)
    assert set(os.listdir(moved)) == OLD_RUN | {"thinker_step_9.pt", "thinker_step_12.pt"}
    del old_files[LOCK_FILE]
    assert tree_bytes(moved) == old_files       # moved whole and unchanged, the old best too
    # Retention kept the new run's own files; its best is its own.
    assert sorted(n for n in os.listdir(save_dir) if n.startswith("thinker_step")) == \
        ["thinker_step_4.pt", "thinker_step_6.pt"]
    assert load_pt(save_dir / "thinker_best.pt")["config"]["seed"] == 5
    # The plain command resumes the new run, not the old one's step 12.
    capsys.readouterr()
    assert train(TextStage, build_config(TextConfig, new)) == 0
    assert f"resumed from {save_dir}/thinker_step_6.pt at step 6" in capsys.readouterr().out
    final = load_pt(save_dir / "thinker.pt")
    assert final["step"] == 8 and final["config"]["seed"] == 5


def test_resume_step_starts_a_branch_that_holds_only_its_own_lineage(corpus, tmp_path):
    save_dir = tmp_path / "run"
    old = text_cfg(corpus, save_dir, max_steps=40, checkpoint_freq=10, eval_interval=10, keep_last_n=0)
    assert train(TextStage, old) == 0
    old_files = tree_bytes(save_dir)
    branch = text_cfg(corpus, save_dir, max_steps=40, checkpoint_freq=10, eval_interval=10, keep_last_n=1, lr=1e-3)
    assert train(TextStage, branch, ResumeOptions(resume_step=10)) == 0
    # The folder holds the branch's lineage only: steps 0-10 of the old run, then the branch.
    assert sorted(n for n in os.listdir(save_dir) if n.endswith(".pt")) == \
        ["thinker.pt", "thinker_best.pt", "thinker_step_40.pt"]
    for name in ("thinker.pt", "thinker_best.pt", "thinker_step_40.pt"):
        obj = load_pt(save_dir / name)
        assert obj["config"]["lr"] == 1e-3 and obj["step"] >= 10, name
    with open(save_dir / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == list(range(1, 41))
    # The old lineage's files after step 10 are intact aside, with its whole log.
    [moved] = replaced_runs(save_dir)
    later = {"thinker_step_20.pt", "thinker_step_30.pt", "thinker_step_40.pt", "thinker.pt"}
    assert later <= set(os.listdir(moved))
    if os.path.isfile(moved / "thinker_best.pt"):       # the old best, unless it was at step 10
        assert load_pt(moved / "thinker_best.pt")["step"] > 10
    for name, data in tree_bytes(moved).items():
        assert data == old_files[name], name


def test_init_from_a_file_of_the_run_it_moves_aside_is_read_before_it_moves(corpus, tmp_path, capsys):
    save_dir = tmp_path / "run"
    old = text_cfg(corpus, save_dir, max_steps=4)
    assert train(TextStage, old) == 0
    tokenizer = (save_dir / "tokenizer.model").read_bytes()
    new = text_cfg(corpus, save_dir, max_steps=4, seed=5)
    assert train(TextStage, new, ResumeOptions(init_from=str(save_dir / "thinker_best.pt"))) == 0
    [moved] = replaced_runs(save_dir)
    assert f"initialised weights from {save_dir / 'thinker_best.pt'}" in capsys.readouterr().out
    assert load_pt(moved / "thinker_best.pt")["config"]["seed"] == 3       # the file it read went aside
    # The weights were trained with the old tokenizer: the new run keeps it, the moved run has a copy.
    assert (save_dir / "tokenizer.model").read_bytes() == (moved / "tokenizer.model").read_bytes() == tokenizer
    assert load_pt(moved / "thinker.pt")["config"]["seed"] == 3
    assert load_pt(save_dir / "thinker.pt")["config"]["seed"] == 5
