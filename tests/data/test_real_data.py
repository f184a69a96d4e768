"""Real data (issue 12 parts 3-6): transcripts' character sets, audio of any rate and channel count,
max_seconds, image resize modes, device auto, and the GPU base configs' parameter counts."""
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
from PIL import Image
from test_audio_enc import audio_enc_config
from test_talker import tiny_stage_config

from conftest import ROOT, load_pt, run_script, write_config
from omni.audio_enc import CHARSET, AudioEncArch, AudioEncoder, charset_of
from omni.codec import CodecArch, SpeechCodec
from omni.config import UserError, load_config
from omni.data.image import fit_square, read_image
from omni.loading import load_asr, load_audio_encoder, load_speaker
from omni.stages import stage_class
from omni.talker import CHARS, Talker, TalkerArch
from omni.transcripts import Charset, derive_charset, normalize_transcript

TRAIN_TEXTS = ["What is TWO plus 2?", "Don't STOP -- now!", "Café au lait, s'il vous plaît.",
               "The “quoted” word; 42 apples.", "Ça va: 7 days", "Über naïve rock’n’roll"]
VAL_TEXTS = ["Brød, brød: TWO words", "café 42"]          # ø is in no training transcript


# ----------------------------------------------------------------------------- part 3: transcripts
def test_normalisation_keeps_letters_accents_digits_and_inner_apostrophes():
    assert normalize_transcript("Don't STOP -- now!") == "don't stop now"
    assert normalize_transcript("The “quoted” word; 'tis the dogs' bone") == "the quoted word tis the dogs bone"
    assert normalize_transcript("Café NAÏVE ﬁne ２０ rock’n’roll") == "café naïve fine 20 rock'n'roll"
    assert normalize_transcript("U.S.A. and/or 3.5") == "u s a and or 3 5"
    charset = derive_charset(TRAIN_TEXTS)
    assert charset == "".join(sorted(set(charset))) and charset[0] == " "
    assert {"'", "2", "4", "7", "é", "ç", "ü", "ï", "î"} <= set(charset)
    assert not set(charset) & set("ABCDEFGHIJKLMNOPQRSTUVWXYZ?!.,;:-“”’")
    assert derive_charset(reversed(TRAIN_TEXTS)) == charset       # order does not matter


def test_characters_outside_the_set_are_dropped_and_counted():
    charset = Charset(derive_charset(TRAIN_TEXTS))
    text, dropped = charset.split(VAL_TEXTS[0])
    assert text == "brd brd two words" and dropped == {"ø": 2}
    assert charset.decode(charset.encode("café 42")) == "café 42"
    for bad, why in (("aa", "twice"), ("aB", "normalisation"), ("", "empty")):
        with pytest.raises(UserError, match=f"config key 'charset'.*{why}"):
            Charset(bad)


# ----------------------------------------------------------------------------- data on disk
def _short_clips(demo_dir, n: int) -> list[tuple[np.ndarray, int]]:
    """The first n demo clips under 2.5 s."""
    with open(os.path.join(demo_dir, "asr_train.jsonl")) as f:
        paths = [os.path.join(demo_dir, json.loads(line)["audio"]) for line in f]
    return [sf.read(p, dtype="float32") for p in paths if sf.info(p).duration < 2.5][:n]


def _resampled(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    import torchaudio.functional as AF
    return AF.resample(torch.from_numpy(wave), rate, target).numpy()


@pytest.fixture(scope="module")
def real_world(demo_tiny, tmp_path_factory) -> dict:
    """ASR/TTS manifests with real-world transcripts over clips at 22.05 kHz stereo and 48 kHz
    mono, plus one training clip longer than max_seconds (3 s). The runs take all 7 training
    clips in every batch, so the long one is met (and skipped) at every step."""
    folder = tmp_path_factory.mktemp("real")
    lengths, clips = {}, _short_clips(demo_tiny, 12)
    for split, texts in (("train", TRAIN_TEXTS), ("val", VAL_TEXTS)):
        rows = []
        for i, text in enumerate(texts):
            wave, rate = clips[i + (0 if split == "train" else 8)]
            name = f"{split}_{i}.wav"
            if i % 2:                          # 48 kHz mono, 24-bit
                sf.write(folder / name, _resampled(wave, rate, 48000), 48000, subtype="PCM_24")
            else:                              # 22.05 kHz stereo, the right channel quieter
                w = _resampled(wave, rate, 22050)
                sf.write(folder / name, np.stack([w, 0.5 * w], axis=1), 22050)
            lengths[name] = len(wave) / rate
            rows.append({"audio": name, "text": text})
        if split == "train":
            long = np.concatenate([w for w, _ in clips[:3]])
            sf.write(folder / "long.wav", long, 16000)
            lengths["long.wav"] = len(long) / 16000
            rows.append({"audio": "long.wav", "text": "a long clip"})
        for kind in ("asr", "tts"):
            with open(folder / f"{kind}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    assert lengths["long.wav"] > 3.0 and max(v for k, v in lengths.items() if k != "long.wav") < 3.0
    return {"dir": str(folder), "charset": derive_charset(TRAIN_TEXTS + ["a long clip"])}


def test_any_rate_and_channel_count_reads_as_16k_mono(real_world):
    from omni.data.audio import read_audio
    for name, rate in (("train_0.wav", 22050), ("train_1.wav", 48000)):
        path = os.path.join(real_world["dir"], name)
        info = sf.info(path)
        assert info.samplerate == rate and info.channels == (2 if rate == 22050 else 1)
        wave = read_audio(path, 16000)
        assert wave.dim() == 1 and abs(len(wave) - info.frames * 16000 / rate) <= 1
    with pytest.raises(Exception, match="longer than max_seconds 3"):
        read_audio(os.path.join(real_world["dir"], "long.wav"), 16000, max_seconds=3.0)


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def stage_b(real_world, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("b")
    d = real_world["dir"]
    cfg = audio_enc_config(d, folder / "run", test_manifest="", max_seconds=3.0, max_steps=4, eval_interval=4,
                           checkpoint_freq=4, batch_size=7, train_manifest=f"{d}/asr_train.jsonl",
                           val_manifest=f"{d}/asr_val.jsonl")
    run_script("train_audio_enc.py", "--config", write_config(folder / "cfg.json", cfg), check=True)
    return str(folder / "run")


def test_stage_b_derives_stores_and_reloads_its_charset(stage_b, real_world):
    charset = real_world["charset"]
    with open(os.path.join(stage_b, "config.json")) as f:
        assert json.load(f)["charset"] == charset
    assert load_pt(os.path.join(stage_b, "audio_enc.pt"))["config"]["charset"] == charset
    asr = load_asr(stage_b)
    assert asr.charset.chars == charset and asr.head.out_features == len(charset) + 1
    assert load_audio_encoder_dim(stage_b) == 32
    texts = asr.transcribe([torch.randn(16000) * 0.1])
    assert set(texts[0]) <= set(charset)
    records = _records(os.path.join(stage_b, "metrics.jsonl"))
    train, val = [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "val"]
    assert train[-1]["skipped_samples"] >= 1             # the clip over max_seconds, counted
    assert val[-1]["dropped_chars"] == 2                 # the two ø of the validation transcripts


def load_audio_encoder_dim(folder: str) -> int:
    return load_audio_encoder(folder).out_dim


def test_stage_d_trains_on_real_transcripts_and_speaks_its_charset(real_world, stage_b, tmp_path, capfd):
    d = real_world["dir"]
    cfg = tiny_stage_config(d, tmp_path / "run", max_seconds=3.0, max_steps=8, codec_steps=4, eval_interval=8,
                            checkpoint_freq=8, batch_size=7, asr_ckpt_dir=stage_b, eval_sentences=2)
    run_script("train_talker.py", "--config", write_config(tmp_path / "cfg.json", cfg), check=True)
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["charset"] == real_world["charset"]
    records = _records(tmp_path / "run" / "metrics.jsonl")
    val = [r for r in records if r["split"] == "val"][-1]
    assert val["dropped_chars"] == 2 and "cer" in val    # scored by the Stage B model of another charset
    assert [r for r in records if r["split"] == "train"][-1]["skipped_samples"] >= 1
    speaker = load_speaker(str(tmp_path / "run"))
    assert speaker.talker.charset.chars == real_world["charset"]
    assert speaker.talker.text_embed.num_embeddings == len(real_world["charset"]) + 1
    capfd.readouterr()
    speaker.codes("Brød, brød 42")
    assert "1 kind(s) of character, 2 dropped: 'ø'" in capfd.readouterr().err


def test_checkpoints_without_a_charset_load_with_the_legacy_sets(tmp_path):
    """Checkpoints from before the `charset` key: a bare state_dict beside a config.json without it."""
    asr_dir, talker_dir = tmp_path / "asr", tmp_path / "talker"
    arch = AudioEncArch(d_model=32, n_layers=1, n_heads=2)
    enc, head = AudioEncoder(arch), nn.Linear(32, len(CHARSET) + 1)
    assert charset_of(arch).chars == CHARSET
    os.makedirs(asr_dir)
    torch.save({**{f"enc.{k}": v for k, v in enc.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}, asr_dir / "audio_enc.pt")
    write_config(asr_dir / "config.json", {"d_model": 32, "n_layers": 1, "n_heads": 2})
    assert load_asr(str(asr_dir)).charset.chars == CHARSET
    codec_cfg = {"codec_channels": 16, "latent_dim": 8, "codebook_size": 16, "n_codebooks": 2,
                 "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}
    codec = SpeechCodec(CodecArch.from_config(codec_cfg))
    talker = Talker(TalkerArch.from_config(codec_cfg), 2, 16)
    os.makedirs(talker_dir)
    torch.save({**{f"talker.{k}": v for k, v in talker.state_dict().items()},
                **{f"rvq.{k}": v for k, v in codec.state_dict().items()}}, talker_dir / "talker.pt")
    write_config(talker_dir / "config.json", codec_cfg)
    loaded = load_speaker(str(talker_dir))
    assert loaded.talker.charset.chars == CHARS and loaded.talker.text_embed.num_embeddings == 38


# ----------------------------------------------------------------------------- part 4: images
def test_image_resize_modes(tmp_path):
    # 60 x 20 (wide): red | blue | green thirds, so what each mode keeps is visible
    img = torch.zeros(3, 20, 60)
    img[0, :, :20], img[2, :, 20:40], img[1, :, 40:] = 1, 1, 1
    squash, crop, pad = (fit_square(img, 16, m) for m in ("squash", "center_crop", "pad"))
    assert squash.shape == crop.shape == pad.shape == (3, 16, 16)
    assert squash[0, :, 0].min() > 0.9 and squash[1, :, -1].min() > 0.9     # all three colours kept
    assert crop[2].min() > 0.9 and crop[0].max() < 0.1                        # the middle (blue) only
    assert pad[:, :5].abs().max() == 0 and pad[:, -5:].abs().max() == 0     # grey bars above and below
    assert pad[0, 8, 0] > 0.9 and pad[1, 8, -1] > 0.9
    path = tmp_path / "wide.png"
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(path)
    assert torch.allclose(read_image(str(path), 16, "center_crop"), fit_square(img * 2 - 1, 16, "center_crop"),
                          atol=0.02)
    with pytest.raises(UserError, match="image_resize"):
        load_config(stage_class("C").config_class, None, ["image_resize=stretch"])


# ----------------------------------------------------------------------------- part 6: device
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from omni import runtime
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(runtime, "mps_available", lambda mps=mps: mps)
        assert runtime.resolve_device("auto").type == expected
    assert runtime.resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="config key 'device': mps requested"):
        runtime.resolve_device("mps")
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    assert runtime.resolve_device("mps").type == "mps"
    assert load_config(stage_class("A").config_class, None, ["device=mps"]).device == "mps"


# ----------------------------------------------------------------------------- part 5: base configs
CAPTION_WORDS = 10_000      # the caption vocabulary the doc assumes for Stage C (COCO has about that many)


def base_models(letter: str, path: str) -> dict:
    """The models of a base config, built on the meta device (no memory, no time)."""
    cfg = load_config(stage_class(letter).config_class, path)
    with torch.device("meta"):
        if letter == "A":
            from omni.thinker import Thinker, ThinkerArch
            return {"Thinker": Thinker(ThinkerArch.from_config(cfg))}
        if letter == "B":       # the CTC head of the 28-character set (LibriSpeech's, and the legacy one)
            arch = AudioEncArch.from_config(cfg)
            return {"audio encoder + CTC head": nn.ModuleList([AudioEncoder(arch), nn.Linear(arch.d_model, 29)])}
        if letter == "C":
            from omni.vision import CLIP, VisionArch
            cfg.vocab = [f"w{i}" for i in range(CAPTION_WORDS)]
            return {"ViT + caption encoder": CLIP(VisionArch.from_config(cfg))}
        if letter == "D":
            cfg.charset = CHARSET       # 28 characters: space, apostrophe, a-z (LibriSpeech's)
            return {"codec": SpeechCodec(CodecArch.from_config(cfg)),
                    "Talker": Talker(TalkerArch.from_config(cfg), cfg.n_codebooks, cfg.codebook_size)}
    raise ValueError(letter)


def doc_counts() -> dict:
    """(stage, model) -> parameters, from the table of docs/gpu_recipes.md."""
    with open(os.path.join(ROOT, "docs", "gpu_recipes.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| ([A-E]) \| `[^`]+` \| ([^|]+?) \| ([\d,]+) \|", f.read(), re.M)
    return {(s, m): int(n.replace(",", "")) for s, m, n in rows}


def test_base_configs_load_and_have_the_parameter_counts_the_doc_states():
    stated = doc_counts()
    counted = {}
    for letter, name in zip("ABCD", ("thinker", "audio_enc", "vision", "talker")):
        for model, module in base_models(letter, os.path.join(ROOT, "configs", f"{name}_base.json")).items():
            counted[(letter, model)] = sum(p.numel() for p in module.parameters())
    cfg = load_config(stage_class("E").config_class, os.path.join(ROOT, "configs", "omni_sft_base.json"))
    with torch.device("meta"):
        from omni.omni_model import Projector
        proj = nn.ModuleList([Projector(384, 640), Projector(384, 640)])
    counted[("E", "Thinker + projectors (trained)")] = \
        counted[("A", "Thinker")] + sum(p.numel() for p in proj.parameters())
    assert cfg.image_size == load_config(stage_class("C").config_class,
                                         os.path.join(ROOT, "configs", "vision_base.json")).image_size
    assert stated == counted
    assert 50e6 <= counted[("A", "Thinker")] <= 100e6
