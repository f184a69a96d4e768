"""The CUDA paths of every stage: fp16 autocast with its GradScaler and bf16 autocast train (finite
losses, the scaler's state saved with fp16 only), and a run killed mid-way on the GPU resumes
bit-identical to one never interrupted, scaler included. Skipped where no CUDA device is present,
as on CI; on a GPU: `python -m pytest tests/system/test_cuda.py` (docs/gpu_recipes.md: one H100's run)."""
import json
import math
import os

import pytest
import torch
from test_resume import (  # noqa: F401 (fixtures)
    audio_stage_config,
    omni_stage_config,
    run_stage,
    stage_case,
    talker_stage_config,
    text_stage_config,
    vision_stage_config,
    vocoder_stage_config,
)

from conftest import assert_same_state, load_pt
from omni.registry import STAGES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def train_losses(save_dir: str) -> list[float]:
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_a_killed_cuda_run_resumes_bit_identical(stage, amp, tmp_path, request):
    script, prefix, keys, fixture = stage_case(stage)
    make_cfg = request.getfixturevalue(fixture)
    keys = keys + ["optimizer"] + (["scaler"] if amp == "fp16" else [])

    whole = make_cfg(tmp_path / "whole", device="cuda", amp=amp)
    proc = run_stage(script, whole, tmp_path, "whole")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(whole["save_dir"])
    assert losses and all(math.isfinite(x) for x in losses), losses
    expected = load_pt(os.path.join(whole["save_dir"], f"{prefix}.pt"))
    assert ("scaler" in expected) == (amp == "fp16")

    killed = make_cfg(tmp_path / "killed", device="cuda", amp=amp)
    kill_at = killed["checkpoint_freq"] + 2
    proc = run_stage(script, killed, tmp_path, "killed", env={"OMNI_TEST_KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -9, proc.stderr[-3000:]
    proc = run_stage(script, killed, tmp_path, "killed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{prefix}_step_{killed['checkpoint_freq']}.pt" in proc.stdout, proc.stdout[-3000:]
    try:
        assert_same_state(load_pt(os.path.join(killed["save_dir"], f"{prefix}.pt")), expected, keys)
    except AssertionError as differs:      # resume, or the GPU's kernels? A second whole run tells.
        again = make_cfg(tmp_path / "again", device="cuda", amp=amp)
        assert run_stage(script, again, tmp_path, "again").returncode == 0
        try:
            assert_same_state(load_pt(os.path.join(again["save_dir"], f"{prefix}.pt")), expected, keys)
            verdict = "two uninterrupted runs agree: the resume lost state"
        except AssertionError:
            verdict = "two uninterrupted runs differ too: a CUDA kernel of this stage is not deterministic"
        raise AssertionError(f"{differs}; {verdict}") from None
