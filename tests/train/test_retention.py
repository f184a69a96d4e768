"""Checkpoint retention: keep_last_n 0 keeps every step file, checkpoint_freq 0 writes only best and
final (a stop still saves), archive_every keeps slimmed step files that resume never picks; and the
pipeline still skips a stage finished before these keys existed."""
import json
import os

import pytest
import torch

from conftest import assert_same_state, load_pt, run_script, thinker_config, write_config
from omni import checkpoint as ckpt
from omni.config import UserError, build_config, config_dict
from omni.inspect import describe
from omni.pipeline import StageRun, is_finished
from omni.runtime import Runtime
from omni.stages.text import TextConfig, TextStage
from omni.train.loop import ResumeOptions, build_trainer, train
from omni.train.state import find_resume_checkpoint

CPU = Runtime(torch.device("cpu"))


def text_cfg(corpus, save_dir, **kw):
    return build_config(TextConfig, thinker_config(corpus, save_dir, **kw))


def pt_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """The same 12-step run twice, step files every 2 steps: once keeping all of them, once keeping 2
    and archiving those at multiples of 4."""
    root = tmp_path_factory.mktemp("retention")
    keep_all = text_cfg(corpus, root / "all", checkpoint_freq=2, keep_last_n=0)
    archived = text_cfg(corpus, root / "archived", checkpoint_freq=2, keep_last_n=2, archive_every=4)
    assert train(TextStage, keep_all) == 0 and train(TextStage, archived) == 0
    return keep_all, archived


def test_keep_last_n_zero_keeps_every_step_file(runs):
    keep_all, _ = runs
    assert pt_files(keep_all.save_dir) == ["thinker.pt", "thinker_best.pt"] + [
        f"thinker_step_{s}.pt" for s in (10, 12, 2, 4, 6, 8)]


def test_archive_every_keeps_slim_weights_of_dropped_multiples(runs):
    keep_all, archived = runs
    assert pt_files(archived.save_dir) == ["thinker.pt", "thinker_archive_4.pt", "thinker_archive_8.pt",
                                           "thinker_best.pt", "thinker_step_10.pt", "thinker_step_12.pt"]
    for step in (4, 8):
        arch = load_pt(ckpt.archive_path(archived.save_dir, "thinker", step))
        full = load_pt(ckpt.step_path(keep_all.save_dir, "thinker", step))   # the identical run's step file
        assert ckpt.kind_of(arch) == "weights" and not set(arch) & set(ckpt.RESUME_KEYS)
        assert arch["step"] == step and arch["config"]["archive_every"] == 4
        assert all(torch.equal(arch["model"][k], v) for k, v in full["model"].items())
        size = os.path.getsize(ckpt.archive_path(archived.save_dir, "thinker", step))
        assert size < 0.5 * os.path.getsize(ckpt.step_path(keep_all.save_dir, "thinker", step))


def test_archives_load_for_inspect_and_init_from_but_never_resume(runs, tmp_path, corpus):
    _, archived = runs
    path = ckpt.archive_path(archived.save_dir, "thinker", 8)
    info = describe(path)
    assert info["format"] == "weights-only" and info["step"] == 8 and info["training_state"] == []
    trainer = build_trainer(TextStage(text_cfg(corpus, tmp_path / "init"), CPU), ResumeOptions(init_from=path))
    assert trainer.step == 0
    saved = load_pt(path)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.stage.modules["model"].state_dict().items())

    for name in pt_files(archived.save_dir):       # leave only the archives
        if "_archive_" not in name:
            os.unlink(os.path.join(archived.save_dir, name))
    assert find_resume_checkpoint(archived.save_dir, "thinker", None, CPU) is None
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        find_resume_checkpoint(archived.save_dir, "thinker", 8, CPU)


def test_keep_last_is_exact_and_archiving_survives_a_crash_between_its_two_writes(tmp_path):
    def full(step):
        return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}}, "step": step,
                "best_val_loss": 1.0, "config": {}, "format_version": ckpt.FORMAT_VERSION}
    for step in range(1, 11):
        ckpt.save(ckpt.step_path(str(tmp_path), "p", step), full(step))
    ckpt.save(ckpt.archive_path(str(tmp_path), "p", 5), {"stale": torch.zeros(1)})   # a crash left both
    removed = ckpt.keep_last(str(tmp_path), "p", 3, archive_every=5)
    assert [s for s, _ in ckpt.step_files(str(tmp_path), "p")] == [8, 9, 10]
    assert len(removed) == 7 and pt_files(tmp_path) == ["p_archive_5.pt", "p_step_10.pt", "p_step_8.pt",
                                                         "p_step_9.pt"]
    assert torch.equal(load_pt(tmp_path / "p_archive_5.pt")["model"]["w"], torch.full((3,), 5.0))
    assert ckpt.keep_last(str(tmp_path), "p", 0, archive_every=5) == []


def test_checkpoint_freq_zero_writes_only_best_and_final_and_a_stop_still_saves(tmp_path, corpus):
    cfg = thinker_config(corpus, tmp_path / "run", checkpoint_freq=0, max_steps=10)
    path = write_config(tmp_path / "c.json", cfg)
    proc = run_script("train_text.py", "--config", path, runner=True, env={"OMNI_TEST_SIGTERM_AT_STEP": "4"})
    assert proc.returncode == 143 and "stopped by SIGTERM at step 5" in proc.stdout
    assert pt_files(cfg["save_dir"]) == ["thinker_best.pt", "thinker_step_5.pt"]

    # SIGKILL: the run restarts from the newest full file: the step file the SIGTERM left, or the
    # best file when a validation after it improved (best files hold the whole state of their step)
    proc = run_script("train_text.py", "--config", path, runner=True, env={"OMNI_TEST_KILL_AT_STEP": "8"})
    assert proc.returncode == -9 and "thinker_step_5.pt at step 5" in proc.stdout
    best_step = load_pt(os.path.join(cfg["save_dir"], "thinker_best.pt"))["step"]
    assert best_step in (4, 8)             # validations at steps 4 and 8
    newest = "thinker_best.pt at step 8" if best_step == 8 else "thinker_step_5.pt at step 5"
    proc = run_script("train_text.py", "--config", path, runner=True)
    assert proc.returncode == 0 and newest in proc.stdout, proc.stdout + proc.stderr
    assert pt_files(cfg["save_dir"]) == ["thinker.pt", "thinker_best.pt", "thinker_step_5.pt"]
    with open(os.path.join(cfg["save_dir"], "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == list(range(1, 11))
    whole = thinker_config(corpus, tmp_path / "whole", checkpoint_freq=0, max_steps=10)
    assert train(TextStage, build_config(TextConfig, whole)) == 0      # never interrupted: same weights
    assert_same_state(load_pt(os.path.join(cfg["save_dir"], "thinker.pt")),
                      load_pt(os.path.join(whole["save_dir"], "thinker.pt")), ["model", "optimizer"])

    fresh = thinker_config(corpus, tmp_path / "fresh", checkpoint_freq=0, max_steps=6)
    assert train(TextStage, build_config(TextConfig, fresh)) == 0
    assert pt_files(fresh["save_dir"]) == ["thinker.pt", "thinker_best.pt"]


@pytest.mark.parametrize("keys, named", [
    ({"archive_every": 5, "checkpoint_freq": 2}, "archive_every"),
    ({"archive_every": 4, "checkpoint_freq": 0}, "archive_every"),
    ({"keep_last_n": -1}, "keep_last_n"),
    ({"checkpoint_freq": -2}, "checkpoint_freq"),
])
def test_bad_retention_values_name_the_key(keys, named):
    with pytest.raises(UserError, match=f"'{named}'"):
        build_config(TextConfig, keys)


def test_pipeline_skips_a_stage_finished_before_the_new_keys_existed(tmp_path):
    resolved = config_dict(build_config(TextConfig, {"save_dir": str(tmp_path)}))
    old = {k: v for k, v in resolved.items() if k not in ("log_to", "archive_every")}
    ckpt.write_json(str(tmp_path / "config.json"), old)
    ckpt.write_json(str(tmp_path / ckpt.TRAINING_STATE), {"step": 5, "finished": True})
    open(ckpt.final_path(str(tmp_path), "thinker"), "wb").close()
    run = StageRun("A", "unused.json", save_dir=str(tmp_path))
    assert is_finished(run, resolved)
    assert not is_finished(run, {**resolved, "archive_every": resolved["checkpoint_freq"]})
