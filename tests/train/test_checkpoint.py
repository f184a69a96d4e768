"""The checkpoint contract: atomic saves, safe loads, fallback past bad files, cleanup, formats."""
import collections
import json
import os
import pickle

import pytest
import torch

from conftest import load_pt, run_script, thinker_config, write_config
from omni import checkpoint as ckpt
from omni.config import build_config
from omni.data.text import TokenWindows
from omni.runtime import Runtime
from omni.stages.text import TextConfig, TextStage
from omni.train import sharded
from omni.train.loop import ResumeOptions, build_trainer, train
from omni.train.state import find_resume_checkpoint


def text_cfg(corpus, save_dir, **kw):
    return build_config(TextConfig, thinker_config(corpus, save_dir, **kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A finished 12-step run with step checkpoints every 2 steps."""
    save_dir = tmp_path_factory.mktemp("trained")
    cfg = text_cfg(corpus, save_dir, checkpoint_freq=2, keep_last_n=3)
    assert train(TextStage, cfg) == 0
    return cfg


def test_keep_last_n_leaves_n_step_files_plus_best_and_final(trained):
    names = sorted(n for n in os.listdir(trained.save_dir) if n.endswith(".pt"))
    assert names == ["thinker.pt", "thinker_best.pt", "thinker_step_10.pt", "thinker_step_12.pt", "thinker_step_8.pt"]
    state = json.load(open(os.path.join(trained.save_dir, "training_state.json")))
    assert state["step"] == 12 and state["finished"] is True
    full = load_pt(os.path.join(trained.save_dir, "thinker.pt"))
    assert {"model", "optimizer", "scheduler", "step", "best_val_loss", "rng", "data_state", "config",
            "format_version"} <= set(full)
    assert "scaler" not in full            # only with fp16 AMP
    assert full["data_state"]["samples"] == 12 * full["config"]["batch_size"] and full["config"]["d_model"] == 32


def test_failed_writer_leaves_previous_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    ckpt.save(path, {"w": torch.arange(5)})

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write x.pt in {tmp_path}: disk full"):
        ckpt.save(path, {"w": torch.zeros(5)})
    assert torch.equal(ckpt.load(path)["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["x.pt"]       # no temp file left behind


def copy_run(trained, tmp_path):
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(trained.save_dir, dst)
    os.unlink(dst / "thinker.pt")                 # resume from step files, not the final file
    return str(dst)


def test_truncated_and_garbage_newest_fall_back_with_warning(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    with open(os.path.join(run, "thinker_step_12.pt"), "r+b") as f:
        f.truncate(1000)
    with open(os.path.join(run, "thinker_step_10.pt"), "wb") as f:
        f.write(os.urandom(3000))
    path, obj = find_resume_checkpoint(run, "thinker", None, Runtime(torch.device("cpu")))
    assert path.endswith("thinker_step_8.pt") and obj["step"] == 8
    out = capsys.readouterr().out
    assert "skipping" in out and "thinker_step_12.pt" in out and "thinker_step_10.pt" in out


def test_no_loadable_checkpoint_left_is_a_clear_error(trained, tmp_path, corpus):
    run = copy_run(trained, tmp_path)
    for name in os.listdir(run):
        if "_step_" in name:
            with open(os.path.join(run, name), "wb") as f:
                f.write(b"garbage")
    cfg = write_config(tmp_path / "c.json", thinker_config(corpus, run))
    proc = run_script("train_text.py", "--config", cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no loadable checkpoint in") and "--no-resume" in last
    assert "Traceback" not in proc.stderr


class Exploit:
    def __reduce__(self):
        return (open, (EXPLOIT_MARKER, "w"))


EXPLOIT_MARKER = ""


def test_pickle_that_runs_code_is_refused_and_never_runs(trained, tmp_path, capsys):
    global EXPLOIT_MARKER
    EXPLOIT_MARKER = str(tmp_path / "pwned")
    run = copy_run(trained, tmp_path)
    torch.save({"model": Exploit(), "format_version": 1}, os.path.join(run, "thinker_step_99.pt"))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(os.path.join(run, "thinker_step_99.pt"))
    path, _ = find_resume_checkpoint(run, "thinker", None, Runtime(torch.device("cpu")))
    assert path.endswith("thinker_step_12.pt")
    assert "refused" in capsys.readouterr().out
    assert not os.path.exists(EXPLOIT_MARKER)


def test_init_from_loads_any_format_with_fresh_optimizer(trained, tmp_path, corpus):
    final = load_pt(os.path.join(trained.save_dir, "thinker.pt"))
    formats = {"full": final, "weights": {k: final[k] for k in ("model", "step", "config", "format_version")},
               "legacy": final["model"]}
    for name, obj in formats.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(obj, path)
        assert ckpt.kind_of(load_pt(path)) == name
        cfg = text_cfg(corpus, tmp_path / f"init_{name}")
        trainer = build_trainer(TextStage(cfg, Runtime(torch.device("cpu"))), ResumeOptions(init_from=path))
        assert trainer.step == 0 and not trainer.optimizer.state
        for k, v in trainer.stage.modules["model"].state_dict().items():
            assert torch.equal(v, final["model"][k]), (name, k)


def test_init_from_with_wrong_shapes_names_the_key(trained, tmp_path, corpus):
    cfg = text_cfg(corpus, tmp_path / "wide", d_model=48)
    with pytest.raises(ckpt.CheckpointError, match="weights 'model' do not fit"):
        build_trainer(TextStage(cfg, Runtime(torch.device("cpu"))),
                      ResumeOptions(init_from=os.path.join(trained.save_dir, "thinker.pt")))


def test_legacy_state_dict_splits_by_key_prefix():
    flat = {"enc.w": torch.ones(2), "head.b": torch.zeros(1)}
    parts = ckpt.weights_of(flat, ["enc", "head"], "x")
    assert set(parts["enc"]) == {"w"} and set(parts["head"]) == {"b"}
    with pytest.raises(ckpt.CheckpointError, match="missing weight key"):
        ckpt.weights_of({"format_version": 1, "enc": {}}, ["enc", "head"], "x")


def test_resume_cost_does_not_grow_with_the_step(trained, tmp_path, corpus, monkeypatch):
    """Resuming at step 10*S loads no more samples than resuming at step S."""
    import shutil
    loads = []
    real = TokenWindows.__getitem__

    def counting(self, key):
        if self.seed is not None:          # the training windows, not validation
            loads.append(key)
        return real(self, key)
    monkeypatch.setattr(TokenWindows, "__getitem__", counting)
    s = 1
    run = tmp_path / "long"
    assert train(TextStage, text_cfg(corpus, run, max_steps=10 * s, checkpoint_freq=s, eval_interval=100)) == 0
    counts = {}
    for start in (s, 10 * s):
        shutil.rmtree(tmp_path / "r", ignore_errors=True)
        shutil.copytree(run, tmp_path / "r")
        loads.clear()
        cfg = text_cfg(corpus, tmp_path / "r", max_steps=start + 2, eval_interval=100)
        assert train(TextStage, cfg, ResumeOptions(resume_step=start)) == 0
        counts[start] = len(loads)
    assert counts[10 * s] <= counts[s] == 2 * cfg.batch_size


def test_parallel_fsdp_on_one_rank_writes_step_folders_whose_index_cannot_run_code(tmp_path, corpus):
    """parallel=fsdp checkpoints steps as DCP folders on any number of ranks. Their index is a pickle:
    one naming anything but DCP's own classes is refused, and the run resumes from the folder before."""
    cfg = text_cfg(corpus, tmp_path / "run", parallel="fsdp", max_steps=6, checkpoint_freq=2, keep_last_n=2)
    assert train(TextStage, cfg) == 0
    folders = sorted(n for n in os.listdir(cfg.save_dir) if n.endswith(".dcp"))
    assert folders == ["thinker_step_4.dcp", "thinker_step_6.dcp"]       # keep-last-N removed step 2's
    assert "optimizer" not in load_pt(os.path.join(cfg.save_dir, "thinker.pt"))    # weights, for inference
    global EXPLOIT_MARKER
    EXPLOIT_MARKER = str(tmp_path / "pwned")
    with open(os.path.join(cfg.save_dir, "thinker_step_6.dcp", ".metadata"), "wb") as f:
        pickle.dump(Exploit(), f)
    resumed = text_cfg(corpus, cfg.save_dir, parallel="fsdp", max_steps=7)
    trainer = build_trainer(TextStage(resumed, Runtime(torch.device("cpu"))), ResumeOptions())
    assert trainer.step == 4 and not os.path.exists(EXPLOIT_MARKER)


def test_a_sharded_step_folder_round_trips_and_names_a_truncated_shard(tmp_path):
    """omni.train.sharded on one process: save_folder writes a committed DCP folder (no temporary
    left), load_folder fills fresh modules and AdamW bit-identically, check_folder names a shard
    cut short, and read_index refuses an index naming anything but DCP's own classes."""
    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = model_and_optimizer(0)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    path = str(tmp_path / "m_step_1.dcp")
    sharded.save_folder(path, model, optimizer, {"step": 1}, Runtime(torch.device("cpu")))
    assert sorted(os.listdir(tmp_path)) == ["m_step_1.dcp"]
    extras = sharded.check_folder(path)
    assert extras["step"] == 1
    fresh, fresh_optimizer = model_and_optimizer(1)
    sharded.load_folder(path, fresh, fresh_optimizer, extras)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    for p, q in zip(fresh.parameters(), model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_optimizer.state[p][key], optimizer.state[q][key])

    shard = next(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".distcp"))
    os.truncate(shard, os.path.getsize(shard) - 1)
    with pytest.raises(ckpt.CheckpointError, match=r"shard file .*\.distcp is missing or truncated"):
        sharded.check_folder(path)
    with open(os.path.join(path, sharded.METADATA_FILE), "wb") as f:
        pickle.dump(collections.Counter(), f)
    with pytest.raises(ckpt.CheckpointError, match="refused: the index names collections.Counter"):
        sharded.read_index(path)
