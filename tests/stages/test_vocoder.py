"""Stage F, the neural vocoder: the length convention of every Vocoder, chunked synthesis with
context_frames equal to whole synthesis, a few training steps that resume bit-exactly after a kill,
load_speaker's choice of vocoder, and one-line errors for its config keys."""
import dataclasses
import math
import os

import pytest
import torch
from test_talker import trained_talker  # noqa: F401 (fixture)

from conftest import assert_same_state, load_pt, run_script, write_config
from omni.loading import load_speaker, load_vocoder
from omni.stages.vocoder import anti_wrap, phase_loss, stft, stft_loss
from omni.vocoder import GriffinLimVocoder, NeuralVocoder, VocoderArch

TINY = VocoderArch(vocoder_dim=16, vocoder_layers=2, vocoder_ffn=32)


def vocoder_config(demo_dir, save_dir, **overrides) -> dict:
    cfg = {"seed": 2, "save_dir": str(save_dir), "demo_dir": "",
           "train_manifest": os.path.join(demo_dir, "tts_train.jsonl"),
           "val_manifest": os.path.join(demo_dir, "tts_val.jsonl"),
           "vocoder_dim": 16, "vocoder_layers": 2, "vocoder_ffn": 32, "crop_frames": 16,
           "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12, "eval_interval": 4,
           "checkpoint_freq": 3, "keep_last_n": 10, "log_interval": 1, "eval_batches": 2, "eval_clips": 2,
           "griffin_lim_iters": 4, "progress": False}
    cfg.update(overrides)
    return cfg


def run_stage(script, cfg, tmp_path, name, env=None):
    return run_script(script, "--config", write_config(tmp_path / f"{name}.json", cfg), env=env, runner=True)


def random_vocoder(arch: VocoderArch = TINY, refine_iters: int = 4, seed: int = 0) -> NeuralVocoder:
    """A tiny vocoder with random weights everywhere (the head starts at zero when trained)."""
    torch.manual_seed(seed)
    model = NeuralVocoder(arch, refine_iters=refine_iters)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_every_vocoder_returns_t_minus_one_hops_of_samples():
    mel = torch.randn(37, 80) - 6
    for vocoder in (random_vocoder(), GriffinLimVocoder(n_iter=2)):
        wave = vocoder.mel_to_wave(mel)
        assert wave.shape == (36 * vocoder.hop,) and wave.dtype == torch.float32 and wave.device.type == "cpu"
        assert torch.isfinite(wave).all()
        assert vocoder.sample_rate == 16000 and vocoder.mel_to_wave(mel[:1]).numel() == 0


def test_stage_f_losses_are_zero_on_the_target_and_leave_the_absolute_phase_free():
    """omni.stages.vocoder's losses: the STFT loss is zero on the target and log 2 + 1 on a copy twice
    as loud (log-magnitude L1 + spectral convergence); the phase loss ignores a constant turn of the
    phase, which the mel does not fix, but not a random phase; anti_wrap drops the 2 pi jumps."""
    assert torch.allclose(anti_wrap(torch.tensor([2 * math.pi + 0.5, -0.5, 5 * math.pi - 0.25])),
                          torch.tensor([0.5, 0.5, math.pi - 0.25]), atol=1e-5)
    torch.manual_seed(0)
    target = torch.randn(2, 4000) * 0.1
    assert stft_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert stft_loss(2 * target, target).item() == pytest.approx(1 + math.log(2), abs=0.01)
    spec = stft(target, 256, 64)
    assert phase_loss(spec, spec).item() == pytest.approx(0.0, abs=1e-6)
    assert phase_loss(spec * torch.polar(torch.ones(()), torch.tensor(2.0)), spec).item() < 1e-3
    scrambled = torch.polar(spec.abs(), torch.rand(spec.shape) * 2 * math.pi)
    assert phase_loss(scrambled, spec).item() > 1.0


@pytest.mark.parametrize("cycle, refine, context", [(1, 0, 3 * 3 + 2), (2, 0, 3 * (1 + 1 + 2) + 2),
                                                    (1, 16, 3 * 3 + 2 * 16 + 2)])
def test_chunked_synthesis_with_its_context_equals_the_whole(cycle, refine, context):
    model, hop = random_vocoder(dataclasses.replace(TINY, dilation_cycle=cycle), refine), 160
    mel = torch.randn(200, 80) - 6
    whole = model.mel_to_wave(mel)
    ctx = model.context_frames
    assert ctx == context
    for s, e in [(ctx, 60), (60, 130), (130, 200 - ctx)]:
        part = model.mel_to_wave(mel[s - ctx:e + ctx])[ctx * hop:(ctx + e - s) * hop]
        assert torch.allclose(part, whole[s * hop:e * hop], atol=1e-5), (s, e)
    # Less context than it declares changes the samples: the test can fail.
    short = model.mel_to_wave(mel[60 - 3:130 + 3])[3 * hop:73 * hop]
    assert not torch.allclose(short, whole[60 * hop:130 * hop], atol=1e-5)


def test_stage_f_trains_and_resumes_bit_exactly_after_a_kill(demo_tiny, tmp_path):
    whole = vocoder_config(demo_tiny, tmp_path / "whole")
    proc = run_stage("train_vocoder.py", whole, tmp_path, "whole")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_pt(os.path.join(whole["save_dir"], "vocoder.pt"))
    assert set(expected) >= {"vocoder", "optimizer"}
    killed = vocoder_config(demo_tiny, tmp_path / "killed")
    proc = run_stage("train_vocoder.py", killed, tmp_path, "killed", env={"OMNI_TEST_KILL_AT_STEP": "8"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    proc = run_stage("train_vocoder.py", killed, tmp_path, "killed")
    assert proc.returncode == 0 and "vocoder_step_6.pt" in proc.stdout, proc.stdout[-3000:]
    assert_same_state(load_pt(os.path.join(killed["save_dir"], "vocoder.pt")), expected, ["vocoder", "optimizer"])
    metrics = open(os.path.join(whole["save_dir"], "metrics.jsonl")).read()
    assert '"mel_l1"' in metrics and ('"pesq"' in metrics) == has_quality_packages()


def has_quality_packages() -> bool:
    try:
        import pesq  # noqa: F401
        import pystoi  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def trained_vocoder(demo_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocoder")
    cfg = vocoder_config(demo_tiny, folder / "run", max_steps=2, eval_interval=2, checkpoint_freq=0)
    run_script("train_vocoder.py", "--config", write_config(folder / "cfg.json", cfg), check=True)
    return cfg["save_dir"]


def test_load_speaker_speaks_through_the_vocoder_it_finds(trained_talker, trained_vocoder, tmp_path, capsys):  # noqa: F811
    assert isinstance(load_speaker(trained_talker).vocoder, GriffinLimVocoder)
    speaker = load_speaker(trained_talker, vocoder_dir=str(tmp_path))
    assert isinstance(speaker.vocoder, GriffinLimVocoder)
    assert capsys.readouterr().err.count("\n") == 1
    speaker = load_speaker(trained_talker, vocoder_dir=trained_vocoder)
    assert isinstance(speaker.vocoder, NeuralVocoder)
    wave = speaker.speak("a red circle", seed=0)
    assert wave.ndim == 1 and len(wave) > 0 and torch.isfinite(wave).all()
    assert torch.equal(load_vocoder(trained_vocoder).mel_to_wave(torch.zeros(5, 80) - 6),
                       speaker.vocoder.mel_to_wave(torch.zeros(5, 80) - 6))


@pytest.mark.parametrize("key, value", [("vocoder_dim", 0), ("crop_frames", 0), ("phase_weight", -1.0)])
def test_a_bad_vocoder_key_is_one_line_naming_it(key, value, demo_tiny, tmp_path):
    cfg = vocoder_config(demo_tiny, tmp_path / "bad", **{key: value})
    proc = run_script("train_vocoder.py", "--config", write_config(tmp_path / "bad.json", cfg))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"'{key}'" in lines[0], proc.stderr


def test_the_bench_prints_both_vocoders_with_numbers(trained_vocoder, trained_stages, demo_tiny):
    proc = run_script("bench/bench_vocoder.py", "--vocoder_dir", trained_vocoder, "--clips", "2",
                      "--manifest", os.path.join(demo_tiny, "tts_val.jsonl"), "--griffin_lim_iters", "2",
                      "--talker_dir", trained_stages["D"]["save_dir"], "--asr_dir", trained_stages["B"]["save_dir"],
                      check=True)
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines()
            if line.startswith("| neural") or line.startswith("| Griffin-Lim")]
    assert len(rows) == 2, proc.stdout
    for cells in rows:     # PESQ, STOI (n/a without the optional packages), real-time factor, Talker CER
        assert all(c.strip() == "n/a" or float(c) == float(c) for c in cells[1:3])
        assert float(cells[3]) > 0 and cells[4].strip().endswith("%") and float(cells[4].split()[0]) >= 0
