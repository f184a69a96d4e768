"""torchrun on the CPU (Gloo): ranks stay in step, rank 0 writes, resume is exact across ranks and
continues the same samples on another number of ranks; DDP equals accumulation; FSDP's step folders."""
import json
import os
import shutil
import sys

import pytest

from conftest import ROOT, assert_same_state, load_pt, run_script, thinker_config, write_config

pytestmark = pytest.mark.slow


def torchrun(config, env=None):
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "tests/stage_runner.py", "train_text.py", "--config", config]
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_two_ranks_train_save_once_and_resume_exactly(tmp_path, corpus):
    ref = thinker_config(corpus, tmp_path / "ref", max_steps=8, checkpoint_freq=3)
    proc = torchrun(write_config(tmp_path / "ref.json", ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_pt(tmp_path / "ref" / "thinker.pt")
    assert final["data_state"] == {"samples": 8 * 2 * 4, "batch_size": 4, "world_size": 2}
    assert len(final["rng"]) == 2 and not final["rng"][0]["torch"].equal(final["rng"][1]["torch"])
    assert sorted(n for n in os.listdir(tmp_path / "ref") if n.endswith(".pt")) == \
        ["thinker.pt", "thinker_best.pt", "thinker_step_3.pt", "thinker_step_6.pt"]

    killed = dict(ref, save_dir=str(tmp_path / "killed"))
    path = write_config(tmp_path / "killed.json", killed)
    proc = torchrun(path, env={"OMNI_TEST_KILL_AT_STEP": "5"})
    assert proc.returncode != 0
    proc = torchrun(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "thinker_step_3.pt at step 3" in proc.stdout
    assert_same_state(load_pt(tmp_path / "killed" / "thinker.pt"), final, ["model", "optimizer"])


def torchrun_stage(config, nproc=2, env=None, *args):
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "tests/stage_runner.py", "train_text.py", "--config", config, *args]
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def one_rank(config, env=None, *args):
    return run_script("train_text.py", "--config", config, *args, runner=True,
                      env={"OMP_NUM_THREADS": "1", **(env or {})})


def logged_batches(prefix) -> list[tuple]:
    folder, name = os.path.split(str(prefix))
    rows = []
    for log in sorted(n for n in os.listdir(folder) if n.startswith(name + ".rank")):
        with open(os.path.join(folder, log)) as f:
            rows += [tuple(json.loads(line)) for line in f]
    return rows


def test_two_ranks_equal_one_rank_accumulating_two_batches(tmp_path, corpus):
    """DDP and FSDP average the ranks' gradients as accumulation averages micro-batches: bit for bit
    (without clipping: FSDP sums the clipping norm shard by shard, which moves the last bits)."""
    same = {"max_steps": 6, "dropout": 0.0, "grad_clip": 0.0}
    one = thinker_config(corpus, tmp_path / "one", grad_accum_steps=2, **same)
    assert one_rank(write_config(tmp_path / "one.json", one)).returncode == 0
    reference = load_pt(tmp_path / "one" / "thinker.pt")
    for parallel in ("ddp", "fsdp"):
        two = thinker_config(corpus, tmp_path / parallel, parallel=parallel, **same)
        proc = torchrun_stage(write_config(tmp_path / f"{parallel}.json", two))
        assert proc.returncode == 0, proc.stderr[-3000:]
        # under fsdp the single file is consolidated weights; its AdamW state lives in the step folders
        assert_same_state(reference, load_pt(tmp_path / parallel / "thinker.pt"),
                          ["model", "optimizer"] if parallel == "ddp" else ["model"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resuming_on_another_number_of_ranks_sees_every_sample_once(tmp_path, corpus, parallel):
    """2 ranks -> 1 rank (accumulating 2) -> 2 ranks: the same global batches, none skipped or repeated."""
    base = thinker_config(corpus, tmp_path / "run", parallel=parallel, checkpoint_freq=2, eval_interval=100)
    path = write_config(tmp_path / "run.json", base)
    log = {"OMNI_TEST_LOG_BATCHES": str(tmp_path / "seen")}
    assert torchrun_stage(path, 2, log, "--set", "max_steps=4").returncode == 0
    proc = one_rank(path, log, "--set", "max_steps=8", "--set", "grad_accum_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming 2 rank(s) on 1: the data continues at sample 32" in proc.stdout
    proc = torchrun_stage(path, 2, log, "--set", "max_steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = thinker_config(corpus, tmp_path / "ref", max_steps=24, eval_interval=100)
    ref_log = {"OMNI_TEST_LOG_BATCHES": str(tmp_path / "ref_seen")}
    assert one_rank(write_config(tmp_path / "ref.json", reference), ref_log).returncode == 0
    seen, expected = logged_batches(tmp_path / "seen"), logged_batches(tmp_path / "ref_seen")
    assert len(seen) == len(expected) == 24 and sorted(seen) == sorted(expected)
    last = tmp_path / "run" / ("thinker_step_12.dcp/trainer.pt" if parallel == "fsdp" else "thinker.pt")
    assert load_pt(last)["data_state"]["samples"] == 24 * 4


def test_fsdp_writes_step_folders_and_resumes_exactly_after_a_rank_is_killed(tmp_path, corpus):
    ref = thinker_config(corpus, tmp_path / "ref", parallel="fsdp", max_steps=8, checkpoint_freq=3)
    proc = torchrun_stage(write_config(tmp_path / "ref.json", ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "ref"))
    assert {"thinker.pt", "thinker_best.pt", "thinker_step_3.dcp", "thinker_step_6.dcp", "thinker_step_8.dcp"} \
        <= set(names) and not [n for n in names if n.endswith(".tmp")]
    final = load_pt(tmp_path / "ref" / "thinker.pt")     # consolidated: whole weights, as inference reads
    assert "optimizer" not in final and final["model"]["embed.weight"].shape == (96, 32)

    killed = dict(ref, save_dir=str(tmp_path / "killed"))
    path = write_config(tmp_path / "killed.json", killed)
    proc = torchrun_stage(path, 2, {"OMNI_TEST_KILL_AT_STEP": "5", "OMNI_TEST_ONLY_RANK": "1"})
    assert proc.returncode != 0
    # a save interrupted before its commit leaves a temporary folder: never read, removed at start
    shutil.copytree(tmp_path / "killed" / "thinker_step_3.dcp", tmp_path / "killed" / ".thinker_step_4.dcp.tmp")
    proc = torchrun_stage(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "thinker_step_3.dcp at step 3" in proc.stdout
    assert not os.path.exists(tmp_path / "killed" / ".thinker_step_4.dcp.tmp")
    assert_same_state(load_pt(tmp_path / "killed" / "thinker.pt"), final, ["model"])


def test_a_truncated_shard_is_skipped_for_the_previous_folder(tmp_path, corpus):
    cfg = thinker_config(corpus, tmp_path / "run", parallel="fsdp", max_steps=6, checkpoint_freq=3)
    path = write_config(tmp_path / "run.json", cfg)
    assert torchrun_stage(path).returncode == 0
    shard = tmp_path / "run" / "thinker_step_6.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = one_rank(path, None, "--set", "max_steps=7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "__1_0.distcp is missing or truncated" in proc.stdout and "thinker_step_3.dcp at step 3" in proc.stdout


def test_stage_e_shards_its_thinker_with_fsdp_and_validates(tmp_path, trained_stages):
    """Stage E under FSDP: the Thinker's blocks are sharded units, the frozen encoders sit in the root
    unit; validation (answers generated outside the training forward) gathers the root first."""
    cfg = {**trained_stages["E"], "save_dir": str(tmp_path / "omni"), "parallel": "fsdp", "max_steps": 2,
           "eval_interval": 2, "checkpoint_freq": 1, "qa_eval_limit": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "sft_omni.py",
           "--config", write_config(tmp_path / "omni.json", cfg)]
    import subprocess
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "omni step 2: val_loss" in proc.stdout and "image_acc" in proc.stdout
    assert {"omni_step_1.dcp", "omni_step_2.dcp", "omni.pt"} <= set(os.listdir(tmp_path / "omni"))
    final = load_pt(tmp_path / "omni" / "omni.pt")
    assert {"thinker", "proj_a", "proj_v"} <= set(final) and "optimizer" not in final
