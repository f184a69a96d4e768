"""Stage A: the Thinker, a decoder-only language model trained on text corpora."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch.nn.functional as F

from omni.config import TrainConfig, UserError
from omni.data.common import require_files
from omni.data.text import TokenWindows, encode_documents, perplexity, read_lines, unigram_entropy
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer
from omni.logs import log
from omni.stage import Stage

TOKENIZER_FILE = "tokenizer.model"


@dataclass
class TextConfig(TrainConfig, ThinkerArch):
    train_files: list[str] = field(default_factory=lambda: ["data/demo/text/train.txt"])
    val_file: str = "data/demo/text/val.txt"   # "" = hold out val_fraction of the training lines
    val_fraction: float = 0.05
    seq_len: int = 128                  # training window; at most max_seq_len
    tokenizer_model: str = ""           # an existing SentencePiece model to use instead of training one


def prepare_tokenizer(cfg, rt) -> Tokenizer:
    """save_dir/tokenizer.model: kept if present, else copied from tokenizer_model or trained."""
    path = os.path.join(cfg.save_dir, TOKENIZER_FILE)
    if rt.is_main and not os.path.isfile(path):
        if cfg.tokenizer_model:
            if not os.path.isfile(cfg.tokenizer_model):
                raise UserError(f"config key 'tokenizer_model': file not found: {cfg.tokenizer_model}")
            shutil.copyfile(cfg.tokenizer_model, path)
        else:
            log(rt, f"training a {cfg.vocab_size}-piece BPE tokenizer on {', '.join(cfg.train_files)}")
            Tokenizer.train(cfg.train_files, path, cfg.vocab_size)
    rt.barrier()
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"config key 'vocab_size': {cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} pieces ({path})")
    return tokenizer


class TextStage(Stage):
    prefix = "thinker"
    config_class = TextConfig
    make_command = "python train_text.py --config configs/thinker_tiny.json"
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
        train_lines = [line for path in cfg.train_files for line in read_lines(path)] if read_train else []
        if cfg.val_file:
            val_lines = read_lines(cfg.val_file)
        else:   # every k-th line, so the held-out part spans the whole corpus
            k = max(2, round(1 / cfg.val_fraction))
            train_lines, val_lines = ([x for i, x in enumerate(train_lines) if i % k != k - 1],
                                      train_lines[k - 1::k])
        val_tokens = encode_documents(self.tokenizer, val_lines)
        self.val_data = TokenWindows(val_tokens, cfg.seq_len, None, cfg.val_file or "validation text")
        self.unigram = None
        if not self.evaluation_only:
            train_tokens = encode_documents(self.tokenizer, train_lines)
            self.train_data = TokenWindows(train_tokens, cfg.seq_len, cfg.seed, "training text")
            self.unigram = unigram_entropy(train_tokens, cfg.vocab_size)
            log(self.rt, f"thinker: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens; "
                         f"unigram entropy {self.unigram:.3f} nats/token (the loss to beat)")
        self.modules = {"model": Thinker(ThinkerArch.from_config(cfg))}

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
