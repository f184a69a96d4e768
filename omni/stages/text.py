"""Stage A: the Thinker, a decoder-only language model trained on text corpora."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch.nn.functional as F

from omni import checkpoint as ckpt
from omni.config import TrainConfig, UserError, above, positive
from omni.data.common import require_files
from omni.data.shards import TOKENS_DIR, Lines, open_split
from omni.data.text import TokenWindows, perplexity
from omni.logs import log
from omni.registry import STAGES
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer
from omni.train.stage import Stage

TOKENIZER_FILE = ckpt.TOKENIZER_FILE


@dataclass
class TextConfig(TrainConfig, ThinkerArch):
    train_files: list[str] = field(default_factory=lambda: ["data/demo/text/train.txt"])
    val_file: str = "data/demo/text/val.txt"   # "" = hold out val_fraction of the training lines
    val_fraction: float = above(0.05)
    seq_len: int = positive(128)        # training window; at most max_seq_len
    tokenizer_model: str = ""           # an existing SentencePiece model to use instead of training one
    tokenizer_sample_bytes: int = positive(100_000_000)  # a larger corpus trains the tokenizer on a sample
    token_shard_size: int = positive(2**26)   # token ids per file in save_dir/tokens (128 MB as uint16)
    save_dir: str = "checkpoints/thinker_tiny"


def prepare_tokenizer(cfg, rt) -> Tokenizer:
    """save_dir/tokenizer.model: kept if present, else copied from tokenizer_model or trained."""
    path = os.path.join(cfg.save_dir, TOKENIZER_FILE)
    if rt.is_main and not os.path.isfile(path):
        if cfg.tokenizer_model:
            if not os.path.isfile(cfg.tokenizer_model):
                raise UserError(f"config key 'tokenizer_model': file not found: {cfg.tokenizer_model}")
            shutil.copyfile(cfg.tokenizer_model, path)
        else:
            size = sum(os.path.getsize(p) for p in cfg.train_files)
            sample = f" (a {cfg.tokenizer_sample_bytes / 1e6:g} MB sample of {size / 1e6:.4g} MB)" \
                if size > cfg.tokenizer_sample_bytes else ""
            log(rt, f"training a {cfg.vocab_size}-piece BPE tokenizer on {', '.join(cfg.train_files)}{sample}")
            Tokenizer.train(cfg.train_files, path, cfg.vocab_size, cfg.tokenizer_sample_bytes)
    rt.barrier()
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"config key 'vocab_size': {cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} pieces ({path})")
    return tokenizer


class TextStage(Stage):
    spec = STAGES["A"]
    config_class = TextConfig
    val_key = "val_file"

    def setup(self):
        cfg = self.cfg
        if cfg.seq_len > cfg.max_seq_len:
            raise UserError(f"config key 'seq_len': {cfg.seq_len} exceeds max_seq_len {cfg.max_seq_len}")
        # Without val_file, validation is held out of the training text, so even evaluation reads it.
        read_train = not self.evaluation_only or not cfg.val_file
        files = {"train_files": cfg.train_files if read_train else [],
                 "val_file": [cfg.val_file] if cfg.val_file else []}
        require_files(cfg, files, self.rt)
        self.tokenizer = prepare_tokenizer(cfg, self.rt)
        # Without val_file, every k-th line of the training files is held out, so it spans the corpus.
        k = 0 if cfg.val_file else max(2, round(1 / cfg.val_fraction))
        val_lines = Lines((cfg.val_file,)) if cfg.val_file else Lines(tuple(cfg.train_files), k, "val")
        val_tokens = self.token_stream("val", val_lines)
        self.val_data = TokenWindows(val_tokens, cfg.seq_len, None, cfg.val_file or "validation text")
        self.unigram = None
        if not self.evaluation_only:
            train_tokens = self.token_stream("train", Lines(tuple(cfg.train_files), k, "train"))
            self.train_data = TokenWindows(train_tokens, cfg.seq_len, cfg.seed, "training text")
            self.unigram = train_tokens.unigram_entropy
            log(self.rt, f"thinker: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens; "
                         f"unigram entropy {self.unigram:.3f} nats/token (the loss to beat)")
        self.modules = {"model": Thinker(ThinkerArch.from_config(cfg))}

    def token_stream(self, split: str, lines: Lines):
        """The split's tokens, memory-mapped from save_dir/tokens (tokenized there at the first start)."""
        folder = os.path.join(self.cfg.save_dir, TOKENS_DIR)
        return open_split(self.tokenizer, split, lines, folder, self.cfg.token_shard_size, self.rt,
                          progress=self.cfg.progress)

    def loss(self, batch):
        logits = self.modules["model"](batch[:, :-1])
        targets = batch[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, {"n_tokens": targets.numel()}

    def evaluate(self):
        val_loss = self.mean_loss(self.val_data)
        out = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if self.unigram is not None:    # a figure of the training text, which evaluation does not read
            out["unigram_entropy"] = self.unigram
        return out
