"""Config values are range-checked, not only type-checked (issue 38, items 13, 5 and 7b): an impossible
value, an architecture key changed on resume, or a model too large for the machine ends in one line
naming the key, before anything is built or written."""
import dataclasses
import glob
import json
import os
import re

import pytest
import torch

from conftest import ROOT, run_script, thinker_config, write_config
from omni.audio_enc import AudioEncArch
from omni.codec import CodecArch
from omni.config import ArchError, UserError, build_config, load_config
from omni.resume_policy import arch_keys
from omni.runtime import Runtime
from omni.stages import stage_class
from omni.stages.omni_sft import OmniSFTConfig
from omni.stages.talker import TalkerConfig
from omni.stages.text import TextConfig, TextStage
from omni.talker import TalkerArch
from omni.thinker import ThinkerArch
from omni.train.loop import ResumeOptions, build_trainer, train
from omni.vision import VisionArch

CPU = Runtime(torch.device("cpu"))
TINY = ["d_model=32", "n_heads=2", "n_kv_heads=1"]


# ----------------------------------------------------------------------------- item 13: ranges
@pytest.mark.parametrize("override, message", [
    ("lr=NaN", "'lr': must be a finite number, got nan"),
    ("lr=Infinity", "'lr': must be a finite number, got inf"),
    ("lr=-1", "'lr': must be at least 0, got -1.0"),
    ("min_lr_ratio=-5", "'min_lr_ratio': must be at least 0.0, got -5.0"),
    ("weight_decay=-1", "'weight_decay': must be at least 0, got -1.0"),
    ("grad_clip=NaN", "'grad_clip': must be a finite number, got nan"),
    ("grad_clip=-1", "'grad_clip': must be at least 0, got -1.0"),
    ("dropout=1.5", "'dropout': must be less than 1.0, got 1.5"),
    ("dropout=1", "'dropout': must be less than 1.0, got 1.0"),
    ("n_heads=3", "'n_heads': must divide d_model (32), got 3"),
    ("n_heads=0", "'n_heads': must be at least 1, got 0"),
    ("n_kv_heads=0", "'n_kv_heads': must be at least 1, got 0"),
    ("n_heads=32", "'n_heads': d_model / n_heads = 1 must be even"),
    ("seq_len=0", "'seq_len': must be at least 1, got 0"),
    ("max_seq_len=0", "'max_seq_len': must be at least 1, got 0"),
    ("rope_theta=0", "'rope_theta': must be greater than 0.0, got 0.0"),
    ("vocab_size=-2", "'vocab_size': must be at least 1, got -2"),
    ("vocab_size=1099511627776", "'vocab_size': must be at most 2147483647, got 1099511627776"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(UserError, match="config key " + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TextConfig, None, [*TINY, override])


def test_kv_heads_must_divide_the_heads_and_the_shipped_configs_pass():
    with pytest.raises(ArchError, match=r"config key 'n_kv_heads': must divide n_heads \(2\), got 3"):
        load_config(TextConfig, None, [*TINY, "n_kv_heads=3"])
    stages = {"thinker": "A", "audio_enc": "B", "vision": "C", "talker": "D", "omni_sft": "E", "vocoder": "F"}
    checked = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))):
        name = os.path.basename(path).rsplit("_", 1)[0]
        if name in stages:
            load_config(stage_class(stages[name]).config_class, path)
            checked += 1
    assert checked == 11


def test_nan_in_a_config_file_is_refused_with_the_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"lr": NaN}')       # Python's json reads NaN and Infinity
    with pytest.raises(UserError, match="'lr': must be a finite number"):
        load_config(TextConfig, str(path))


@pytest.mark.parametrize("cls, values, message", [
    (VisionArch, {"vit_dim": 128, "vit_heads": 3}, r"'vit_heads': must divide vit_dim \(128\), got 3"),
    (VisionArch, {"text_dim": 96, "text_heads": 5}, r"'text_heads': must divide text_dim \(96\), got 5"),
    (VisionArch, {"image_size": 64, "patch_size": 10}, r"'image_size': must be a multiple of patch_size"),
    (VisionArch, {"dropout": -0.5}, "'dropout': must be at least 0.0"),
    (AudioEncArch, {"downsample": 3}, "'downsample': must be a power of two, got 3"),
    (AudioEncArch, {"d_model": 144, "n_heads": 5}, r"'n_heads': must divide d_model \(144\), got 5"),
    (CodecArch, {"ema_decay": 1.0}, "'ema_decay': must be less than 1.0, got 1.0"),
    (CodecArch, {"mel_std": 0}, "'mel_std': must be greater than 0.0"),
    (CodecArch, {"codebook_size": 0}, "'codebook_size': must be at least 1"),
    (TalkerArch, {"n_kv_heads": 3}, r"'n_kv_heads': must divide n_heads \(4\), got 3"),
    (TalkerArch, {"frame_dropout": 1.0}, "'frame_dropout': must be less than 1.0"),
    (ThinkerArch, {"d_model": "abc"}, "'d_model': expected int, got 'abc'"),
    (ThinkerArch, {"rope_theta": float("inf")}, "'rope_theta': must be a finite number"),
])
def test_every_arch_checks_a_checkpoint_config_and_names_the_file(cls, values, message):
    """Arch.from_config is what every loader and stage builds a network from."""
    with pytest.raises(UserError, match=f"^run/config.json: config key {message}"):
        cls.from_config(values, "run/config.json")


def test_direct_construction_is_checked_as_a_value_error():
    """Code that builds an architecture directly gets a ValueError (ArchError is both)."""
    with pytest.raises(ValueError, match="must divide d_model"):
        ThinkerArch(d_model=32, n_heads=3)


def test_a_bad_value_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, corpus):
    save_dir = tmp_path / "run"
    proc = run_script("train_text.py", "--config", write_config(tmp_path / "c.json", thinker_config(corpus, save_dir)),
                      "--set", "lr=NaN")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'lr': must be a finite number, got nan"
    assert not save_dir.exists()


# ----------------------------------------------------------------------------- item 7b: model size
def test_a_model_too_large_for_memory_is_refused_before_allocation(monkeypatch):
    with pytest.raises(UserError, match=r"^x/config.json: model too large: ThinkerArch with [\d,]+ parameters needs "
                                        r"[\d,.]+ GiB as float32, more than this machine's .*vocab_size=1073741824"):
        ThinkerArch.from_config({"vocab_size": 2**30, "d_model": 1024, "n_heads": 2, "n_kv_heads": 1}, "x/config.json")
    # the limit is the machine's memory: a small model passes, and fails under a smaller (cgroup) limit
    small = {"vocab_size": 96, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}
    assert ThinkerArch.from_config(small).vocab_size == 96
    monkeypatch.setattr("omni.config.memory_bytes", lambda: 1000)
    with pytest.raises(UserError, match="model too large"):
        ThinkerArch.from_config(small)


def test_a_stage_config_asking_for_a_huge_model_stops_in_setup(tmp_path, corpus):
    cfg = build_config(TextConfig, thinker_config(corpus, tmp_path / "run", d_model=2**20))
    with pytest.raises(UserError, match="model too large: ThinkerArch .*d_model=1048576"):
        build_trainer(TextStage(cfg, CPU), ResumeOptions(resume=False))


# ----------------------------------------------------------------------------- item 5: architecture on resume
def test_architecture_keys_come_from_the_arch_bases():
    assert arch_keys(TextConfig) == {f.name for f in dataclasses.fields(ThinkerArch)}
    assert arch_keys(TalkerConfig) == {f.name for f in dataclasses.fields(TalkerArch)} | {
        f.name for f in dataclasses.fields(CodecArch)}
    assert arch_keys(OmniSFTConfig) == frozenset()
    assert "lr" not in arch_keys(TextConfig) and "seq_len" not in arch_keys(TextConfig)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus):
    save_dir = tmp_path_factory.mktemp("arch") / "run"
    assert train(TextStage, build_config(TextConfig, thinker_config(corpus, save_dir, max_steps=6))) == 0
    return str(save_dir)


def text_cfg(corpus, save_dir, **kw):
    return build_config(TextConfig, thinker_config(corpus, save_dir, max_steps=12, **kw))


@pytest.mark.parametrize("key, value, shown", [
    ("n_heads", 1, "(2 -> 1)"),
    ("n_kv_heads", 2, "(1 -> 2)"),
    ("rope_theta", 500.0, "(10000.0 -> 500.0)"),     # the same weight shapes: once read silently
    ("d_model", 48, "(32 -> 48)"),                   # refused before the weights' size mismatch
])
def test_an_architecture_change_on_resume_is_refused(six_steps, corpus, key, value, shown):
    with pytest.raises(UserError, match=rf"config key '{key}' differs from {six_steps}/thinker_step_6.pt "
                                        rf"{re.escape(shown)}: it is an architecture key.*--init_from {six_steps}"):
        build_trainer(TextStage(text_cfg(corpus, six_steps, **{key: value}), CPU), ResumeOptions())


def test_a_changed_tokenizer_on_resume_is_refused(six_steps, corpus):
    other = os.path.join(six_steps, "tokenizer.model")
    with pytest.raises(UserError, match=r"config key 'tokenizer_model' differs .*\(''.*tokenizer.model it made"):
        build_trainer(TextStage(text_cfg(corpus, six_steps, tokenizer_model=other), CPU), ResumeOptions())


def test_the_way_out_is_init_from(six_steps, corpus, tmp_path):
    """Heads of the same shapes are refused on resume; --init_from, the way out the refusal names, takes
    the weights into a new run with them."""
    (tmp_path / "new").mkdir()
    cfg = text_cfg(corpus, tmp_path / "new", n_heads=4, n_kv_heads=2,
                   tokenizer_model=os.path.join(six_steps, "tokenizer.model"))
    with pytest.raises(UserError, match=f"config key 'n_heads' differs.*--init_from {six_steps}"):
        build_trainer(TextStage(dataclasses.replace(cfg, save_dir=six_steps, tokenizer_model=""), CPU),
                      ResumeOptions())
    trainer = build_trainer(TextStage(cfg, CPU), ResumeOptions(init_from=os.path.join(six_steps, "thinker.pt")))
    assert trainer.step == 0 and trainer.stage.modules["model"].arch.n_heads == 4


def test_the_refusal_on_the_command_line_is_one_line_and_touches_nothing(six_steps, corpus, tmp_path):
    def mtimes():       # the run's files (a lock file of the trainer's own is not one)
        return {n: os.path.getmtime(os.path.join(six_steps, n)) for n in os.listdir(six_steps) if n[0] != "."}
    before = mtimes()
    cfg = thinker_config(corpus, six_steps, max_steps=12, rope_theta=500.0)
    proc = run_script("train_text.py", "--config", write_config(tmp_path / "c.json", cfg))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: config key 'rope_theta' differs") and "--init_from" in lines[0]
    assert json.load(open(os.path.join(six_steps, "config.json")))["rope_theta"] == 10000.0
    assert mtimes() == before
