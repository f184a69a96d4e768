"""Bounded inputs (issue 38, items 7-10 and 14): an image's size is checked from its header before
it is decoded, pipes are refused as corpora and manifests, audio and prompts longer than the models
take are one line (the chat goes on), Stage E checks its sequences at start-up, manifest fields have
their JSON types, and a corpus of one very long line trains a tokenizer."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageFile

from conftest import ROOT, thinker_config, write_config
from omni.audio_enc import AudioEncArch, AudioEncoder
from omni.config import UserError, build_config
from omni.data.common import DataError, require_files
from omni.data.image import ImageCaptionDataset, read_image
from omni.data.manifest import SampleError, SkippedSample, read_manifest
from omni.data.sft import longest_audio, read_sft_manifest
from omni.features import LogMel, MelSpec
from omni.omni_model import OmniModel, Projector
from omni.registry import STAGES
from omni.runtime import Runtime
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, read_sentences
from omni.vision import VisionArch, ViT

MAX_SEQ_LEN = 24
ENCODER = AudioEncArch(n_mels=80, d_model=16, n_layers=1, n_heads=2, max_positions=16, downsample=4)


# ----------------------------------------------------------------------------- images (item 7)
@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 12000 x 12000 PNG of 18 KB (1 bit a pixel, almost all black): 144 megapixels when decoded."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    image = Image.new("1", (12000, 12000))
    image.paste(1, (100, 100, 200, 200))
    image.save(path)
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding any image fails the test: sizes must come from the header alone."""
    def load(self):
        raise AssertionError(f"{self.size} image decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_huge_image_is_refused_from_its_header_never_decoded(huge_png, no_decoding):
    with pytest.raises(SampleError) as e:
        read_image(huge_png, 64)
    assert str(e.value) == (f"{huge_png}: 12000x12000 image (144.0 megapixels) is larger than "
                            "max_image_pixels 50_000_000")


def test_a_huge_image_in_a_manifest_is_a_bad_sample_skipped_or_fatal_under_strict(huge_png, no_decoding):
    records = [{"_source": "captions.jsonl line 3", "image": huge_png, "caption": "a red circle"}]
    skipped = ImageCaptionDataset(records).fetch((0, 0))
    assert isinstance(skipped, SkippedSample)
    assert skipped.message.startswith(f"captions.jsonl line 3: {huge_png}: 12000x12000 image")
    with pytest.raises(DataError, match="captions.jsonl line 3: .*huge.png: 12000x12000 image"):
        ImageCaptionDataset(records, strict=True).fetch((0, 0))


def test_infer_refuses_a_huge_image_in_one_line_before_loading_a_model(huge_png, no_decoding, tmp_path):
    import infer
    with pytest.raises(UserError, match=r"huge\.png: 12000x12000 image \(144\.0 megapixels\) is larger than"):
        infer.main(["--image", huge_png, "--text", "what colour?", "--ckpt_dir", str(tmp_path / "none")])


# ----------------------------------------------------------------------------- pipes (item 8)
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "corpus.fifo"
    os.mkfifo(path)
    return str(path)


def test_a_pipe_is_refused_as_corpus_or_manifest_naming_key_and_path(fifo, tmp_path):
    cfg = Namespace(demo_dir="")
    with pytest.raises(DataError) as e:
        require_files(cfg, {"train_files": [fifo]})
    assert str(e.value) == f"config key 'train_files': {fifo} is not a regular file (a pipe?): write it to a file first"
    with pytest.raises(DataError, match=f"config key 'val_file': {tmp_path} is not a regular file \\(a folder\\?\\)"):
        require_files(cfg, {"val_file": [str(tmp_path)]})
    with pytest.raises(DataError, match=f"manifest: {fifo} is not a regular file \\(a pipe\\?\\)"):
        read_manifest(fifo, ["image", "caption"])


def test_stage_a_on_a_pipe_is_one_line_not_a_hang(corpus, fifo, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", thinker_config(corpus, tmp_path / "run", train_files=[fifo]))
    proc = subprocess.run([sys.executable, "train_text.py", "--config", cfg], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: config key 'train_files': {fifo} is not a regular file (a pipe?): write it to a file first"]
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "run"))


# ----------------------------------------------------------------------------- audio and prompt lengths (item 9)
@pytest.fixture(scope="module")
def omni(tmp_path_factory, corpus):
    """A tiny untrained omni model: a Thinker of MAX_SEQ_LEN positions, a ViT of 5 tokens, an audio
    encoder of 16 positions after 4x downsampling (longest clip 0.63 s)."""
    tok = Tokenizer.train([corpus[0]], str(tmp_path_factory.mktemp("tok") / "t.model"), 120)
    torch.manual_seed(0)
    thinker = Thinker(ThinkerArch(vocab_size=128, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  max_seq_len=MAX_SEQ_LEN))
    vit = ViT(VisionArch(image_size=16, patch_size=8, vit_dim=16, vit_layers=1, vit_heads=2))
    audio = AudioEncoder(ENCODER)
    return OmniModel(thinker, tok, Projector(16, 16), Projector(16, 16), audio, vit).eval()


def tone(path, seconds: float) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220 * t), 16000, subtype="PCM_16")
    return str(path)


def test_longest_audio_is_what_the_encoder_takes(omni):
    limit = longest_audio(ENCODER, MelSpec())
    assert limit == pytest.approx(0.63)
    for samples, fits in ((int(limit * 16000), True), (int(limit * 16000) + 160, False)):
        mel = LogMel(MelSpec())(torch.randn(samples))[None]
        if fits:
            omni.audio_encoder(mel, torch.ones(mel.shape[:2], dtype=torch.bool))
        else:
            with pytest.raises(ValueError, match="exceeds max_len"):
                omni.audio_encoder(mel, torch.ones(mel.shape[:2], dtype=torch.bool))


@pytest.fixture
def chat(omni, monkeypatch, tmp_path):
    from omni import chat
    monkeypatch.setattr(chat, "stage_prefix_in", lambda folder: STAGES["E"].prefix)
    monkeypatch.setattr(chat, "load_omni", lambda folder, device: (omni, {"image_size": 16}))
    return chat.Chat(str(tmp_path), torch.device("cpu"), max_new_tokens=3)


def test_infer_refuses_audio_longer_than_the_encoder_takes_from_its_header(chat, tmp_path):
    long = tone(tmp_path / "long.wav", 20.0)
    with pytest.raises(UserError) as e:
        list(chat.answer("", audio_path=long))
    assert str(e.value) == f"{long}: 20.0 s is longer than max_seconds 0.63"


def test_infer_refuses_a_prompt_that_leaves_the_thinker_no_room(chat, tmp_path):
    clip = tone(tmp_path / "clip.wav", 0.5)             # 13 frames: the encoder takes it, the Thinker not
    with pytest.raises(UserError, match=rf"^{clip}: the prompt takes \d+ positions, and the Thinker's "
                                        rf"max_seq_len is {MAX_SEQ_LEN}: no room for an answer"):
        list(chat.answer("what did you hear in this recording of a tone?", audio_path=clip))
    with pytest.raises(UserError, match=r"^--text: the prompt takes \d+ positions"):
        list(chat.answer("a small red circle " * 10))
    assert isinstance("".join(chat.answer("hi")), str)       # a short one is answered


def test_the_chat_reports_too_long_audio_and_prompts_and_goes_on(chat, tmp_path, monkeypatch, capsys):
    import infer
    long, clip = tone(tmp_path / "long.wav", 20.0), tone(tmp_path / "clip.wav", 0.5)
    lines = iter([f"/audio {long}", f"/audio {clip} what did you hear in this recording of a tone?", "hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    infer.interactive(chat, infer.parse_args([]))
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors[0] == f"error: {long}: 20.0 s is longer than max_seconds 0.63"
    assert errors[1].startswith(f"error: {clip}: the prompt takes ") and len(errors) == 2
    assert out.count("omni> ") == 3 and next(lines, None) is None       # the chat went on to /quit


# ----------------------------------------------------------------------------- Stage E start-up (items 7, 10)
def sft_stage(omni, tmp_path, monkeypatch, records, **overrides):
    from omni.stages import omni_sft
    def build(config, *dirs, **kw):       # the shared tiny model, with the options the config asks for
        omni.patch_merge, omni.transcribe = config["patch_merge"], config["transcribe"]
        return omni
    monkeypatch.setattr(omni_sft, "build_omni", build)
    manifest = tmp_path / "sft_train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = build_config(omni_sft.OmniSFTConfig, {
        "save_dir": str(tmp_path / "run"), "demo_dir": "", "train_manifest": str(manifest),
        "val_manifest": str(manifest), "test_manifest": "", "device": "cpu", **overrides})
    stage = omni_sft.OmniSFTStage(cfg, Runtime(torch.device("cpu")))
    stage.setup()
    return stage


def turns(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_stage_e_refuses_at_start_up_a_conversation_longer_than_max_seq_len(omni, tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    records = [{"conversation": turns("hi", "hello")},
               {"conversation": [{"role": "robot"}]},               # a bad sample, left to the loader
               {"image": "a.png", "conversation": turns("what colour is the big circle above?", "red")}]
    with pytest.raises(UserError) as e:
        sft_stage(omni, tmp_path, monkeypatch, records)
    assert str(e.value).startswith(f"{tmp_path / 'sft_train.jsonl'} line 3: a sequence of ")
    assert "(image 5 tokens, audio 0 frames)" in str(e.value)
    assert str(e.value).endswith(f"exceeds the Thinker's max_seq_len {MAX_SEQ_LEN} (checkpoints/thinker_tiny): "
                                 "shorten it or leave it out")
    assert not os.path.exists(tmp_path / "run")


def test_stage_e_refuses_a_patch_merge_that_does_not_tile_the_vits_grid(omni, tmp_path, monkeypatch):
    records = [{"conversation": turns("hi", "hello")}]
    try:
        with pytest.raises(UserError, match="config key 'patch_merge': patch_merge 3: the vision encoder's 4 "):
            sft_stage(omni, tmp_path, monkeypatch, records, patch_merge=3)
        assert sft_stage(omni, tmp_path, monkeypatch, records, patch_merge=2).model.patch_merge == 2
    finally:
        omni.patch_merge = 1        # the fixture's model is shared: as the other tests expect it


def test_stage_e_counts_audio_frames_and_skips_images_over_max_image_pixels(omni, tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    tone(tmp_path / "q.wav", 0.5)
    records = [{"image": "a.png", "conversation": turns("hi", "red")},
               {"audio": "q.wav", "conversation": turns("", "red")}]
    stage = sft_stage(omni, tmp_path, monkeypatch, records, max_image_pixels=255)
    skipped = stage.train_data.fetch((0, 0))
    assert isinstance(skipped, SkippedSample) and "16x16 image (0.0 megapixels) is larger than max_image_pixels 255" \
        in skipped.message
    records[1]["conversation"] = turns("a tone", "a long answer about it")    # 13 audio frames tip it over
    with pytest.raises(UserError, match=r"line 2: a sequence of \d+ positions \(image 0 tokens, audio 13 frames\)"):
        sft_stage(omni, tmp_path, monkeypatch, records)


# ----------------------------------------------------------------------------- manifest types (item 14)
@pytest.mark.parametrize("record, fields, message", [
    ({"image": "a.png", "caption": ["a", "red circle"]}, ["image", "caption"],
     "field 'caption' must be a string, not a list"),
    ({"image": {"path": "a.png"}, "caption": "x"}, ["image", "caption"],
     "field 'image' must be a string, not an object"),
    ({"audio": "a.wav", "text": 42}, ["audio", "text"], "field 'text' must be a string, not a number"),
])
def test_a_manifest_field_of_the_wrong_json_type_is_one_line_at_read_time(tmp_path, record, fields, message):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_manifest(str(path), fields)
    assert str(e.value) == f"{path} line 1: {message}"


def test_sft_conversations_must_be_lists(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversation": c}) + "\n" for c in (turns("hi", "hello"), "hi")))
    with pytest.raises(DataError, match="sft.jsonl line 2: field 'conversation' must be a list, not a string"):
        read_sft_manifest(str(path))


# ----------------------------------------------------------------------------- one-line corpus (item 14)
def test_a_one_line_corpus_trains_a_tokenizer(tmp_path):
    words = ["red", "green", "blue", "circle", "square", "above", "below", "a", "the", "is"]
    rng = np.random.default_rng(0)
    path = tmp_path / "one_line.txt"
    path.write_text(" ".join(rng.choice(words, 60_000)) + "\n")       # 300 kB, no line break inside
    tok = Tokenizer.train([str(path)], str(tmp_path / "t.model"), 64)
    assert tok.decode(tok.encode("a red circle is above the blue square")) == "a red circle is above the blue square"
    assert len(tok.encode("circle")) == 1


def test_long_lines_are_cut_at_whitespace_below_the_sentence_limit(tmp_path):
    text = "é" * 5000 + " " + "word " * 2000 + "\r\nshort line\n"
    (tmp_path / "u.txt").write_text(text, encoding="utf-8", newline="")
    with open(tmp_path / "u.txt", "rb") as f:
        pieces = list(read_sentences(f, "u.txt"))
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES + 3 for p in pieces) and pieces[-1] == "short line"
    assert "".join("".join(pieces).split()) == "".join(text.split())     # nothing lost
    assert {w for p in pieces[3:-1] for w in p.split()} == {"word"}       # cut mid-word only without whitespace
