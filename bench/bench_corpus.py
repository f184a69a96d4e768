"""Stage A on a corpus larger than memory: tokenizing once, and starting up afterwards.

    python bench/bench_corpus.py [--sizes_mb 10 1024] [--dir /tmp/omni_bench_corpus]

For each size it generates (once, deterministically) a corpus of demo-world sentences in --dir,
then measures: training the tokenizer (on its bounded sample), tokenizing into save_dir/tokens
(MB/s, tokens/s), and a tiny Stage A run started as a user would (a subprocess, 2 steps): seconds
from launch to the first step and the peak RSS of that process (its VmHWM). Prints a
table; docs/data.md holds the figures. Nothing is written into the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni.data.demo import _Builder, _counts_for  # noqa: E402
from omni.data.shards import TOKENS_DIR, Lines, ensure_split  # noqa: E402
from omni.stages.text import TOKENIZER_FILE, TextConfig  # noqa: E402
from omni.tokenizer import Tokenizer  # noqa: E402

BASE_LINES = 100_000
# Runs a script as __main__ and writes its peak resident memory (kB) to stderr when it exits.
PEAK_RSS_WRAPPER = """import atexit, runpy, sys
def peak():
    with open('/proc/self/status') as f:
        print(next(line for line in f if line.startswith('VmHWM')), file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


class MainRank:
    is_main = True

    def barrier(self):
        pass


def base_lines() -> list[str]:
    """Demo-world corpus lines (captions, questions with answers, facts, chat)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "text").mkdir()
        builder = _Builder(Path(tmp), 0, _counts_for("small", {"text": (BASE_LINES, 1000, 0)}))
        for split in ("train", "val"):
            builder.text_corpus(split)
        return [(Path(tmp) / "text" / f"{s}.txt").read_text().splitlines() for s in ("train", "val")]


def write_corpus(path: str, megabytes: int, lines: list[str]) -> None:
    """Shuffled passes over the base lines until the file holds `megabytes` MB (kept if present)."""
    if os.path.isfile(path) and os.path.getsize(path) >= megabytes * 10**6:
        return
    rng, written = random.Random(megabytes), 0
    with open(path + ".tmp", "w") as f:
        while written < megabytes * 10**6:
            rng.shuffle(lines)
            chunk = "\n".join(lines) + "\n"
            room = megabytes * 10**6 - written
            if len(chunk) > room:           # whole lines, up to the size asked for
                chunk = chunk[:chunk.rfind("\n", 0, room) + 1]
                if not chunk:
                    break
            f.write(chunk)
            written += len(chunk)
    os.replace(path + ".tmp", path)


def first_step(config: str, save_dir: str) -> tuple[float, float]:
    """(seconds from launch to the first training step, peak RSS in MB) of a 2-step Stage A run.
    The trainer reports its own VmHWM at exit: a child's ru_maxrss would count this process's
    memory, which the child inherits until it execs."""
    metrics = os.path.join(save_dir, "metrics.jsonl")
    cmd = [sys.executable, "-c", PEAK_RSS_WRAPPER, "train_text.py", "--config", config, "--no-resume"]
    start, seen = time.perf_counter(), None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and seen is None:
        if os.path.isfile(metrics) and '"step": 1,' in open(metrics).read():
            seen = time.perf_counter() - start
        time.sleep(0.01)
    err = proc.communicate()[1].decode()
    if proc.returncode != 0 or seen is None or "VmHWM" not in err:
        raise RuntimeError(f"trainer failed: {err[-2000:]}")
    return seen, int(err.split("VmHWM:")[1].split()[0]) / 1024


def bench(size_mb: int, folder: str, lines: list[str], val: str) -> dict:
    corpus = os.path.join(folder, f"corpus_{size_mb}mb.txt")
    write_corpus(corpus, size_mb, list(lines))
    save_dir = os.path.join(folder, f"run_{size_mb}mb")
    os.makedirs(save_dir, exist_ok=True)
    for name in os.listdir(save_dir):       # a fresh start every time: tokenizer and shards included
        if os.path.isfile(os.path.join(save_dir, name)):
            os.unlink(os.path.join(save_dir, name))
    cfg = {"train_files": [corpus], "val_file": val, "save_dir": save_dir, "demo_dir": "", "vocab_size": 512,
           "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64, "seq_len": 64,
           "batch_size": 8, "max_steps": 2, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1,
           "log_interval": 1, "checkpoint_freq": 0, "progress": False, "device": "cpu"}
    config = os.path.join(folder, f"config_{size_mb}mb.json")
    with open(config, "w") as f:
        json.dump(cfg, f)
    sample = TextConfig().tokenizer_sample_bytes
    start = time.perf_counter()
    tokenizer = Tokenizer.train([corpus], os.path.join(save_dir, TOKENIZER_FILE), 512, sample)
    tok_train_s = time.perf_counter() - start
    tokens_dir = os.path.join(save_dir, TOKENS_DIR)
    for name in os.listdir(tokens_dir) if os.path.isdir(tokens_dir) else []:
        os.unlink(os.path.join(tokens_dir, name))
    start = time.perf_counter()
    entry = ensure_split(tokenizer, "train", Lines((corpus,)), tokens_dir, TextConfig().token_shard_size,
                         MainRank(), progress=True)
    tokenize_s = time.perf_counter() - start
    first_s, rss_mb = first_step(config, save_dir)
    mb = os.path.getsize(corpus) / 1e6
    return {"corpus MB": f"{mb:,.0f}", "tokenizer train s": f"{tok_train_s:.1f}",
            "tokenize s": f"{tokenize_s:.0f}", "MB/s": f"{mb / tokenize_s:.2f}",
            "tokens/s": f"{entry['tokens'] / tokenize_s:,.0f}", "tokens": f"{entry['tokens']:,}",
            "shards": str(len(entry["shards"])), "launch to 1st step s": f"{first_s:.2f}",
            "trainer peak RSS MB": f"{rss_mb:.0f}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes_mb", type=int, nargs="+", default=[10, 1024])
    p.add_argument("--dir", default="/tmp/omni_bench_corpus")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    train_lines, val_lines = base_lines()
    val = os.path.join(args.dir, "val.txt")
    with open(val, "w") as f:
        f.write("\n".join(val_lines) + "\n")
    rows = [bench(size, args.dir, train_lines, val) for size in args.sizes_mb]
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]
    print("| " + " | ".join(k.ljust(w) for k, w in zip(keys, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(r[k].rjust(w) for k, w in zip(keys, widths)) + " |")
    torch_only = subprocess.run([sys.executable, "-c", "import torch; print(open('/proc/self/status').read()"
                                 ".split('VmHWM:')[1].split()[0])"], capture_output=True, text=True).stdout
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"(a process that only imports torch peaks at {int(torch_only) / 1024:.0f} MB; "
          f"bench process peak RSS {peak / 1024:.0f} MB; "
          f"{os.cpu_count()} cores; tokenizer sample {TextConfig().tokenizer_sample_bytes / 1e6:g} MB)")


if __name__ == "__main__":
    main()
