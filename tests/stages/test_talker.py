"""Stage D Talker: text normalisation, shapes (text and Thinker-state prefixes), KV-cache
generation that always stops, and the trained stage end to end: load_speaker -> speak -> WAV,
and infer.py --audio_out."""
import os

import pytest
import soundfile as sf
import torch

from conftest import record_cache_buffers, run_script, write_config
from omni.codec import CodecArch, SpeechCodec
from omni.generation import Speaker, write_wav
from omni.loading import load_speaker
from omni.talker import Talker, TalkerArch, normalize_text, text_to_ids

K, NQ = 16, 2


def tiny_talker(seed=0, **kw):
    torch.manual_seed(seed)
    arch = TalkerArch(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 128,
                         "dropout": 0.0, **kw})
    return Talker(arch, NQ, K).eval()


def sharpen(model):
    """Larger random weights: decisive predictions instead of near-ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def test_text_is_normalised_like_the_demo_world():
    assert normalize_text("  Hello, World!  Is it 42?") == "hello world is it 42"
    assert normalize_text("what's up") == "what's up"     # B and D share omni/transcripts.py
    assert text_to_ids("ab z").tolist() == [2, 3, 1, 27]
    assert text_to_ids("?!").numel() == 0


def test_forward_and_loss_shapes():
    talker = tiny_talker().train()
    texts = [text_to_ids("a red circle"), text_to_ids("hi")]
    codes = [torch.randint(0, K, (9, NQ)), torch.randint(0, K, (4, NQ))]
    logits, log_lengths = talker(texts, codes, sources=[0, 1])
    assert [lg.shape for lg in logits] == [(2, 12 + 9 + 1, K + 1), (2, 12 + 9 + 1, K)]   # EOS in codebook 0
    assert log_lengths.shape == (2,)
    loss, metrics = talker.loss(texts, codes, sources=[0, 1])
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["acc_0"] <= 1 and metrics["n_frames"] == 13
    assert metrics["len_err"] >= 0
    for p in (talker.text_embed.weight, talker.length_head.weight, talker.source.weight):
        assert p.grad.abs().sum() > 0


def test_length_prediction_sets_the_pace_of_generation():
    """The progress feature runs to 1 at the predicted length: a Talker told to expect longer
    speech gets other inputs at the same step, and a larger frame count when it is asked."""
    talker = tiny_talker()
    text = text_to_ids("a red circle")
    prefix = talker.prefixes([text])[0]
    talker.frames_per_char.fill_(1.5)
    assert talker.predicted_frames(prefix) == pytest.approx(1.5 * len(text))    # zero-initialised head
    with torch.no_grad():
        talker.length_head.bias.fill_(0.5)
    assert talker.predicted_frames(prefix) == pytest.approx(1.5 * len(text) * 2.718281828 ** 0.5)


def test_thinker_hidden_states_as_prefix():
    talker = tiny_talker(cond_dim=24)
    hidden = [torch.randn(7, 24), torch.randn(3, 24)]
    codes = [torch.randint(0, K, (5, NQ)), torch.randint(0, K, (2, NQ))]
    logits, _ = talker(hidden, codes)
    assert logits[0].shape == (2, 7 + 5 + 1, K + 1)
    out = talker.generate(hidden[0], max_frames=6)
    assert out.shape[1] == NQ and len(out) <= 6
    with pytest.raises(ValueError, match="cond_dim"):
        tiny_talker()(hidden, codes)


def test_text_window_hands_each_frame_the_characters_its_progress_points_at():
    talker = tiny_talker(text_window=1)
    talker.window_proj = torch.nn.Identity()           # see the window itself: [L, 3 * d]
    prefix = torch.arange(5.0)[:, None].repeat(1, 32) + 1    # character i is the vector (i + 1)
    window = talker.text_window_inputs(prefix, torch.tensor([0.0, 0.5, 0.99]))
    slots = window.view(3, 3, 32)[..., 0]
    assert slots.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 0]]   # zeros beyond either end


def test_generation_with_static_cache_matches_teacher_forcing_without_cache():
    talker = sharpen(tiny_talker(1, text_window=2))
    with torch.no_grad():
        talker.heads[0].bias[K] = -1e9                 # no EOS: run to the frame limit
    text = text_to_ids("a big blue star")
    with torch.no_grad():                               # predicted length = 20: the same progress inputs
        talker.length_head.weight.zero_()
        talker.frames_per_char.fill_(20 / len(text))
    seen = record_cache_buffers(talker.body)
    codes = talker.generate(text, max_frames=20)
    assert codes.shape == (20, NQ)
    assert len(seen) == 20 and all(addresses == seen[0] for addresses in seen)   # allocated once
    logits, _ = talker([text], [codes])                # the same frames, all at once, no cache
    n = len(text)
    for k in range(NQ):
        assert torch.equal(logits[k][0, n:n + 20].argmax(-1), codes[:, k])


def test_generation_always_stops():
    talker = sharpen(tiny_talker(2))
    text = text_to_ids("seven")
    with torch.no_grad():
        talker.heads[0].bias[K] = -1e9
    assert len(talker.generate(text)) == talker.max_frames(len(text))      # limit from the text length
    assert talker.max_frames(len(text)) < talker.max_frames(40)
    with torch.no_grad():
        talker.heads[0].bias[K] = 1e9
    assert len(talker.generate(text)) == 0                                # end of speech at once
    with torch.no_grad():
        talker.heads[0].bias[K] = -1e9
    long = text_to_ids("a" * 100)
    assert len(talker.generate(long)) <= talker.arch.max_seq_len - 101     # never past max_seq_len


def test_speaker_writes_a_16khz_wav_and_is_deterministic(tmp_path):
    torch.manual_seed(0)
    codec = SpeechCodec(CodecArch(codec_channels=16, latent_dim=8, codebook_size=K, n_codebooks=NQ)).eval()
    talker = sharpen(tiny_talker(3))
    with torch.no_grad():
        talker.heads[0].bias[K] = -1e9
    speaker = Speaker(talker, codec)
    wave = speaker.speak("hello there", temperature=0.8, seed=5)
    assert torch.equal(wave, speaker.speak("hello there", temperature=0.8, seed=5))
    frames = talker.max_frames(len("hello there"))
    assert wave.dim() == 1 and len(wave) == (frames * 4 - 1) * 160
    path = str(tmp_path / "out.wav")
    write_wav(path, wave, speaker.sample_rate)
    data, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and len(data) == len(wave) and sf.info(path).subtype == "PCM_16"
    assert speaker.speak("?!").numel() == 0


def tiny_stage_config(demo_dir, save_dir, **overrides) -> dict:
    cfg = {"seed": 1, "save_dir": str(save_dir), "demo_dir": "",
           "train_manifest": os.path.join(demo_dir, "tts_train.jsonl"),
           "val_manifest": os.path.join(demo_dir, "tts_val.jsonl"),
           "codec_channels": 16, "latent_dim": 8, "codebook_size": 16, "n_codebooks": 2,
           "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 256, "dropout": 0.1,
           "text_window": 2,
           "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12, "codec_steps": 6,
           "eval_interval": 4, "checkpoint_freq": 3, "keep_last_n": 10, "log_interval": 1, "eval_batches": 2,
           "asr_ckpt_dir": str(save_dir) + "_no_asr", "griffin_lim_iters": 8, "progress": False}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def trained_talker(demo_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("talker")
    cfg = tiny_stage_config(demo_tiny, folder / "run", extra_train_manifest=os.path.join(demo_tiny, "asr_train.jsonl"))
    proc = run_script("train_talker.py", "--config", write_config(folder / "cfg.json", cfg), check=True)
    assert "skipping the intelligibility metric" in proc.stdout
    return cfg["save_dir"]


def test_trained_stage_speaks_through_load_speaker(trained_talker, tmp_path):
    names = os.listdir(trained_talker)
    assert "talker.pt" in names and "talker_best.pt" in names
    speaker = load_speaker(trained_talker)
    wave = speaker.speak("a big red circle", temperature=0.7, seed=1)
    assert 0 < len(wave) <= (speaker.talker.max_frames(16) * 4) * 160
    assert torch.equal(wave, speaker.speak("a big red circle", temperature=0.7, seed=1))


def test_infer_says_text_into_a_wav(trained_talker, tmp_path):
    out = str(tmp_path / "said.wav")
    proc = run_script("infer.py", "--talker_dir", trained_talker, "--say", "What is two plus two?",
                      "--audio_out", out)
    assert proc.returncode == 0, proc.stderr
    data, rate = sf.read(out)
    assert rate == 16000 and len(data) > 0 and abs(data).max() > 0
    proc = run_script("infer.py", "--talker_dir", str(tmp_path / "none"), "--say", "hi", "--audio_out", out)
    assert proc.returncode == 2 and "train_talker.py" in proc.stderr
