"""Kill fuzz (slow): every stage is SIGKILLed at 20 random instants across short runs (in setup,
steps, validation, saves), plus once inside validation, and started again after each kill.

After every kill, each checkpoint file in save_dir loads and no step file that had been completed
is gone; every run that reaches its end has weights and optimizer bit-identical to an
uninterrupted run. The instants come from OMNI_FUZZ_SEED (printed; set it to replay a failure);
OMNI_FUZZ_KILLS changes their number.

The driver (`python tests/system/test_resume_fuzz.py PLAN REPORT`) imports torch and the stage once and
forks every trainer run (stage_runner.run_forked): a fresh interpreter per kill would spend most
of the test importing.
"""
import json
import os
import random
import sys
import time

import pytest

# Run as a script (the driver), this file finds conftest.py and stage_runner.py in tests/ and the test
# modules test_resume imports in tests/*/ only with these on sys.path (pytest: pyproject.toml's pythonpath).
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS] + [os.path.join(TESTS, d) for d in ("train", "data", "stages", "system", "serve")]

from test_resume import (  # noqa: E402, F401
    audio_stage_config,
    omni_stage_config,
    stage_case,
    talker_stage_config,
    text_stage_config,
    vision_stage_config,
    vocoder_stage_config,
)

from conftest import assert_same_state, load_pt, run_script  # noqa: E402
from omni.registry import STAGES  # noqa: E402

KILLS = int(os.environ.get("OMNI_FUZZ_KILLS", "20"))


def check_folder(save_dir: str, prefix: str) -> dict:
    """name -> "ok" or why it does not load, for every checkpoint file; and the JSON sidecar."""
    from omni import checkpoint as ckpt
    found = {}
    for name in sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []:
        if name.endswith(".pt"):
            try:
                ckpt.load(os.path.join(save_dir, name))
                found[name] = "ok"
            except ckpt.CheckpointError as e:
                found[name] = str(e)
        elif name == ckpt.TRAINING_STATE:
            try:
                ckpt.read_training_state(save_dir)
                found[name] = "ok"
            except ValueError as e:
                found[name] = f"{name}: {e}"
    return found


def drive(plan: dict) -> dict:
    """Run the plan's kills one after another; a run that ends before its kill starts a new chain."""
    import stage_runner
    script, prefix, cfg, root = plan["script"], plan["prefix"], plan["config"], plan["root"]
    rng = random.Random(plan["seed"])
    log = os.path.join(root, "runs.log")

    def run(save_dir, env):
        path = os.path.join(root, os.path.basename(save_dir) + ".json")
        with open(path, "w") as f:
            json.dump({**cfg, "save_dir": save_dir}, f)
        return stage_runner.run_forked(script, ["--config", path], env, log)

    start = time.perf_counter()
    assert run(os.path.join(root, "ref"), {}) == 0, open(log).read()[-3000:]
    duration = time.perf_counter() - start
    faults = [{"OMNI_TEST_KILL_IN_EVAL": str(plan["eval_step"])}]
    faults += [{"OMNI_TEST_KILL_AFTER_S": f"{rng.uniform(0, duration):.3f}"} for _ in range(plan["kills"])]
    chain, finished, events = 0, [], []
    completed = set()
    for env in faults + [{}]:
        save_dir = os.path.join(root, f"chain_{chain}")
        code = run(save_dir, env)
        files = check_folder(save_dir, prefix)
        events.append({"env": env, "code": code, "files": files, "lost": sorted(completed - set(files))})
        completed |= {n for n, state in files.items() if state == "ok" and "_step_" in n}
        if code == 0:
            finished.append(save_dir)
            chain, completed = chain + 1, set()
    return {"duration": duration, "events": events, "finished": finished, "reference": os.path.join(root, "ref")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_random_sigkills_lose_nothing_and_end_bit_identical(stage, tmp_path, request):
    script, prefix, keys, fixture = stage_case(stage)
    cfg = request.getfixturevalue(fixture)(tmp_path / "unused", keep_last_n=10)   # nothing cleaned up
    seed = int(os.environ.get("OMNI_FUZZ_SEED", random.randrange(10**6)))
    print(f"{stage}: OMNI_FUZZ_SEED={seed} OMNI_FUZZ_KILLS={KILLS}")
    plan = {"script": script, "prefix": prefix, "config": cfg, "root": str(tmp_path), "seed": seed,
            "kills": KILLS, "eval_step": cfg["eval_interval"]}
    with open(tmp_path / "plan.json", "w") as f:
        json.dump(plan, f)
    proc = run_script("tests/system/test_resume_fuzz.py", str(tmp_path / "plan.json"), str(tmp_path / "report.json"),
                      env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"seed {seed}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    report = json.load(open(tmp_path / "report.json"))
    for i, event in enumerate(report["events"]):
        where = f"seed {seed}, run {i} ({event['env']}, exit {event['code']})"
        assert event["code"] in (0, -9), f"{where}: {open(tmp_path / 'runs.log').read()[-3000:]}"
        assert not event["lost"], f"{where}: completed checkpoints lost: {event['lost']}"
        broken = {n: why for n, why in event["files"].items() if why != "ok"}
        assert not broken, f"{where}: {broken}"
    assert report["events"][-1]["code"] == 0 and report["finished"]
    expected = load_pt(os.path.join(report["reference"], f"{prefix}.pt"))
    for save_dir in report["finished"]:
        assert_same_state(load_pt(os.path.join(save_dir, f"{prefix}.pt")), expected, keys + ["optimizer"])
    kills = sum(event["code"] == -9 for event in report["events"])
    print(f"{stage}: {len(report['events'])} runs, {kills} killed, {len(report['finished'])} finished chains, "
          f"an uninterrupted run takes {report['duration']:.1f}s")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = drive(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
