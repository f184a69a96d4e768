"""Resume is exact: a run killed at any step and started again ends bit-identical to a run that
was never interrupted (weights and optimizer state), with any num_workers and with gradient
accumulation. The matrix runs over every stage of the registry (omni/registry.py), so each one is
held to the same contract; a stage added there without a config fixture here fails the first test."""
import os
import random

import pytest
from test_audio_enc import audio_enc_config
from test_talker import tiny_stage_config as talker_config
from test_vision import vision_config
from test_vocoder import vocoder_config

from conftest import assert_same_state, load_pt, run_script, thinker_config, write_config
from omni.registry import STAGES

# stage letter -> the fixture giving its config function
CONFIG_FIXTURES = {"A": "text_stage_config", "B": "audio_stage_config", "C": "vision_stage_config",
                   "D": "talker_stage_config", "E": "omni_stage_config", "F": "vocoder_stage_config"}


def stage_case(letter: str):
    """(script, checkpoint prefix, weight keys, config fixture) of a registered stage."""
    spec = STAGES[letter]
    return spec.script, spec.prefix, list(spec.weight_keys), CONFIG_FIXTURES[letter]


def test_the_resume_matrix_holds_every_registered_stage():
    assert CONFIG_FIXTURES.keys() == STAGES.keys()


@pytest.fixture
def text_stage_config(corpus):
    return lambda save_dir, **kw: thinker_config(corpus, save_dir, **kw)


@pytest.fixture
def audio_stage_config(demo_tiny):   # dropout and SpecAugment on: RNG and augmentation restore
    return lambda save_dir, **kw: audio_enc_config(demo_tiny, save_dir, **kw)


@pytest.fixture
def vision_stage_config(demo_tiny):  # dropout and shift augmentation on
    return lambda save_dir, **kw: vision_config(demo_tiny, save_dir, **kw)


@pytest.fixture
def talker_stage_config(demo_tiny):  # dropout, EMA codebooks, dead-code restarts; codec -> Talker at step 6
    return lambda save_dir, **kw: talker_config(demo_tiny, save_dir, **kw)


@pytest.fixture
def vocoder_stage_config(demo_tiny):  # random crops from the per-sample generator
    return lambda save_dir, **kw: vocoder_config(demo_tiny, save_dir, **kw)


@pytest.fixture
def omni_stage_config(trained_stages):  # dropout, answer smoothing, transcribe; greedy QA answers in validation
    def make(save_dir, **kw):
        return {**trained_stages["E"], "save_dir": str(save_dir), "max_steps": 12, "checkpoint_freq": 3,
                "keep_last_n": 10, **kw}
    return make


def run_stage(script, cfg, tmp_path, name, env=None):
    path = write_config(tmp_path / f"{name}.json", cfg)
    return run_script(script, "--config", path, env=env, runner=True)


@pytest.fixture
def reference(tmp_path):
    """Uninterrupted runs, cached per (stage, accumulation) within a test."""
    cache = {}

    def get(stage, make_cfg, **kw):
        key = (stage, tuple(sorted(kw.items())))
        if key not in cache:
            script, prefix, _, _ = stage_case(stage)
            cfg = make_cfg(tmp_path / f"ref_{len(cache)}", **kw)
            proc = run_stage(script, cfg, tmp_path, f"ref_{len(cache)}")
            assert proc.returncode == 0, proc.stderr
            cache[key] = load_pt(os.path.join(cfg["save_dir"], f"{prefix}.pt"))
        return cache[key]
    return get


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("variant", [{}, {"num_workers": 2}, {"grad_accum_steps": 2}],
                         ids=["plain", "workers2", "accum2"])
def test_sigkill_then_resume_is_bit_identical(stage, variant, tmp_path, reference, request):
    script, prefix, keys, fixture = stage_case(stage)
    make_cfg = request.getfixturevalue(fixture)
    accum = {k: v for k, v in variant.items() if k == "grad_accum_steps"}
    expected = reference(stage, make_cfg, **accum)   # num_workers must not change the result

    cfg = make_cfg(tmp_path / "killed", **variant)
    kill_at = random.randint(cfg["checkpoint_freq"] + 1, cfg["max_steps"] - 1)
    proc = run_stage(script, cfg, tmp_path, "killed", env={"OMNI_TEST_KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -9, f"kill at step {kill_at}: {proc.stderr}"
    assert not os.path.exists(os.path.join(cfg["save_dir"], f"{prefix}.pt"))

    proc = run_stage(script, cfg, tmp_path, "killed")
    assert proc.returncode == 0, proc.stderr
    resumed_from = kill_at - kill_at % cfg["checkpoint_freq"]
    assert f"resumed from {cfg['save_dir']}/{prefix}_step_{resumed_from}.pt" in proc.stdout, \
        f"kill at step {kill_at}: {proc.stdout}"
    got = load_pt(os.path.join(cfg["save_dir"], f"{prefix}.pt"))
    assert_same_state(got, expected, keys + ["optimizer"])


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("to_workers", [False, True], ids=["main", "with_workers"])
def test_sigterm_saves_then_resume_is_bit_identical(stage, to_workers, tmp_path, reference, request):
    script, prefix, keys, fixture = stage_case(stage)
    make_cfg = request.getfixturevalue(fixture)
    # with_workers: the DataLoader workers get the signal too (pkill -f, a scheduler's group kill)
    cfg = make_cfg(tmp_path / "term", **({"num_workers": 2} if to_workers else {}))
    env = {"OMNI_TEST_SIGTERM_AT_STEP": "4", "OMNI_TEST_SIGTERM_ALL": "1" if to_workers else "0"}
    proc = run_stage(script, cfg, tmp_path, "term", env=env)
    assert proc.returncode == 128 + 15, proc.stderr
    assert "stopped by SIGTERM at step 5" in proc.stdout
    assert os.path.exists(os.path.join(cfg["save_dir"], f"{prefix}_step_5.pt"))   # 5 is off the save grid

    proc = run_stage(script, cfg, tmp_path, "term")
    assert proc.returncode == 0, proc.stderr
    assert f"{prefix}_step_5.pt at step 5" in proc.stdout
    got = load_pt(os.path.join(cfg["save_dir"], f"{prefix}.pt"))
    assert_same_state(got, reference(stage, make_cfg), keys + ["optimizer"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(stage, tmp_path, reference, request):
    script, prefix, keys, fixture = stage_case(stage)
    make_cfg = request.getfixturevalue(fixture)
    cfg = make_cfg(tmp_path / "crash")
    proc = run_stage(script, cfg, tmp_path, "crash", env={"OMNI_TEST_KILL_IN_SAVE": "9"})
    assert proc.returncode == -9
    names = os.listdir(cfg["save_dir"])
    assert f"{prefix}_step_9.pt" not in names
    assert any(n.endswith(".tmp") for n in names), names      # the half-written temp file
    load_pt(os.path.join(cfg["save_dir"], f"{prefix}_step_6.pt"))   # previous one is whole

    proc = run_stage(script, cfg, tmp_path, "crash")
    assert proc.returncode == 0, proc.stderr
    assert f"{prefix}_step_6.pt at step 6" in proc.stdout
    assert not any(n.endswith(".tmp") for n in os.listdir(cfg["save_dir"]))
    got = load_pt(os.path.join(cfg["save_dir"], f"{prefix}.pt"))
    assert_same_state(got, reference(stage, make_cfg), keys + ["optimizer"])
