"""Stage D speech codec: shapes, RVQ codes and gradients, EMA and dead-code restarts, codebook
usage on real speech, and the Griffin-Lim vocoder."""
import os

import torch

from omni.codec import CodecArch, SpeechCodec, VectorQuantizer, usage_perplexity
from omni.data.audio import read_audio
from omni.data.manifest import read_manifest
from omni.features import LogMel
from omni.layers import pad_stack
from omni.vocoder import GriffinLimVocoder

TINY = dict(codec_channels=32, latent_dim=16, n_codebooks=2, codebook_size=32)


def tiny_codec(seed=0, **kw):
    torch.manual_seed(seed)
    return SpeechCodec(CodecArch(**{**TINY, **kw}))


def batch(lengths=(37, 22), n_mels=80):
    mel, mask = pad_stack([torch.randn(n, n_mels) * 3 - 6 for n in lengths])
    return mel, mask


def test_encode_quantize_decode_shapes_and_code_range():
    codec = tiny_codec(downsample=4)
    mel, mask = batch((37, 22))
    recon, codes, cmask, commit = codec(mel, mask, update=True)
    assert recon.shape == mel.shape
    assert codes.shape == (2, 10, 2) and codes.dtype == torch.long      # ceil(37 / 4) code frames
    assert cmask.sum(1).tolist() == [10, 6]
    assert codes.min() >= 0 and codes.max() < 32
    assert commit.dim() == 0 and torch.isfinite(commit)
    again, again_mask = codec.encode(mel, mask)     # the update above moved codebooks: compare shapes
    assert again.shape == codes.shape and torch.equal(again_mask, cmask)
    assert codec.decode(again).shape == (2, 40, 80)                     # 4 mel frames per code frame
    assert tiny_codec(downsample=8).encode(mel, mask)[0].shape == (2, 5, 2)


def test_encode_without_update_is_pure_and_matches_forward():
    codec = tiny_codec()
    mel, mask = batch()
    codec(mel, mask, update=True)                   # initialise the codebooks from data
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    _, codes, _, _ = codec(mel, mask)               # update=False: nothing moves
    encoded, _ = codec.encode(mel, mask)
    assert torch.equal(codes, encoded)
    assert all(torch.equal(before[k], v) for k, v in codec.state_dict().items())


def test_straight_through_gradient_reaches_the_encoder():
    codec = tiny_codec()
    mel, mask = batch()
    recon, _, _, commit = codec(mel, mask, update=True)
    (codec.mel_error(recon, mel, mask) + commit).backward()
    assert codec.enc_in.weight.grad is not None and codec.enc_in.weight.grad.abs().sum() > 0
    assert codec.dec_out.weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in codec.buffers())


def test_ema_state_lives_in_the_state_dict():
    keys = tiny_codec().state_dict().keys()
    for name in ("codebook", "cluster_size", "embed_sum", "initialized"):
        assert f"rvq.layers.0.{name}" in keys and f"rvq.layers.1.{name}" in keys
    assert "train_batches" in keys


def test_ema_update_moves_codes_to_the_mean_of_their_vectors():
    vq = VectorQuantizer(2, 2, decay=0.0, dead_threshold=0.0)    # decay 0: the new mean at once
    vq.initialized.fill_(True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]])
    vq.update(x, vq.nearest(x))
    assert torch.allclose(vq.codebook, torch.tensor([[2.0, 1.0], [9.0, 9.0]]), atol=1e-3)


def test_dead_codes_are_restarted_onto_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, decay=0.9, dead_threshold=1.0)
    vq.initialized.fill_(True)
    vq.codebook.copy_(torch.full((8, 2), 100.0))
    vq.codebook[0] = 0.0
    vq.cluster_size.copy_(torch.tensor([50.0] + [1.05] * 7))    # codes 1..7 about to go dead
    x = torch.randn(64, 2)
    assert vq.nearest(x).unique().tolist() == [0]               # everything lands on code 0
    vq.update(x, vq.nearest(x))
    rows = (vq.codebook[1:, None, :] == x[None]).all(-1).any(-1)
    assert rows.all(), "every dead code now sits on one of the batch's vectors"
    assert len(vq.nearest(x).unique()) == 8
    assert (vq.cluster_size[1:] >= 1.0).all()                   # a grace period before the next check


def test_rvq_usage_does_not_collapse_on_demo_speech(demo_tiny):
    """A short codec training on real speech keeps both codebooks widely used."""
    records = read_manifest(os.path.join(demo_tiny, "tts_train.jsonl"), ["audio", "text"])[:32]
    logmel = LogMel()
    mels = [logmel(read_audio(r["audio"], 16000)) for r in records]
    codec = tiny_codec(seed=1, ema_decay=0.9)      # a faster EMA for a 60-step run
    opt = torch.optim.Adam(codec.parameters(), lr=3e-3)
    for step in range(60):
        mel, mask = pad_stack(mels[(step * 8) % 32:(step * 8) % 32 + 8], value=-11.5)
        recon, _, _, commit = codec(mel, mask, update=True)
        loss = codec.mel_error(recon, mel, mask) + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
    mel, mask = pad_stack(mels, value=-11.5)
    codes, cmask = codec.encode(mel, mask)
    for k in range(2):
        counts = torch.bincount(codes[..., k][cmask], minlength=32)
        assert usage_perplexity(counts) > 10, f"codebook {k} collapsed: {counts.tolist()}"
    assert usage_perplexity(torch.tensor([5, 0, 0, 0])) == 1.0
    assert abs(usage_perplexity(torch.ones(32)) - 32) < 1e-6


def test_griffin_lim_is_deterministic_and_keeps_the_spectrum(demo_tiny):
    records = read_manifest(os.path.join(demo_tiny, "tts_train.jsonl"), ["audio", "text"])
    wave = read_audio(records[0]["audio"], 16000)
    logmel = LogMel()
    mel = logmel(wave)
    vocoder = GriffinLimVocoder(n_iter=16)
    a, b = vocoder.mel_to_wave(mel), GriffinLimVocoder(n_iter=16).mel_to_wave(mel)
    assert torch.equal(a, b)
    assert a.dim() == 1 and len(a) == (len(mel) - 1) * 160
    assert a.pow(2).mean().sqrt() > 0.01                                # not silent
    again = logmel(a)
    assert (again - mel[:len(again)]).abs().mean() < 1.0                # close in log-mel terms
