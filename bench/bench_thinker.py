"""Thinker training throughput and checkpoint costs on this machine.

    python bench/bench_thinker.py [--config configs/thinker_tiny.json] [--steps 40]

Prints: training tokens/s; full-checkpoint and weights-only save time and size; and the time from
launching a trainer to its first resumed step (process start, imports, setup, checkpoint load,
and one step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni import checkpoint as ckpt  # noqa: E402
from omni.config import load_config  # noqa: E402
from omni.stages.text import TextStage  # noqa: E402
from omni.train.loop import ResumeOptions, build_trainer, train  # noqa: E402
from omni.runtime import setup_runtime  # noqa: E402


def timed_save(path: str, payload: dict, repeats: int = 3) -> tuple[float, int]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ckpt.save(path, payload)
        best = min(best, time.perf_counter() - start)
    return best, os.path.getsize(path)


def first_resumed_step_seconds(config: str, save_dir: str, step: int) -> float:
    """Launch the trainer as a user would and time until metrics.jsonl shows step+1."""
    metrics = os.path.join(save_dir, "metrics.jsonl")
    cmd = [sys.executable, "train_text.py", "--config", config, "--set", f"save_dir={save_dir}",
           "--set", f"max_steps={step + 50}", "--set", "log_interval=1", "--set", "eval_interval=1000",
           "--set", "progress=false"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if os.path.isfile(metrics):
                with open(metrics) as f:
                    if any(json.loads(line).get("step") == step + 1 for line in f if line.strip()):
                        return time.perf_counter() - start
            time.sleep(0.01)
        raise RuntimeError(f"trainer exited with {proc.returncode} before its first step")
    finally:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/thinker_tiny.json")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(TextStage.config_class, args.config,
                          [f"save_dir={tmp}", f"max_steps={args.steps}", "eval_interval=100000",
                           f"log_interval={args.steps // 2}", f"checkpoint_freq={args.steps}", "progress=false"])
        train(TextStage, cfg, ResumeOptions(resume=False))
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"train"' in line]
        tokens_per_s = rows[-1]["tokens_per_s"]          # second half: warm caches, no first-step costs
        trainer = build_trainer(TextStage(cfg, setup_runtime(cfg)), ResumeOptions())
        params = sum(p.numel() for p in trainer.stage.parameters())
        full_s, full_b = timed_save(os.path.join(tmp, "full.pt"), trainer.payload(full=True))
        weights_s, weights_b = timed_save(os.path.join(tmp, "weights.pt"), trainer.payload(full=False))
        resume_s = first_resumed_step_seconds(args.config, tmp, trainer.step)
    print(f"config {args.config}: {params / 1e6:.2f}M parameters, batch {cfg.batch_size} x {cfg.seq_len} tokens")
    print(f"training throughput: {tokens_per_s:,.0f} tokens/s ({cfg.device}, amp={cfg.amp}, "
          f"{os.cpu_count()} cores)")
    print(f"full checkpoint:   {full_b / 1e6:.2f} MB, saved in {full_s * 1000:.0f} ms")
    print(f"weights only:      {weights_b / 1e6:.2f} MB, saved in {weights_s * 1000:.0f} ms")
    print(f"launch to first resumed step: {resume_s:.2f} s")


if __name__ == "__main__":
    main()
