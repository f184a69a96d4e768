"""A diverged run never saves non-finite weights nor exits 0 (docs/training.md, "Non-finite loss or
gradients"): non-finite steps are skipped and counted, max_nonfinite_steps of them in a row stop the
run with one line naming the steps, and the count survives a resume.

Run as a script, this file is a trainer runner with non-finite values injected (the trainers have no
such hooks), on top of tests/stage_runner.py's faults:

    python tests/system/test_divergence.py train_text.py --config ... [--set ...]

  OMNI_TEST_NAN_LOSS=STEPS     the loss of these steps is NaN (and so are their gradients)
  OMNI_TEST_NAN_GRAD=STEPS     the loss of these steps is finite, their gradients NaN
  OMNI_TEST_NAN_WEIGHTS=STEPS  a weight turns NaN after these steps (as a finite but huge update can)

STEPS: "5" or "5,9" or "7-" (from step 7 on); steps count from 1, as `trainer.step` after the step.
"""
import json
import os
import re
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # conftest.py and stage_runner.py
sys.path.insert(0, TESTS)

from conftest import assert_same_state, load_pt, run_script, thinker_config, write_config  # noqa: E402


# ----------------------------------------------------------------------------- the injecting runner
def parse_steps(text: str):
    """'5', '5,9' or '7-' -> a predicate on step numbers."""
    if text.endswith("-"):
        return lambda step: step >= int(text[:-1])
    steps = {int(s) for s in text.split(",") if s}
    return lambda step: step in steps


class NanGrad(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def install_nonfinite(env) -> None:
    import omni.train.loop as loop
    from omni.stages.text import TextStage
    nan_loss, nan_grad, nan_weights = (parse_steps(env.get(f"OMNI_TEST_NAN_{k}", "")) for k in
                                       ("LOSS", "GRAD", "WEIGHTS"))
    inner_step, inner_loss, current = loop.train_step, TextStage.loss, {"step": None}

    def train_step(trainer, batches):
        current["step"] = trainer.step + 1          # validation's losses are left alone
        try:
            out = inner_step(trainer, batches)
        finally:
            current["step"] = None
        if nan_weights(trainer.step):
            with torch.no_grad():
                trainer.stage.parameters()[0].fill_(float("nan"))
        return out

    def loss(self, batch):
        value, metrics = inner_loss(self, batch)
        step = current["step"]
        if step is not None and nan_loss(step):
            value = value * float("nan")
        if step is not None and nan_grad(step):
            value = NanGrad.apply(value)
        return value, metrics

    loop.train_step, TextStage.loss = train_step, loss


# ----------------------------------------------------------------------------- helpers
def train(corpus, tmp_path, name, env=None, *sets, **overrides):
    """Run Stage A's tiny config in tmp_path/name through the injecting runner."""
    cfg = thinker_config(corpus, tmp_path / name, **overrides)
    path = write_config(tmp_path / f"{name}.json", cfg)
    args = ["--config", path] + [a for s in sets for a in ("--set", s)]
    return run_script("tests/system/test_divergence.py", "train_text.py", *args, env=env or {})


def error_line(proc) -> str:
    """The run's one error line (and nothing else on stderr: no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"{proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return lines[0]


def assert_all_finite(save_dir) -> list[str]:
    """Every tensor of every .pt below save_dir is finite; returns the files' names."""
    names = []
    for top, _, files in os.walk(save_dir):
        for name in sorted(f for f in files if f.endswith(".pt")):
            flat = flat_tensors(load_pt(os.path.join(top, name)))
            bad = [k for k, t in flat.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            assert not bad, f"{name}: not finite: {bad[:5]}"
            names.append(name)
    return names


def flat_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}{k}."))
    return out


def assert_no_update(a: dict, b: dict) -> None:
    """Two checkpoints hold the same weights and AdamW state (moments and step counts); the
    schedule's lr may differ."""
    assert_same_state({"w": a["model"], "s": a["optimizer"]["state"]},
                      {"w": b["model"], "s": b["optimizer"]["state"]}, ["w", "s"])


def step_files(save_dir) -> list[int]:
    return sorted(int(m.group(1)) for n in os.listdir(save_dir) if (m := re.match(r"thinker_step_(\d+)\.pt$", n)))


def train_records(save_dir) -> dict[int, dict]:
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


# ----------------------------------------------------------------------------- tests
def test_a_huge_lr_stops_naming_its_steps_and_writes_no_nonfinite_file(corpus, tmp_path):
    proc = train(corpus, tmp_path, "run", None, "lr=1e6", "grad_clip=0", max_steps=40)
    line = error_line(proc)
    m = re.search(r"thinker: loss or gradients not finite for 20 steps in a row \(steps (\d+)-(\d+); "
                  r"max_nonfinite_steps=20\); the last finite checkpoint is (\S+); lower lr or set grad_clip", line)
    assert m, line
    assert int(m.group(2)) - int(m.group(1)) == 19 and int(m.group(2)) < 40
    assert os.path.isfile(m.group(3))
    names = assert_all_finite(tmp_path / "run")
    assert "thinker.pt" not in names and names       # no final file: the run did not finish


def test_divergence_after_good_steps_keeps_the_finite_step_files(corpus, tmp_path):
    env = {"OMNI_TEST_NAN_LOSS": "7-"}
    proc = train(corpus, tmp_path, "run", env, max_steps=30, checkpoint_freq=2, keep_last_n=3, max_nonfinite_steps=5)
    line = error_line(proc)
    assert "not finite for 5 steps in a row (steps 7-11; max_nonfinite_steps=5)" in line, line
    assert line.endswith(f"the last finite checkpoint is {tmp_path / 'run' / 'thinker_step_10.pt'}; lower lr")
    assert step_files(tmp_path / "run") == [6, 8, 10]           # keep_last_n=3 of the finite files
    assert "thinker.pt" not in assert_all_finite(tmp_path / "run")
    # the skipped steps changed nothing: the files of steps 8 and 10 hold step 6's weights and AdamW state
    six = load_pt(tmp_path / "run" / "thinker_step_6.pt")
    for step in (8, 10):
        assert_no_update(six, load_pt(tmp_path / "run" / f"thinker_step_{step}.pt"))
    records = train_records(tmp_path / "run")
    assert [records[s]["nonfinite_steps"] for s in range(5, 12)] == [0, 0, 1, 1, 1, 1, 1]


def test_nonfinite_weights_are_never_written(corpus, tmp_path):
    env = {"OMNI_TEST_NAN_WEIGHTS": "5"}
    proc = train(corpus, tmp_path, "run", env, max_steps=30, checkpoint_freq=3, keep_last_n=1)
    line = error_line(proc)
    assert line == (f"error: thinker: weights not finite at step 6; thinker_step_6.pt not written; the last finite "
                    f"checkpoint is {tmp_path / 'run' / 'thinker_step_3.pt'}; lower lr"), line
    assert step_files(tmp_path / "run") == [3]       # keep_last_n=1 kept the finite one
    assert "thinker.pt" not in assert_all_finite(tmp_path / "run")


def test_isolated_nonfinite_steps_are_skipped_counted_and_training_finishes(corpus, tmp_path):
    # step 5: NaN loss; step 8: finite loss, NaN gradients (found by the gradient norm, unclipped)
    env = {"OMNI_TEST_NAN_LOSS": "5", "OMNI_TEST_NAN_GRAD": "8"}
    proc = train(corpus, tmp_path, "run", env, "grad_clip=0", max_steps=10, checkpoint_freq=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 steps whose loss or gradients were not finite" in proc.stdout
    run = tmp_path / "run"
    assert "thinker.pt" in assert_all_finite(run)
    records = train_records(run)
    assert [records[s]["nonfinite_steps"] for s in range(1, 11)] == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0]
    assert all(r["grad_norm"] > 0 for s, r in records.items() if s not in (5, 8))     # logged with grad_clip=0
    before, skipped, after = (load_pt(run / f"thinker_step_{s}.pt") for s in (7, 8, 9))
    assert_no_update(before, skipped)                                   # step 8 changed nothing
    assert any(not torch.equal(t, after["model"][k]) for k, t in skipped["model"].items())   # step 9 updated
    assert skipped["scheduler"]["last_epoch"] == 8                      # the schedule went on


def test_the_streak_survives_a_resume(corpus, tmp_path):
    env, sets = {"OMNI_TEST_NAN_LOSS": "5-"}, dict(max_steps=30, checkpoint_freq=2, max_nonfinite_steps=6)
    whole = error_line(train(corpus, tmp_path, "whole", env, **sets))
    assert "(steps 5-10; max_nonfinite_steps=6)" in whole, whole
    # killed as step 9 starts: the newest file is step 8's, four steps into the streak
    killed = train(corpus, tmp_path, "cut", {**env, "OMNI_TEST_KILL_AT_STEP": "8"}, **sets)
    assert killed.returncode == -9 and step_files(tmp_path / "cut")[-1] == 8
    resumed = error_line(train(corpus, tmp_path, "cut", env, **sets))
    assert resumed.replace(str(tmp_path / "cut"), "DIR") == whole.replace(str(tmp_path / "whole"), "DIR")
    assert step_files(tmp_path / "cut") == step_files(tmp_path / "whole")
    assert_same_state(load_pt(tmp_path / "whole" / "thinker_step_8.pt"),
                      load_pt(tmp_path / "cut" / "thinker_step_8.pt"), ["model", "optimizer", "nonfinite_streak"])


def test_training_that_ends_inside_a_streak_is_not_finished(corpus, tmp_path):
    env = {"OMNI_TEST_NAN_LOSS": "10-"}
    first = error_line(train(corpus, tmp_path, "run", env, max_steps=12))
    assert "not finite at the end of training (steps 10-12); thinker.pt not written" in first, first
    assert first.endswith("or set max_nonfinite_steps=0 to finish with the weights of step 9")
    assert error_line(train(corpus, tmp_path, "run", env)) == first        # the same command again: the same stop
    done = train(corpus, tmp_path, "run", env, "max_nonfinite_steps=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "thinker.pt" in assert_all_finite(tmp_path / "run")


if __name__ == "__main__":
    import stage_runner
    stage_runner.install_faults(os.environ)
    install_nonfinite(os.environ)
    stage_runner.run(sys.argv[1], sys.argv[2:])
