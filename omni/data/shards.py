"""Token shards: a text corpus tokenized once into memory-mapped files, then read as one stream.

Contract (docs/data.md, "Text corpora larger than memory"):
- `save_dir/tokens/` (beside tokenizer.model) holds, per split ("train", "val"), the files
  `{split}_{i:05d}.bin`: raw little-endian token ids, uint16 when the tokenizer has fewer than
  65536 pieces, else uint32; every shard holds exactly `shard_tokens` ids but the last. `index.json`
  describes them: per split its signature, shard files and token counts, documents and the
  unigram entropy of its tokens.
- The stream is the one `omni.data.text.encode_documents` builds in memory: `<s> ids </s>` for
  every non-empty stripped line of the files, in order (`Lines` picks which lines). Windows cut
  from it are therefore the same as the in-memory path's; they cross shard boundaries freely.
- A split is reused when its signature (the tokenizer file's sha256, the dtype, the shard size,
  each source file's absolute path, size and mtime, and the line selection) matches and every
  shard has its recorded size. Otherwise it is re-tokenized and the log says why: the files are
  the truth, the shards only a cache of them. Files are compared by size and mtime, not hashed, so
  a start costs the same whatever the corpus size.
- Crash safety: the split's entry leaves index.json before its shards are rewritten and comes
  back (atomically) only after the last shard is fsynced, so a crash mid-tokenization leaves no
  entry and the next start redoes the split.
- Tokenizing streams the files line by line (a batch of lines at a time) and shows progress in MB.
- `ShardedTokens` maps a shard (np.memmap) only when a slice first touches it: opening costs
  nothing per token, `len()` and a slice are O(1) (the shard is position // shard_tokens).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from omni.checkpoint import write_json
from omni.data.common import DataError
from omni.data.text import iter_lines, unigram_entropy
from omni.logs import Progress, log

TOKENS_DIR = "tokens"
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
ENCODE_BATCH_BYTES = 4 << 20         # lines handed to SentencePiece at once (bounded memory)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


@dataclass(frozen=True)
class Lines:
    """Which lines of which files form a split. With holdout_every k, line i (counting non-empty
    lines through all files) is held out for validation when i % k == k - 1: part "val" takes
    those lines, part "train" the others; k = 0 takes every line."""
    files: tuple[str, ...]
    holdout_every: int = 0
    part: str = "train"

    def __iter__(self):
        """(line, bytes read since the previous line) for the selected lines."""
        k, pending, i = self.holdout_every, 0, 0
        for path in self.files:
            for line, nbytes in iter_lines(path):
                pending += nbytes
                held = k > 0 and i % k == k - 1
                i += 1
                if not k or held == (self.part == "val"):
                    yield line, pending
                    pending = 0

    def describe(self) -> dict:
        return {"holdout_every": self.holdout_every, "part": self.part if self.holdout_every else "all"}


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def signature(tokenizer, lines: Lines, shard_tokens: int) -> dict:
    sources = []
    for path in lines.files:
        st = os.stat(path)
        sources.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"tokenizer_sha256": file_hash(tokenizer.path), "dtype": token_dtype(tokenizer.vocab_size).name,
            "shard_tokens": shard_tokens, "sources": sources, "lines": lines.describe()}


def read_index(folder: str) -> dict:
    """index.json, or an empty index when it is missing or unreadable (every split gets rebuilt)."""
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format_version") == FORMAT_VERSION and isinstance(index.get("splits"), dict):
            return index
    except (OSError, ValueError):
        pass
    return {"format_version": FORMAT_VERSION, "splits": {}}


def stale_reason(entry: dict | None, wanted: dict, folder: str) -> str | None:
    """Why a split's shards cannot be used as they are (None: they can)."""
    if entry is None:
        return "not tokenized yet"
    old = entry["signature"]
    if old["tokenizer_sha256"] != wanted["tokenizer_sha256"]:
        return "the tokenizer changed"
    old_sources = {s["path"]: s for s in old["sources"]}
    for source in wanted["sources"]:
        if source["path"] not in old_sources:
            return f"{source['path']} is new"
        if old_sources[source["path"]] != source:
            return f"{source['path']} changed (size or modification time)"
    if [s["path"] for s in old["sources"]] != [s["path"] for s in wanted["sources"]]:
        return "the list of files changed"
    for key in ("lines", "shard_tokens", "dtype"):
        if old[key] != wanted[key]:
            return f"{key} changed ({old[key]} -> {wanted[key]})"
    itemsize = np.dtype(old["dtype"]).itemsize
    for shard in entry["shards"]:
        path = os.path.join(folder, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["tokens"] * itemsize:
            return f"{path} is missing or has the wrong size"
    return None


class ShardWriter:
    """Appends token arrays to {split}_{i:05d}.bin files of exactly shard_tokens ids each."""

    def __init__(self, folder: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_file()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            self.file.write(chunk.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(chunk)

    def _next_file(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.folder, name), "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards


def documents(tokenizer, lines: list[str], dtype: np.dtype) -> np.ndarray:
    """`<s> ids </s>` for every line, as one array (what encode_documents makes, without lists per token)."""
    ids = tokenizer.sp.encode(lines)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()) + 2 * len(ids), dtype=dtype)
    bos = np.cumsum(lengths + 2) - (lengths + 2)
    eos = bos + lengths + 1
    body = np.ones(len(out), dtype=bool)
    body[bos] = body[eos] = False
    out[bos], out[eos] = tokenizer.bos_id, tokenizer.eos_id
    out[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return out


def tokenize(tokenizer, split: str, lines: Lines, folder: str, shard_tokens: int, progress: bool = True) -> dict:
    """Write a split's shards (removing its old ones) and return its index entry."""
    for old in glob.glob(os.path.join(folder, f"{split}_*.bin")):
        os.unlink(old)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(folder, split, dtype, shard_tokens)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    total_mb = max(1, math.ceil(sum(os.path.getsize(p) for p in lines.files) / 1e6))
    bar = Progress(total_mb, f"tokenizing {split} text", unit="MB", enabled=progress)
    batch, batch_bytes, read_bytes, shown_mb, n_docs = [], 0, 0, 0, 0

    def flush():
        tokens = documents(tokenizer, batch, dtype)
        counts[:] += np.bincount(tokens, minlength=len(counts))[:len(counts)]
        writer.add(tokens)
        batch.clear()

    try:
        for line, nbytes in lines:
            batch.append(line)
            batch_bytes, read_bytes, n_docs = batch_bytes + len(line), read_bytes + nbytes, n_docs + 1
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush()
                batch_bytes, mb = 0, int(read_bytes / 1e6)
                bar.update(mb - shown_mb)
                shown_mb = mb
        if batch:
            flush()
        bar.update(total_mb - shown_mb)
    finally:
        shards = writer.close()
        bar.close()
    return {"signature": signature(tokenizer, lines, shard_tokens), "shards": shards,
            "tokens": int(sum(s["tokens"] for s in shards)), "documents": n_docs,
            "unigram_entropy": unigram_entropy(torch.from_numpy(counts)) if counts.any() else float("nan")}


def ensure_split(tokenizer, split: str, lines: Lines, folder: str, shard_tokens: int, rt, progress=True) -> dict:
    """The split's index entry, tokenizing it first when it is missing or stale (see the module doc)."""
    os.makedirs(folder, exist_ok=True)
    index = read_index(folder)
    wanted = signature(tokenizer, lines, shard_tokens)
    reason = stale_reason(index["splits"].get(split), wanted, folder)
    if reason is None:
        return index["splits"][split]
    log(rt, f"tokenizing the {split} text into {folder} ({reason})")
    if split in index["splits"]:       # no entry while the shards are rewritten: a crash leaves none
        del index["splits"][split]
        write_json(os.path.join(folder, INDEX_FILE), index)
    entry = tokenize(tokenizer, split, lines, folder, shard_tokens, progress)
    if stale_reason(entry, wanted, folder) is not None:
        raise DataError(f"{', '.join(lines.files)}: changed while it was being tokenized; run again")
    index = read_index(folder)
    index["splits"][split] = entry
    write_json(os.path.join(folder, INDEX_FILE), index)
    return entry


class ShardedTokens:
    """A split's token stream, read from its shards through memory maps opened on first use.
    `tokens[a:b]` is an int64 tensor (a copy of just those ids); `unigram_entropy` and
    `documents` come from the index."""

    def __init__(self, folder: str, entry: dict):
        self.folder, self.shards = folder, entry["shards"]
        self.shard_tokens = entry["signature"]["shard_tokens"]
        self.dtype = np.dtype(entry["signature"]["dtype"])
        self.length, self.documents = entry["tokens"], entry["documents"]
        self.unigram_entropy = entry["unigram_entropy"]
        self.maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.length

    def shard(self, i: int) -> np.memmap:
        if i not in self.maps:
            path = os.path.join(self.folder, self.shards[i]["file"])
            self.maps[i] = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.shards[i]["tokens"],))
        return self.maps[i]

    def __getitem__(self, key: slice) -> torch.Tensor:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("ShardedTokens supports contiguous slices only")
        pieces = []
        while start < stop:
            i, offset = divmod(start, self.shard_tokens)
            n = min(stop - start, self.shards[i]["tokens"] - offset)
            pieces.append(self.shard(i)[offset:offset + n])
            start += n
        out = np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)
        return torch.from_numpy(out.astype(np.int64))

    def __getstate__(self):
        # DataLoader workers started by spawn receive a pickled dataset: they map the shards themselves.
        return {**self.__dict__, "maps": {}}


def open_split(tokenizer, split: str, lines: Lines, folder: str, shard_tokens: int, rt,
               progress: bool = True) -> ShardedTokens:
    """The split's shards, tokenized by the main rank when needed; the other ranks wait for it."""
    if rt.is_main:
        ensure_split(tokenizer, split, lines, folder, shard_tokens, rt, progress)
    rt.barrier()
    entry = read_index(folder)["splits"].get(split)
    if stale_reason(entry, signature(tokenizer, lines, shard_tokens), folder) is not None:
        raise DataError(f"{folder}: the {split} token shards do not match this config (another run rewrote them?)")
    return ShardedTokens(folder, entry)
