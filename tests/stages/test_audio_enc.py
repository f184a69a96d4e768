"""Stage B: the audio encoder, CTC decoding, CER/WER, checkpoint loaders and a quick learning run."""
import json
import math
import os

import pytest
import torch

from conftest import load_pt, run_script, write_config
from omni.audio_enc import (
    ASR,
    BLANK,
    CHARSET,
    VOCAB_SIZE,
    AudioEncArch,
    AudioEncoder,
    ctc_greedy_decode,
    downsampled_mask,
    ids_to_text,
    normalize_text,
    text_to_ids,
)
from omni.config import UserError
from omni.data.audio import read_audio
from omni.loading import load_asr, load_audio_encoder
from omni.metrics import cer, edit_distance, error_counts, wer

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0}


def audio_enc_config(demo_dir, save_dir, **overrides) -> dict:
    """A tiny Stage B config on the tiny demo world (a run of 12 steps takes a few seconds)."""
    cfg = {"seed": 1, "save_dir": str(save_dir), "train_manifest": f"{demo_dir}/asr_train.jsonl",
           "val_manifest": f"{demo_dir}/asr_val.jsonl", "test_manifest": f"{demo_dir}/asr_test.jsonl",
           "d_model": 32, "n_layers": 1, "n_heads": 2, "downsample": 4, "dropout": 0.1,
           "spec_augment": True, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12,
           "eval_interval": 4, "checkpoint_freq": 3, "keep_last_n": 10, "log_interval": 1,
           "eval_batches": 2, "progress": False}
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------- text and metrics
def test_charset_is_blank_space_apostrophe_then_letters():
    assert BLANK == 0 and VOCAB_SIZE == 29
    assert text_to_ids(" ") == [] and text_to_ids("a b") == [3, 1, 4]
    assert text_to_ids("o'z") == [17, 2, 28] and text_to_ids("'z'") == [28]   # quotes are not apostrophes
    assert normalize_text("  Don't-STOP,  now!") == "don't stop now"
    assert ids_to_text(text_to_ids("what is two plus two")) == "what is two plus two"
    assert CHARSET.index("a") + 1 == 3


def test_greedy_ctc_merges_repeats_drops_blanks_and_respects_lengths():
    # frames: h h _ e l l _ l o | padding that would say "x"
    path = ["h", "h", None, "e", "l", "l", None, "l", "o", "x", "x"]
    ids = [BLANK if c is None else text_to_ids(c)[0] for c in path]
    scores = torch.full((2, len(ids), VOCAB_SIZE), -5.0)
    scores[0, torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    scores[1, :, BLANK] = 0.0
    out = ctc_greedy_decode(scores, torch.tensor([9, 11]))
    assert ids_to_text(out[0]) == "hello"
    assert out[1] == []


def test_edit_distance_cer_wer_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance(["a", "b"], ["a", "b"]) == 0
    assert cer("abcd", "abce") == pytest.approx(0.25)
    assert wer("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert wer("a b c d", "a x d") == pytest.approx(2 / 4)       # one substitution, one deletion
    # corpus level: edits and lengths are summed before dividing
    assert cer(["ab", "abcdefgh"], ["xb", "abcdefgh"]) == pytest.approx(1 / 10)
    assert error_counts(["one two", "three"], ["one", "three"], "word") == (1, 3)


# ----------------------------------------------------------------------------- shapes and masks
@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_encoder_downsamples_lengths_and_masks(factor):
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncArch(downsample=factor, **TINY)).eval()
    lengths = [37, 100, 8]
    mel = torch.randn(3, 100, 80)
    mask = torch.arange(100)[None] < torch.tensor(lengths)[:, None]
    hidden, out_mask = enc(mel, mask)
    expected = [math.ceil(n / factor) for n in lengths]
    assert hidden.shape == (3, math.ceil(100 / factor), enc.out_dim)
    assert out_mask.sum(dim=1).tolist() == expected
    assert torch.equal(downsampled_mask(mask, factor), out_mask)
    # a clip gives the same result alone as padded inside a batch
    alone, _ = enc(mel[:1, :37], mask[:1, :37])
    assert torch.allclose(alone[0], hidden[0, :expected[0]], atol=1e-5)


def test_downsample_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        AudioEncoder(AudioEncArch(downsample=3, **TINY))


# ----------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, demo_tiny):
    """A Stage B run of a few steps (the full checkpoint format)."""
    folder = tmp_path_factory.mktemp("audio_enc")
    cfg = audio_enc_config(demo_tiny, folder / "run", max_steps=6, eval_interval=6, checkpoint_freq=6)
    run_script("train_audio_enc.py", "--config", write_config(folder / "cfg.json", cfg), check=True)
    return str(folder / "run")


def _waves(demo_dir, n=3):
    with open(os.path.join(demo_dir, "asr_val.jsonl")) as f:
        records = [json.loads(line) for line in f][:n]
    return [read_audio(os.path.join(demo_dir, r["audio"]), 16000) for r in records]


def _rewrite(src_dir, dst_dir, make):
    """Copy a run's config and best checkpoint into dst_dir in another format."""
    os.makedirs(dst_dir)
    obj = load_pt(os.path.join(src_dir, "audio_enc_best.pt"))
    torch.save(make(obj), os.path.join(dst_dir, "audio_enc_best.pt"))
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())


def test_loaders_accept_full_weights_only_and_legacy(trained_dir, demo_tiny, tmp_path):
    def weights_only(o):
        return {k: o[k] for k in ("enc", "head", "step", "config", "format_version")}

    def legacy(o):
        return {f"{k}.{n}": t for k in ("enc", "head") for n, t in o[k].items()}
    _rewrite(trained_dir, tmp_path / "weights", weights_only)
    _rewrite(trained_dir, tmp_path / "legacy", legacy)
    waves = _waves(demo_tiny)
    expected = None
    for folder in (trained_dir, tmp_path / "weights", tmp_path / "legacy"):
        enc = load_audio_encoder(str(folder), "cpu")
        assert isinstance(enc, AudioEncoder) and not enc.training and enc.out_dim == 32
        asr = load_asr(str(folder), "cpu")
        assert isinstance(asr, ASR)
        texts = asr.transcribe(waves)
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
        assert expected is None or texts == expected
        expected = texts


def test_loader_without_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(UserError, match="train_audio_enc.py"):
        load_asr(str(tmp_path), "cpu")


def test_transcribe_batched_equals_one_by_one(trained_dir, demo_tiny):
    asr = load_asr(trained_dir, "cpu")
    waves = _waves(demo_tiny, 4)
    assert asr.transcribe(waves, batch_size=4) == [asr.transcribe([w])[0] for w in waves]


def test_validation_reports_loss_cer_wer(trained_dir):
    with open(os.path.join(trained_dir, "metrics.jsonl")) as f:
        val = [json.loads(line) for line in f if '"val"' in line][-1]
    for key in ("val_loss", "cer", "wer", "test_cer", "test_wer"):
        assert key in val and math.isfinite(val[key])


# ----------------------------------------------------------------------------- it learns
def test_ctc_loss_falls_on_the_tiny_world(demo_tiny, tmp_path):
    """A few hundred steps of a tiny model: the CTC loss drops well below its start (~ 20 s)."""
    cfg = audio_enc_config(demo_tiny, tmp_path / "learn", d_model=64, n_layers=2, n_heads=4, dropout=0.0,
                           batch_size=16, lr=3e-3, warmup_steps=20, max_steps=150, eval_interval=150,
                           checkpoint_freq=150, log_interval=10, eval_batches=0)
    run_script("train_audio_enc.py", "--config", write_config(tmp_path / "cfg.json", cfg), check=True)
    with open(tmp_path / "learn" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r["loss"] for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"][-1]
    assert train[-1] < 0.6 * train[0], train
    assert val["cer"] < 0.9, val
