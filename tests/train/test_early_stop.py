"""early_stop_steps: a run stops at the first validation that finds no better val_loss for that
many steps, counts as finished (the pipeline skips it, a second start does nothing), and a run
killed before that point and resumed stops at the same step."""
import json
import os

from conftest import load_pt, run_script, thinker_config, tree_bytes, write_config


def plateau_config(corpus, save_dir, **kw):
    # lr 0: the weights never move, so only the first validation (step 2) improves on the last;
    # with early_stop_steps 4 the run ends at step 6 of 20 (validation at 4: 2 steps without).
    return thinker_config(corpus, save_dir, **{"lr": 0.0, "max_steps": 20, "eval_interval": 2, "checkpoint_freq": 5,
                                               "early_stop_steps": 4, **kw})


def train(cfg, tmp_path, name, env=None):
    path = write_config(tmp_path / f"{name}.json", cfg)
    return run_script("train_text.py", "--config", path, env=env, runner=True)


def training_state(save_dir) -> dict:
    with open(os.path.join(save_dir, "training_state.json")) as f:
        return json.load(f)


def test_a_plateau_stops_the_run_at_the_first_validation_past_the_patience(corpus, tmp_path):
    cfg = plateau_config(corpus, tmp_path / "run")
    proc = train(cfg, tmp_path, "run")
    assert proc.returncode == 0, proc.stderr
    assert "stopped early: no better val_loss since step 2 (early_stop_steps=4)" in proc.stdout + proc.stderr
    state = training_state(cfg["save_dir"])
    assert (state["step"], state["best_step"], state["finished"]) == (6, 2, True)
    assert load_pt(os.path.join(cfg["save_dir"], "thinker.pt"))["step"] == 6
    # the stop saves its step even off the checkpoint grid (5, 10, ...), so nothing is lost
    assert os.path.isfile(os.path.join(cfg["save_dir"], "thinker_step_6.pt"))
    before = tree_bytes(cfg["save_dir"])
    again = train(cfg, tmp_path, "run")
    assert again.returncode == 0 and "already trained to step 6" in again.stdout + again.stderr
    assert tree_bytes(cfg["save_dir"]) == before


def test_a_run_killed_before_the_plateau_resumes_and_stops_at_the_same_step(corpus, tmp_path):
    cfg = plateau_config(corpus, tmp_path / "killed", checkpoint_freq=1)
    killed = train(cfg, tmp_path, "killed", env={"OMNI_TEST_KILL_AT_STEP": "5"})
    assert killed.returncode != 0 and training_state(cfg["save_dir"])["step"] == 5
    resumed = train(cfg, tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr
    # best_step is in the checkpoint: counting from the resumed step (5) would stop at 10
    state = training_state(cfg["save_dir"])
    assert (state["step"], state["best_step"], state["finished"]) == (6, 2, True)


def test_without_early_stop_steps_the_same_plateau_trains_to_max_steps(corpus, tmp_path):
    cfg = plateau_config(corpus, tmp_path / "off", early_stop_steps=0, max_steps=8)
    proc = train(cfg, tmp_path, "off")
    assert proc.returncode == 0, proc.stderr
    state = training_state(cfg["save_dir"])
    assert (state["step"], state["best_step"], state["finished"]) == (8, 2, True)
