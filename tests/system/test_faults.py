"""Faults around resume that must end in one clear line and lose nothing: a config changed between
runs (applied with a log line, or refused naming the key), a disk that fills up during a save,
a checkpoint of another stage given to --init_from, and a --resume_step that does not exist.
docs/checkpoints.md ("Fault matrix") lists what each case does."""
import dataclasses
import errno
import os
import shutil

import pytest
import torch

from conftest import assert_same_state, load_pt, run_script, thinker_config, tree_bytes, write_config
from omni import checkpoint as ckpt
from omni import resume_policy
from omni.config import TrainConfig, UserError, build_config
from omni.runtime import Runtime
from omni.stages.text import TextConfig, TextStage
from omni.train.loop import ResumeOptions, build_trainer, train
from omni.train.optim import warmup_cosine

CPU = Runtime(torch.device("cpu"))


def text_cfg(corpus, save_dir, **kw):
    return build_config(TextConfig, thinker_config(corpus, save_dir, **kw))


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus):
    """A 12-step run as a kill after step 6 leaves it: step files 3 and 6 (and the best one)."""
    save_dir = tmp_path_factory.mktemp("six")
    assert train(TextStage, text_cfg(corpus, save_dir)) == 0
    for name in ("thinker.pt", "thinker_step_9.pt", "thinker_step_12.pt"):
        os.unlink(os.path.join(save_dir, name))
    return str(save_dir)


def copy_run(run, tmp_path) -> str:
    shutil.copytree(run, tmp_path / "run")
    return str(tmp_path / "run")


def snapshot(folder) -> dict:
    """Every file below folder (Stage A keeps token shards in tokens/): equal snapshots mean
    nothing was lost or touched."""
    return tree_bytes(folder)


def cli(tmp_path, cfg: dict, *args, env=None, runner=False):
    return run_script("train_text.py", "--config", write_config(tmp_path / "cfg.json", cfg), *args,
                      env=env, runner=runner)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- config changes
def test_every_train_config_key_has_a_resume_policy():
    """A new TrainConfig key must be classified in omni/resume_policy.py (and the fault matrix)."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    classes = [resume_policy.SCHEDULE, resume_policy.REFUSED, resume_policy.APPLIED]
    assert set().union(*classes) == keys, "unclassified: " + str(keys - set().union(*classes))
    assert sum(len(c) for c in classes) == len(keys), "a key is in two classes"


def test_schedule_changes_are_applied_at_the_resumed_step(six_steps, tmp_path, corpus, capsys):
    run = copy_run(six_steps, tmp_path)
    cfg = text_cfg(corpus, run, lr=1e-3, max_steps=20, warmup_steps=8, weight_decay=0.2, min_lr_ratio=0.5)
    trainer = build_trainer(TextStage(cfg, CPU), ResumeOptions())
    assert trainer.step == 6
    expected = 1e-3 * warmup_cosine(cfg)(6)       # still warming up under the new warmup_steps
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [expected, expected] == trainer.scheduler.get_last_lr()
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    trainer.scheduler.step()                     # the next step follows the new schedule too
    assert groups[0]["lr"] == 1e-3 * warmup_cosine(cfg)(7)
    out = capsys.readouterr().out
    for change in ("lr 0.003 -> 0.001", "max_steps 12 -> 20", "warmup_steps 2 -> 8", "weight_decay 0.01 -> 0.2",
                   "lr schedule rebuilt from the new config at step 6"):
        assert change in out, out


def test_adamw_settings_come_from_the_config_and_apply_on_resume(six_steps, tmp_path, corpus, capsys):
    fresh = build_trainer(TextStage(text_cfg(corpus, tmp_path / "fresh", adam_beta1=0.8, adamw_impl="loop"), CPU),
                          ResumeOptions())
    assert [(g["betas"], g["foreach"], g["fused"]) for g in fresh.optimizer.param_groups] == [((0.8, 0.95), False,
                                                                                              False)] * 2
    cfg = text_cfg(corpus, copy_run(six_steps, tmp_path), adam_beta2=0.99, adamw_impl="foreach")
    resumed = build_trainer(TextStage(cfg, CPU), ResumeOptions())      # the checkpoint holds (0.9, 0.95), auto
    assert resumed.step == 6
    assert [(g["betas"], g["foreach"]) for g in resumed.optimizer.param_groups] == [((0.9, 0.99), True)] * 2
    out = capsys.readouterr().out
    assert "adam_beta2 0.95 -> 0.99" in out and "adamw_impl 'auto' -> 'foreach'" in out, out
    with pytest.raises(UserError, match=r"config key 'adam_beta2': must be in \[0, 1\), got 1.0"):
        text_cfg(corpus, tmp_path / "bad", adam_beta2=1.0)


def test_unchanged_config_restores_the_very_same_lr(six_steps, tmp_path, corpus):
    saved = load_pt(os.path.join(six_steps, "thinker_step_6.pt"))
    trainer = build_trainer(TextStage(text_cfg(corpus, copy_run(six_steps, tmp_path)), CPU), ResumeOptions())
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in saved["optimizer"]["param_groups"]]


def test_grad_accum_change_keeps_the_data_position(six_steps, tmp_path, corpus, capsys):
    trainer = build_trainer(TextStage(text_cfg(corpus, copy_run(six_steps, tmp_path), grad_accum_steps=2), CPU),
                            ResumeOptions())
    assert trainer.step == 6 and trainer.start_batch == 6
    assert "grad_accum_steps 1 -> 2" in capsys.readouterr().out


@pytest.mark.parametrize("key,value", [("seed", 5), ("batch_size", 2)])
def test_data_order_changes_are_refused(six_steps, tmp_path, corpus, key, value):
    run = copy_run(six_steps, tmp_path)
    with pytest.raises(UserError, match=f"config key '{key}' differs from .*--init_from"):
        build_trainer(TextStage(text_cfg(corpus, run, **{key: value}), CPU), ResumeOptions())


def test_refusal_on_the_command_line_is_one_line_and_touches_nothing(six_steps, tmp_path, corpus):
    run = copy_run(six_steps, tmp_path)
    before = snapshot(run)
    proc = cli(tmp_path, thinker_config(corpus, run, batch_size=2))
    assert_one_line_error(proc, "config key 'batch_size'", "(4 -> 2)", "--init_from")
    assert snapshot(run) == before


def test_an_architecture_change_is_refused_on_resume(six_steps, tmp_path, corpus):
    with pytest.raises(UserError, match="config key 'd_model' differs from .*32 -> 48.*--init_from"):
        build_trainer(TextStage(text_cfg(corpus, copy_run(six_steps, tmp_path), d_model=48), CPU), ResumeOptions())


# ----------------------------------------------------------------------------- wrong checkpoints
def test_init_from_a_checkpoint_of_another_stage_is_one_line(six_steps, tmp_path, corpus):
    other = str(tmp_path / "talker.pt")        # a Stage D checkpoint: weight keys talker and rvq
    torch.save({"talker": {"w": torch.ones(2)}, "rvq": {"c": torch.zeros(3)}, "optimizer": {}, "step": 4,
                "best_val_loss": 1.0, "config": {}, "format_version": ckpt.FORMAT_VERSION}, other)
    run = copy_run(six_steps, tmp_path)
    before = snapshot(run)
    proc = cli(tmp_path, thinker_config(corpus, run), "--init_from", other)
    assert_one_line_error(proc, other, "not a thinker checkpoint", "['rvq', 'talker']", "['model']")
    assert snapshot(run) == before


def test_resume_step_that_does_not_exist_is_one_line(six_steps, tmp_path, corpus):
    run = copy_run(six_steps, tmp_path)
    before = snapshot(run)
    proc = cli(tmp_path, thinker_config(corpus, run), "--resume_step", "5")
    assert_one_line_error(proc, "--resume_step 5", f"thinker_step_5.pt not found in {run}", "step files there: 3, 6")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- disk full
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, corpus):
    reference = tmp_path / "ref"
    assert train(TextStage, text_cfg(corpus, reference)) == 0
    run = str(tmp_path / "full")
    cfg = thinker_config(corpus, run, num_workers=2)     # the workers must not keep the process alive
    proc = cli(tmp_path, cfg, env={"OMNI_TEST_ENOSPC_IN_SAVE": "6"}, runner=True)
    assert_one_line_error(proc, f"cannot write thinker_step_6.pt in {run}: No space left on device")
    assert "Traceback" not in proc.stdout + proc.stderr
    names = os.listdir(run)
    assert not any(n.endswith(".tmp") for n in names) and "thinker_step_6.pt" not in names, names
    assert load_pt(os.path.join(run, "thinker_step_3.pt"))["step"] == 3

    proc = cli(tmp_path, cfg)                            # space again: resumes from step 3
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {run}/thinker_step_3.pt at step 3" in proc.stdout
    assert_same_state(load_pt(os.path.join(run, "thinker.pt")), load_pt(reference / "thinker.pt"),
                      ["model", "optimizer"])


def test_a_real_full_filesystem_is_reported_with_its_folder(small_tmpfs):
    """The same on a 64 KiB tmpfs, where torch.save itself meets ENOSPC."""
    small = small_tmpfs
    ckpt.save(str(small / "a.pt"), {"w": torch.ones(10)})
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write a.pt in {small}: No space left"):
        ckpt.save(str(small / "a.pt"), {"w": torch.zeros(100_000)})
    assert os.listdir(small) == ["a.pt"] and torch.equal(load_pt(small / "a.pt")["w"], torch.ones(10))


def test_enospc_from_a_writer_becomes_the_checkpoint_error(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write x.json in {tmp_path}: No space left on device"):
        ckpt.atomic_write(str(tmp_path / "x.json"), full)
    assert os.listdir(tmp_path) == []
