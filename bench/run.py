"""The suite's speed figures, each beside a baseline measured in the same process.

    python bench/run.py [--quick] [--config configs/thinker_tiny.json] [--rounds 5] [--device cuda]

Prints one table (figure, value, baseline, ratio = value / baseline); docs/bench.md holds the
figures of one machine and what each change gave.

  decode          Thinker greedy decoding of 256 new tokens after a 16-token prompt, with the static
                  KV cache; baseline: the same model without a cache (the whole sequence every step)
  train           Stage A training steps (omni.train.loop.train_step, on random tokens at the config's
                  dims) with the speed options; baseline: the eager fp32 path of adamw_impl=auto
  peak fraction   achieved training FLOP/s (6 * parameters * tokens + attention) over the FLOP/s of
                  a large fp32 matmul loop, compiled fp32 against eager (on CUDA: a bf16 matmul
                  loop, compiled bf16 autocast against bf16 autocast)
  peak memory     (CUDA only) the most GPU memory one variant's steps held, its weights, gradients
                  and AdamW moments included, against the eager fp32 step
  checkpoint save omni.checkpoint.save (temp file, fsync, rename) of a full training payload;
                  baseline: a plain torch.save of the same payload (a time: below 1 is faster)
  checkpoint MB   the full payload (weights, AdamW moments, RNG, data position) against weights only

Every variant runs `--rounds` timed rounds, interleaved with the others so that a machine busy
with other work slows all of them alike; the best round counts. `--quick` runs tiny dims for a
few seconds and compiles with torch.compile's "eager" backend (a smoke test, not a speed).
Nothing is written into the repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni import checkpoint as ckpt  # noqa: E402
from omni.config import load_config  # noqa: E402
from omni.data.sampler import ResumableBatchSampler  # noqa: E402
from omni.data.text import TokenWindows  # noqa: E402
from omni.runtime import setup_runtime  # noqa: E402
from omni.stages.text import TextStage  # noqa: E402
from omni.thinker import Thinker, ThinkerArch  # noqa: E402
from omni.train.loop import ResumeOptions, build_trainer, train_step  # noqa: E402
from omni.train.speed import compile_modules  # noqa: E402
from omni.train.stage import make_loader  # noqa: E402

QUICK = ["d_model=32", "n_layers=2", "n_heads=2", "n_kv_heads=1", "seq_len=32", "batch_size=4"]
# name -> (config overrides, compiled); the first is the baseline of the others
TRAIN_VARIANTS = {
    "eager": ([], False),
    "fused AdamW": (["adamw_impl=fused"], False),
    "bf16 autocast": (["amp=bf16"], False),
    "compile": ([], True),
    "compile + bf16 autocast": (["amp=bf16"], True),
}
CUDA_VARIANTS = {"fp16 autocast + GradScaler": (["amp=fp16"], False)}


class RandomTextStage(TextStage):
    """Stage A's model, loss and step on random token windows: no files, no tokenizer."""

    def setup(self):
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        tokens = torch.randint(0, cfg.vocab_size, ((8 * cfg.batch_size + 2) * cfg.seq_len,), generator=gen)
        self.train_data = TokenWindows(tokens, cfg.seq_len, cfg.seed, "random tokens")
        self.modules = {"model": Thinker(ThinkerArch.from_config(cfg))}


class TrainRun:
    """One trainer and its batches; `round(steps)` returns tokens/s."""

    def __init__(self, cfg, compiled: bool, compile_options: dict):
        self.cfg, self.cuda = cfg, cfg.device == "cuda"
        stage = RandomTextStage(cfg, setup_runtime(cfg))
        self.trainer = build_trainer(stage, ResumeOptions(resume=False))
        compile_modules(stage, dataclasses.replace(cfg, compile=compiled), **compile_options)
        sampler = ResumableBatchSampler(stage.batch_plan(), 0, 0, 1)
        self.batches = iter(make_loader(stage.train_data, sampler, stage))

    def round(self, steps: int) -> float:
        sync(self.cuda)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(self.trainer, self.batches)
        sync(self.cuda)
        return steps * self.cfg.batch_size * self.cfg.seq_len / (time.perf_counter() - start)


def sync(cuda: bool) -> None:
    """Wait for the GPU's queued kernels, so that a timer reads the work done, not the work queued."""
    if cuda:
        torch.cuda.synchronize()


def build_runs(configs: dict, variants: dict, compile_options: dict) -> tuple[dict, dict]:
    """name -> TrainRun, each warmed up (compilation, allocator, first steps); and on CUDA
    name -> the most bytes its construction and warm-up held beyond what was allocated before it."""
    runs, peaks = {}, {}
    for name, (_, compiled) in variants.items():
        cuda = configs[name].device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        runs[name] = TrainRun(configs[name], compiled, compile_options)
        runs[name].round(2)
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated() - before
    return runs, peaks


def best_of_rounds(runs: dict, rounds: int, measure) -> dict:
    """name -> the best of `rounds` measures, taken in turn over the runs."""
    best = {name: 0.0 for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], measure(run))
    return best


class MatmulPeak:
    """`round()` returns the FLOP/s of a large matmul loop, fp32 on the CPU (what BLAS reaches on
    this process's threads) and bf16 on CUDA (the tensor cores' rate). Timed in turn with the
    training rounds, so both see the same machine load."""

    def __init__(self, quick: bool, device: str):
        self.cuda = device == "cuda"
        n = 256 if quick else 8192 if self.cuda else 1024
        dtype = torch.bfloat16 if self.cuda else torch.float32    # what the GPU's tensor cores run
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.reps = 4 if quick else 10

    def round(self, _steps: int = 0) -> float:
        sync(self.cuda)
        start = time.perf_counter()
        for _ in range(self.reps):
            self.a @ self.b
        sync(self.cuda)
        return 2 * self.a.shape[0] ** 3 * self.reps / (time.perf_counter() - start)


def training_flops_per_token(cfg, params: int) -> float:
    """6 * parameters (forward and backward of every weight; the tied head counted once) plus
    the attention scores and mixing: 12 * layers * seq_len * d_model (causal masking not discounted)."""
    return 6 * params + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model


def decode_speeds(cfg, new_tokens: int, rounds: int) -> tuple[float, float]:
    """Greedy decode tokens/s with the static KV cache and without a cache."""
    prompt_len = 16
    arch = ThinkerArch.from_config(cfg)
    arch.max_seq_len = max(arch.max_seq_len, prompt_len + new_tokens)
    torch.manual_seed(0)
    model = Thinker(arch).eval().to(cfg.device)
    prompt = torch.randint(0, arch.vocab_size, (1, prompt_len)).to(cfg.device)

    def speed(use_cache: bool) -> float:
        start = time.perf_counter()
        n = sum(1 for _ in model.generate(prompt, max_new_tokens=new_tokens, use_cache=use_cache))
        return n / (time.perf_counter() - start)

    best = best_of_rounds({True: True, False: False}, rounds, speed)
    return best[True], best[False]


def save_times(payload: dict, folder: str, repeats: int) -> tuple[float, float]:
    """Best seconds of omni.checkpoint.save and of a plain torch.save of the same payload."""
    best = {"suite": float("inf"), "plain": float("inf")}
    for _ in range(repeats):
        for name, write in (("suite", ckpt.save), ("plain", lambda p, obj: torch.save(obj, p))):
            start = time.perf_counter()
            write(os.path.join(folder, f"{name}.pt"), payload)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["suite"], best["plain"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs/thinker_tiny.json"))
    p.add_argument("--quick", action="store_true", help="tiny dims, a few seconds: checks the harness runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="training steps per round")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    rounds, steps, new_tokens = (1, 2, 32) if args.quick else (args.rounds, args.steps, 256)
    compile_options = {"backend": "eager"} if args.quick else {}
    cuda = args.device == "cuda"
    variants = {**TRAIN_VARIANTS, **(CUDA_VARIANTS if cuda else {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # amp and compile off unless a variant sets them: a config's own (the base ones: bf16) is no baseline
        base = [f"save_dir={tmp}", f"device={args.device}", "progress=false", "amp=off", "compile=false"] + \
            (QUICK if args.quick else [])
        configs = {name: load_config(RandomTextStage.config_class, args.config, base + overrides)
                   for name, (overrides, _) in variants.items()}
        cfg = configs["eager"]

        cached, plain = decode_speeds(cfg, new_tokens, rounds)
        rows.append((f"decode tokens/s, static KV cache ({new_tokens} new; baseline no cache)", cached, plain))

        runs, memory = build_runs(configs, variants, compile_options)
        runs["peak"] = MatmulPeak(args.quick, args.device)
        speeds = best_of_rounds(runs, rounds, lambda run: run.round(steps))
        for name in list(variants)[1:]:
            rows.append((f"train tokens/s, {name} (baseline eager fp32)", speeds[name], speeds["eager"]))

        trainer = runs["eager"].trainer
        params = sum(p.numel() for p in trainer.stage.parameters())
        peak = speeds["peak"]
        flops = training_flops_per_token(cfg, params)
        # the fastest path against the matmul rate of its own precision
        fast, slow = ("compile + bf16 autocast", "bf16 autocast") if cuda else ("compile", "eager")
        rows.append((f"fraction of {'bf16' if cuda else 'fp32'} matmul peak, {fast} (baseline {slow})",
                     speeds[fast] * flops / peak, speeds[slow] * flops / peak))
        for name in list(memory)[1:]:
            rows.append((f"peak GPU memory GB, {name} (baseline eager fp32)", memory[name] / 1e9,
                         memory["eager"] / 1e9))

        suite_s, plain_s = save_times(trainer.payload(full=True), tmp, 1 if args.quick else 3)
        rows.append(("checkpoint save ms (baseline plain torch.save)", 1000 * suite_s, 1000 * plain_s))
        ckpt.save(os.path.join(tmp, "weights.pt"), trainer.payload(full=False))
        full_mb, weights_mb = (os.path.getsize(os.path.join(tmp, name)) / 1e6 for name in ("suite.pt", "weights.pt"))
        rows.append(("checkpoint MB, full (baseline weights only)", full_mb, weights_mb))

    print(f"Thinker d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, {params / 1e6:.2f}M "
          f"parameters; train batch {cfg.batch_size} x {cfg.seq_len}; {where(cuda)}; "
          f"{'bf16' if cuda else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s{'; --quick' if args.quick else ''}")
    print_table(rows)


def where(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'figure':<{width}} | {'value':>10} | {'baseline':>10} | {'ratio':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for figure, value, baseline in rows:
        print(f"| {figure:<{width}} | {value:>10.4g} | {baseline:>10.4g} | {value / baseline:>6.2f} |")


if __name__ == "__main__":
    main()
