"""torchrun on the CPU (Gloo): ranks stay in step, rank 0 writes, resume is exact across ranks."""
import os
import sys

import pytest

from conftest import ROOT, assert_same_state, load_pt, thinker_config, write_config

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
    assert final["data_state"] == {"batches": 8, "batch_size": 4, "world_size": 2}
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
