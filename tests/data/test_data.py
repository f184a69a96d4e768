"""The data layer: manifest formats and their errors, bad samples skipped and counted, strict
mode, audio and image loading, collation."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omni.config import TrainConfig, build_config
from omni.data.audio import AudioTextDataset, audio_frames, spec_augment
from omni.data.common import DataError
from omni.data.image import ImageCaptionDataset
from omni.data.manifest import read_manifest
from omni.data.sampler import sample_generator
from omni.data.sft import SFTDataset, read_sft_manifest
from omni.features import MelSpec
from omni.layers import pad_stack
from omni.registry import StageSpec
from omni.train.loop import train
from omni.train.stage import SkipBadSamples, Stage


@pytest.fixture
def media(tmp_path):
    """Two good WAVs, two good PNGs, and one broken file of each kind."""
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 8000, subtype="PCM_16")   # resampled to 16k
    sf.write(tmp_path / "b.wav", 0.3 * np.sin(2 * np.pi * 220 * t[:4000]), 16000, subtype="PCM_16")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav")
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    return tmp_path


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_csv_tsv_give_the_same_records_with_column_mapping(media):
    jsonl = write_lines(media / "m.jsonl", [{"path": "a.wav", "transcript": "hello"}])
    (media / "m.csv").write_text("path,transcript\na.wav,hello\n")
    (media / "m.tsv").write_text("path\ttranscript\na.wav\thello\n")
    cols = {"audio": "path", "text": "transcript"}
    got = [read_manifest(str(p), ["audio", "text"], cols) for p in (jsonl, media / "m.csv", media / "m.tsv")]
    for records in got:
        assert len(records) == 1
        assert records[0]["audio"] == os.path.join(str(media), "a.wav") and records[0]["text"] == "hello"
    assert got[0][0]["_source"].endswith("m.jsonl line 1") and got[1][0]["_source"].endswith("m.csv line 2")


@pytest.mark.parametrize("content, message", [
    ('{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav", "text": \n', "line 2: invalid JSON"),
    ('{"audio": "a.wav"}\n', "line 1: missing field 'text'"),
    ('["a.wav", "x"]\n', "line 1: expected a JSON object"),
    ("", "no records"),
])
def test_malformed_manifest_is_one_line_naming_file_and_line(media, content, message):
    (media / "m.jsonl").write_text(content)
    with pytest.raises(DataError) as e:
        read_manifest(str(media / "m.jsonl"), ["audio", "text"])
    assert message in str(e.value) and "m.jsonl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="manifest not found: .*nope.jsonl"):
        read_manifest(str(media / "nope.jsonl"), ["audio"])


def audio_records(media):
    return read_manifest(write_lines(media / "asr.jsonl", [
        {"audio": "a.wav", "text": "la"}, {"audio": "bad.wav", "text": "x"}, {"audio": "b.wav", "text": " "},
        {"audio": "missing.wav", "text": "y"}, {"audio": "b.wav", "text": "low"}]), ["audio", "text"])


def test_audio_is_resampled_to_log_mel_and_bad_samples_are_skipped(media, capsys):
    ds = AudioTextDataset(audio_records(media))
    samples = [ds[(i, 0)] for i in range(len(ds))]
    assert samples[0]["mel"].shape == (101, 80) and samples[0]["wave_len"] == 16000   # 1 s at 8 kHz -> 16 kHz
    assert samples[4]["mel"].shape == (26, 80) and samples[4]["text"] == "low"
    assert [s is None for s in samples] == [False, True, True, True, False]
    err = capsys.readouterr().err
    assert "asr.jsonl line 2" in err and "asr.jsonl line 3: empty text" in err and "missing.wav" in err
    assert ds.lengths() == [101, 0, 26, 0, 26] and audio_frames(str(media / "a.wav"), MelSpec()) == 101
    batch, skipped = SkipBadSamples(lambda xs: [x["text"] for x in xs])(samples)
    assert batch == ["la", "low"] and len(skipped) == 3


def test_strict_mode_names_file_and_line(media):
    ds = AudioTextDataset(audio_records(media), strict=True)
    with pytest.raises(DataError, match=r"asr.jsonl line 2: .*bad.wav"):
        ds[(1, 0)]


def test_images_decode_resize_and_shift_deterministically(media):
    records = read_manifest(write_lines(media / "cap.jsonl", [
        {"image": "a.png", "caption": "red"}, {"image": "bad.png", "caption": "x"}]), ["image", "caption"])
    ds = ImageCaptionDataset(records, image_size=64, max_shift=4, augment=True, seed=1)
    a = ds[(0, 3)]
    assert a["image"].shape == (3, 64, 64) and a["caption"] == "red"
    assert torch.allclose(a["image"][0], torch.ones(64, 64)) and torch.allclose(a["image"][2], -torch.ones(64, 64))
    assert torch.equal(a["image"], ds[(0, 3)]["image"])
    assert ds[(1, 0)] is None


def test_hue_turns_colours_and_drops_the_colour_words_it_falsifies(media):
    grey = np.full((64, 64, 3), 128, np.uint8)
    grey[20:40, 20:40] = (220, 30, 30)
    Image.fromarray(grey).save(media / "grey.png")
    records = read_manifest(write_lines(media / "cap.jsonl", [{"image": "grey.png", "caption": "a big Red square."}]),
                            ["image", "caption"])
    plain = ImageCaptionDataset(records, augment=False, hue_share=1.0, colour_words=["red"])[(0, 0)]
    assert plain["caption"] == "a big Red square."      # evaluation data is never turned
    turned = ImageCaptionDataset(records, augment=True, hue_share=1.0, colour_words=["red"], seed=2)
    samples = [turned[(0, epoch)] for epoch in range(4)]
    assert all(s["caption"] == "a big square." for s in samples)
    for s in samples:    # the grey stays grey, the square keeps its place, its colour moves
        assert torch.allclose(s["image"][:, 0, 0], plain["image"][:, 0, 0], atol=1e-2)
        assert not torch.allclose(s["image"][:, 30, 30], plain["image"][:, 30, 30], atol=0.05)
    assert torch.equal(samples[0]["image"], turned[(0, 0)]["image"])
    assert not torch.equal(samples[0]["image"], samples[1]["image"])
    kept = ImageCaptionDataset(records, augment=True, hue_share=0.0, colour_words=["red"], seed=2)[(0, 0)]
    assert kept["caption"] == "a big Red square." and torch.equal(kept["image"], plain["image"])


def test_spec_augment_depends_only_on_the_generator():
    mel = torch.randn(100, 80)
    a = spec_augment(mel, sample_generator(0, 1, 2))
    assert torch.equal(a, spec_augment(mel, sample_generator(0, 1, 2)))
    assert not torch.equal(a, mel) and not torch.equal(a, spec_augment(mel, sample_generator(0, 1, 3)))


def test_sft_records_with_image_audio_or_text(media):
    path = write_lines(media / "sft.jsonl", [
        {"kind": "image_qa", "image": "a.png", "conversation": [{"role": "user", "content": "colour?"},
                                                                  {"role": "assistant", "content": "red"}]},
        {"kind": "speech_qa", "audio": "a.wav", "conversation": [{"role": "user", "content": ""},
                                                                  {"role": "assistant", "content": "two"}]},
        {"kind": "text", "conversation": [{"role": "user", "content": "hi"}]}])
    ds = SFTDataset(read_sft_manifest(path))
    img, speech, bad = ds[(0, 0)], ds[(1, 0)], ds[(2, 0)]
    assert img["image"].shape == (3, 64, 64) and img["mel"] is None
    assert speech["mel"].shape == (101, 80) and speech["image"] is None
    assert bad is None                                   # does not end with an answer


def test_pad_stack_shapes_and_masks():
    padded, mask = pad_stack([torch.ones(3, 2), torch.ones(5, 2), torch.ones(1, 2)], value=-1.0)
    assert padded.shape == (3, 5, 2) and mask.sum(1).tolist() == [3, 5, 1]
    assert (padded[~mask] == -1).all() and (padded[mask] == 1).all()
    # the mask lives where the tensors do (a CPU mask stopped the Talker on a GPU); meta stands in
    assert pad_stack([torch.ones(2, 2, device="meta")])[1].device.type == "meta"


class CaptionColourStage(Stage):
    """A minimal stage for the loop's bad-sample accounting: predict the mean colour."""
    spec = StageSpec("P", "probe", "", __name__, "CaptionColourStage", "", weight_keys=("net",))

    def setup(self):
        d = self.cfg.save_dir
        self.train_data = ImageCaptionDataset(read_manifest(os.path.join(d, "..", "cap.jsonl"), ["image", "caption"]),
                                              image_size=8)
        self.val_data = self.train_data
        self.modules = {"net": torch.nn.Linear(3, 1)}

    def collate(self, samples):
        return torch.stack([s["image"].mean((1, 2)) for s in samples])

    def loss(self, batch):
        return self.modules["net"](batch).pow(2).mean(), {}


def test_training_loop_counts_skipped_samples(media, capsys):
    write_lines(media / "cap.jsonl", [{"image": "a.png", "caption": "a"}, {"image": "bad.png", "caption": "b"},
                                      {"image": "b.png", "caption": "c"}, {"image": "gone.png", "caption": "d"}])
    cfg = build_config(TrainConfig, {"save_dir": str(media / "run"), "batch_size": 2, "max_steps": 4,
                                     "eval_interval": 4, "log_interval": 4, "warmup_steps": 0, "progress": False})
    assert train(CaptionColourStage, cfg) == 0
    records = [json.loads(line) for line in open(media / "run" / "metrics.jsonl")]
    train_rec = [r for r in records if r["split"] == "train"][-1]
    assert train_rec["skipped_samples"] == 4                 # 2 bad of 4, two epochs
    assert "probe: skipped 4 bad samples" in capsys.readouterr().out
