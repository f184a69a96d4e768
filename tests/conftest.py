"""Shared fixtures: a tiny text corpus, tiny configs, and a way to run trainers as subprocesses."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (CI runs them too)")


def write_corpus(folder: str, lines: int = 1500, seed: int = 0) -> tuple[str, str]:
    """A small deterministic corpus of shape sentences: train.txt and val.txt."""
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    text = [f"a {rng.choice(['small', 'big'])} {rng.choice(colours)} {rng.choice(shapes)} is "
            f"{rng.choice(['above', 'below', 'left of'])} a {rng.choice(colours)} {rng.choice(shapes)}"
            for _ in range(lines)]
    os.makedirs(folder, exist_ok=True)
    train, val = os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")
    with open(train, "w") as f:
        f.write("\n".join(text[: lines * 9 // 10]) + "\n")
    with open(val, "w") as f:
        f.write("\n".join(text[lines * 9 // 10:]) + "\n")
    return train, val


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def thinker_config(corpus, save_dir, **overrides) -> dict:
    train, val = corpus
    cfg = {"seed": 3, "train_files": [train], "val_file": val, "save_dir": str(save_dir),
           "vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
           "max_seq_len": 64, "seq_len": 16, "dropout": 0.1, "batch_size": 4, "lr": 3e-3,
           "warmup_steps": 2, "max_steps": 12, "eval_interval": 4, "checkpoint_freq": 3,
           "keep_last_n": 10, "log_interval": 1, "eval_batches": 2, "progress": False}
    cfg.update(overrides)
    return cfg


def write_config(path, cfg: dict) -> str:
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def run_script(script: str, *args: str, env: dict | None = None, runner: bool = False, check: bool = False,
               input: str | None = None):
    """Run a repository script (through tests/stage_runner.py when runner=True) and capture output;
    `input` is fed to its stdin."""
    cmd = [sys.executable] + (["tests/stage_runner.py"] if runner else []) + [script, *args]
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600,
                          input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(folder) -> dict:
    """relative path -> bytes of every file below folder: equal results mean nothing was touched."""
    found = {}
    for top, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return dict(sorted(found.items()))


def load_pt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, keys):
    """Weights and optimizer state of two checkpoints are bit-identical."""
    for key in keys:
        flat_a, flat_b = flatten(a[key]), flatten(b[key])
        assert flat_a.keys() == flat_b.keys(), key
        for name in flat_a:
            va, vb = flat_a[name], flat_b[name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"{key}.{name} differs"
            else:
                assert va == vb, f"{key}.{name}: {va!r} != {vb!r}"


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix: obj}


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory):
    """A tiny demo world (about 10 s to build), shared by every test of the session."""
    from omni.data.demo import build_demo_world
    out = tmp_path_factory.mktemp("demo") / "world"
    build_demo_world(out, size="tiny", seed=0, progress=False)
    return str(out)


def tiny_stage_configs(demo: str, root) -> dict:
    """Tiny configs of the six stages (letter -> config dict) on the tiny world, writing under root."""
    from test_audio_enc import audio_enc_config  # the test modules import this one
    from test_talker import tiny_stage_config as talker_config
    from test_vision import vision_config
    from test_vocoder import vocoder_config
    text = (f"{demo}/text/train.txt", f"{demo}/text/val.txt")
    return {"A": thinker_config(text, root / "thinker", vocab_size=160, max_seq_len=256, max_steps=9),
            "B": audio_enc_config(demo, root / "audio_enc", max_steps=9),
            "C": vision_config(demo, root / "vision", max_steps=9, decoder_layers=1),
            "D": talker_config(demo, root / "talker"),
            "E": {"seed": 4, "save_dir": str(root / "omni"), "demo_dir": "",
                  "thinker_dir": str(root / "thinker"), "audio_enc_dir": str(root / "audio_enc"),
                  "vision_dir": str(root / "vision"), "train_manifest": f"{demo}/sft_train.jsonl",
                  "val_manifest": f"{demo}/sft_val.jsonl", "test_manifest": f"{demo}/sft_test.jsonl",
                  "asr_manifest": f"{demo}/asr_train.jsonl", "batch_size": 4, "lr": 2e-3, "warmup_steps": 2,
                  "max_steps": 8, "eval_interval": 4, "checkpoint_freq": 4, "log_interval": 1,
                  "eval_batches": 2, "qa_eval_limit": 12, "max_answer_tokens": 4, "transcribe": True,
                  "patch_merge": 2, "answer_smoothing": 0.2, "vision_cache": True, "progress": False},
            "F": vocoder_config(demo, root / "vocoder")}


@pytest.fixture(scope="session")
def trained_stages(demo_tiny, tmp_path_factory) -> dict:
    """Stages A-D trained once per session on the tiny world (through the pipeline); returns the five
    tiny configs (letter -> dict). E's config points at A, B and C and is not trained here."""
    root = tmp_path_factory.mktemp("stages")
    configs = tiny_stage_configs(demo_tiny, root)
    stages = [{"stage": s, "config": write_config(root / f"stage_{s}.json", configs[s])} for s in "ABCD"]
    proc = run_script("-m", "omni.pipeline", write_config(root / "pipeline.json", {"stages": stages}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return configs


def record_cache_buffers(transformer) -> list:
    """Wrap a Transformer's forward: after each call with a KV cache, append the addresses of the
    cache's key and value buffers (the same list every step = allocated once, written in place)."""
    seen, forward = [], transformer.forward

    def recording(x, pad_mask=None, cache=None):
        out = forward(x, pad_mask, cache)
        if cache is not None:
            seen.append([t.data_ptr() for t in cache.keys + cache.values])
        return out

    transformer.forward = recording
    return seen


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs folder, where writes meet a real ENOSPC (mounting needs root: skipped where it
    cannot); unmounted after the test."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield small
    subprocess.run(["umount", str(small)], check=True)
