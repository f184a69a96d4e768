"""Memory-mapped token shards (omni/data/shards.py): the same stream and windows as the in-memory
path, rebuilt when the corpus or tokenizer changes, crash-safe, O(1) access; the tokenizer's
bounded sample; Stage A trains and resumes exactly on shards."""
import os
import random

import pytest
import torch
from test_resume import run_stage

from conftest import assert_same_state, load_pt, thinker_config
from omni.data import shards
from omni.data.sampler import mix_seed
from omni.data.shards import Lines, open_split
from omni.data.text import TokenWindows, encode_documents, read_lines, unigram_entropy
from omni.tokenizer import Tokenizer, sample_lines


class MainRank:
    is_main = True

    def barrier(self):
        pass


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return Tokenizer.train([corpus[0]], str(tmp_path_factory.mktemp("tok") / "t.model"), 120)


def build(tokenizer, lines, folder, shard_tokens=97, split="train"):
    return open_split(tokenizer, split, lines, str(folder), shard_tokens, MainRank(), progress=False)


def test_shard_stream_and_windows_equal_the_in_memory_path(tokenizer, corpus, tmp_path):
    train = corpus[0]
    lines = read_lines(train)
    # 97-token shards: most windows of 17 tokens cross a shard boundary at some epoch offset
    tokens = build(tokenizer, Lines((train,)), tmp_path)
    memory = encode_documents(tokenizer, lines)
    assert len(tokens.shards) > 10 and torch.equal(tokens[0:len(tokens)], memory.long())
    assert tokens.unigram_entropy == pytest.approx(unigram_entropy(torch.bincount(memory.long())), abs=1e-12)
    for seed in (3, None):
        a, b = TokenWindows(tokens, 16, seed, "x"), TokenWindows(memory, 16, seed, "x")
        assert len(a) == len(b)
        for epoch in range(3):
            assert all(torch.equal(a[(i, epoch)], b[(i, epoch)]) for i in range(len(a)))
    # held-out validation across two files: every 20th line, as the in-memory stage split them
    both = lines + read_lines(corpus[1])
    for part, expect in (("train", [x for i, x in enumerate(both) if i % 20 != 19]), ("val", both[19::20])):
        held = build(tokenizer, Lines((train, corpus[1]), 20, part), tmp_path / part, split=part)
        assert torch.equal(held[0:len(held)], encode_documents(tokenizer, expect).long()), part


def test_a_late_window_reads_only_its_own_shard(tokenizer, corpus, tmp_path):
    tokens = build(tokenizer, Lines((corpus[0],)), tmp_path, shard_tokens=50)
    windows = TokenWindows(tokens, 16, 3, "x")
    assert len(windows) > 0 and tokens.maps == {}        # length needs no shard
    last, epoch = len(windows) - 1, 1
    start = last * 16 + mix_seed(3, epoch) % 16
    expected = encode_documents(tokenizer, read_lines(corpus[0])).long()
    needed = {start // 50, (start + 16) // 50}
    # every other shard is gone: the window must not need them
    for i, shard in enumerate(tokens.shards):
        if i not in needed:
            os.unlink(tmp_path / shard["file"])
    tokens.maps.clear()
    assert torch.equal(windows[(last, epoch)], expected[start:start + 17])
    assert set(tokens.maps) == needed and len(tokens.shards) > 50


def read_log(capsys):
    return capsys.readouterr().out


def test_changed_corpus_tokenizer_or_shard_is_detected_and_retokenized(tokenizer, corpus, tmp_path, capsys):
    text = tmp_path / "c.txt"
    text.write_text(open(corpus[0]).read())
    folder = tmp_path / "tokens"
    first = build(tokenizer, Lines((str(text),)), folder)
    assert "not tokenized yet" in read_log(capsys)
    build(tokenizer, Lines((str(text),)), folder)
    assert "tokenizing" not in read_log(capsys)          # unchanged: reused as is

    with open(text, "a") as f:
        f.write("a big green square is below a small red circle\n")
    again = build(tokenizer, Lines((str(text),)), folder)
    assert f"{text} changed" in read_log(capsys) and len(again) > len(first)
    assert torch.equal(again[0:len(again)], encode_documents(tokenizer, read_lines(str(text))).long())

    other = Tokenizer.train([corpus[0]], str(tmp_path / "other.model"), 100)
    retok = build(other, Lines((str(text),)), folder)
    assert "the tokenizer changed" in read_log(capsys)
    assert torch.equal(retok[0:len(retok)], encode_documents(other, read_lines(str(text))).long())

    with open(folder / retok.shards[3]["file"], "r+b") as f:       # a damaged shard
        f.truncate(10)
    build(other, Lines((str(text),)), folder)
    assert "wrong size" in read_log(capsys)


def test_a_crash_while_tokenizing_leaves_no_index_entry_and_the_next_start_redoes_it(
        tokenizer, corpus, tmp_path, monkeypatch):
    text = tmp_path / "c.txt"
    text.write_text(open(corpus[0]).read())
    build(tokenizer, Lines((str(text),)), tmp_path)
    with open(text, "a") as f:
        f.write("a small blue triangle\n")
    calls = []

    def crash(self, tokens):
        calls.append(1)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(shards.ShardWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        build(tokenizer, Lines((str(text),)), tmp_path)
    assert calls and "train" not in shards.read_index(str(tmp_path))["splits"]
    monkeypatch.undo()
    tokens = build(tokenizer, Lines((str(text),)), tmp_path)
    assert torch.equal(tokens[0:len(tokens)], encode_documents(tokenizer, read_lines(str(text))).long())


class WideVocab:
    """A tokenizer with 70,000 pieces: its ids do not fit in 16 bits."""

    def __init__(self, real):
        self.real, self.path, self.vocab_size = real, real.path, 70_000
        self.bos_id, self.eos_id = real.bos_id, real.eos_id
        self.sp = self

    def encode(self, lines):
        return [[i + 69_000 for i in ids] for ids in self.real.sp.encode(lines)]


def test_token_dtype_follows_the_vocab_size(tokenizer, corpus, tmp_path):
    narrow = build(tokenizer, Lines((corpus[1],)), tmp_path / "narrow", shard_tokens=10**6)
    wide = build(WideVocab(tokenizer), Lines((corpus[1],)), tmp_path / "wide", shard_tokens=10**6)
    assert os.path.getsize(tmp_path / "narrow" / "train_00000.bin") == 2 * len(narrow)
    assert os.path.getsize(tmp_path / "wide" / "train_00000.bin") == 4 * len(wide)
    n, w = narrow[0:len(narrow)], wide[0:len(wide)]
    body = (n != tokenizer.bos_id) & (n != tokenizer.eos_id)
    assert len(n) == len(w) and int(w.max()) > 2**16 and torch.equal(w[body], n[body] + 69_000)


def test_tokenizer_sample_is_bounded_spread_and_deterministic(tokenizer, corpus, tmp_path):
    path = tmp_path / "numbered.txt"
    path.write_text("".join(f"line {i:06d} a small red circle\n" for i in range(20_000)))   # 600 kB
    sample = list(sample_lines([str(path)], 60_000))
    numbers = [int(line.split()[1]) for line in sample]
    assert sample == list(sample_lines([str(path)], 60_000))
    assert 60_000 <= sum(len(x) + 1 for x in sample) <= 60_000 * 1.1
    assert numbers == sorted(set(numbers))                 # whole lines, in order, no repeats
    assert numbers[0] == 0 and numbers[-1] > 18_500        # from the start into the last of 14 blocks
    # a corpus smaller than the sample trains exactly as without sampling (the demo's tokenizer)
    whole = Tokenizer.train([corpus[0]], str(tmp_path / "whole.model"), 120, sample_bytes=10**8)
    assert open(whole.path, "rb").read() == open(tokenizer.path, "rb").read()
    a = Tokenizer.train([str(path)], str(tmp_path / "a.model"), 100, sample_bytes=30_000)
    b = Tokenizer.train([str(path)], str(tmp_path / "b.model"), 100, sample_bytes=30_000)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()
    assert a.decode(a.encode("line 000123 a small red circle")) == "line 000123 a small red circle"


def test_stage_a_trains_and_resumes_exactly_on_many_shards(corpus, tmp_path):
    """Windows crossing 37-token shards: the result equals one big shard's, and a SIGKILL + resume
    ends bit-identical, without tokenizing again."""
    ref = thinker_config(corpus, tmp_path / "one_shard", max_steps=9)
    assert run_stage("train_text.py", ref, tmp_path, "ref").returncode == 0
    cfg = thinker_config(corpus, tmp_path / "many", max_steps=9, token_shard_size=37)
    kill_at = random.randint(cfg["checkpoint_freq"] + 1, cfg["max_steps"] - 1)
    proc = run_stage("train_text.py", cfg, tmp_path, "many", env={"OMNI_TEST_KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -9 and "tokenizing the train text" in proc.stdout, proc.stderr
    index = shards.read_index(os.path.join(cfg["save_dir"], "tokens"))
    assert len(index["splits"]["train"]["shards"]) > 100
    proc = run_stage("train_text.py", cfg, tmp_path, "many")
    assert proc.returncode == 0 and "tokenizing" not in proc.stdout, proc.stderr
    assert "resumed from" in proc.stdout
    got, expected = load_pt(os.path.join(cfg["save_dir"], "thinker.pt")), load_pt(tmp_path / "one_shard" / "thinker.pt")
    assert_same_state(got, expected, ["model", "optimizer"])
