"""Bad inputs (issue 16, part 4): every broken file or manifest line gives one clear line and loses
nothing. Bad samples in a training manifest (stages B, C, D, E) are skipped, named once, counted in
metrics.jsonl and summed up at the end; strict_data stops on them; a broken manifest stops at startup;
infer.py refuses a blank question or an unusable file with one line and exit status 2."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
from test_audio_enc import audio_enc_config
from test_talker import tiny_stage_config as talker_config
from test_vision import vision_config

from conftest import run_script, write_config
from omni.config import UserError, build_config
from omni.data.audio import read_audio
from omni.data.common import DataError
from omni.data.image import read_image
from omni.data.manifest import SampleError, read_manifest

BAD_AUDIO = {"corrupt.wav": "unreadable audio", "empty.wav": "empty file (0 bytes)", "silent.wav": "silent audio"}
BAD_IMAGES = {"not_an_image.png": "not an image", "gone.png": "file not found"}


def write_bad_media(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "corrupt.wav"), "wb") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64)))
    open(os.path.join(folder, "empty.wav"), "wb").close()
    sf.write(os.path.join(folder, "silent.wav"), np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    with open(os.path.join(folder, "not_an_image.png"), "w") as f:
        f.write("this is text, not a picture\n")


def broken_manifest(demo, out, name, key, count, bad_files, every=4):
    """The first `count` records of the world's manifest `name`, media copied into out/media, with
    records 1, 1+every, ... pointing at the bad files; returns {manifest line: bad file}."""
    with open(os.path.join(demo, name)) as f:
        records = [json.loads(line) for line in f][:count]
    bad = {}
    for i, record in enumerate(records):
        if key not in record:
            continue
        copy = os.path.join("media", os.path.basename(record[key]))
        shutil.copy(os.path.join(demo, record[key]), os.path.join(out, copy))
        record[key] = copy
        if i % every == 1 and len(bad) < len(bad_files):
            record[key] = os.path.join("media", bad_files[len(bad)])
            bad[i + 1] = bad_files[len(bad)]
    with open(os.path.join(out, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return bad


@pytest.fixture(scope="module")
def broken(demo_tiny, tmp_path_factory):
    """A copy of a few records of the tiny world with bad files in every training manifest and one in
    each validation manifest; {manifest name: {line: bad file}}."""
    out = str(tmp_path_factory.mktemp("broken"))
    write_bad_media(os.path.join(out, "media"))
    audio, images = list(BAD_AUDIO), list(BAD_IMAGES)
    bad = {"dir": out}
    for name, key, count, files in [("asr_train.jsonl", "audio", 16, audio), ("asr_val.jsonl", "audio", 8, audio[:1]),
                                    ("image_caption_train.jsonl", "image", 16, images),
                                    ("image_caption_val.jsonl", "image", 8, images[1:]),
                                    ("tts_train.jsonl", "audio", 16, audio), ("tts_val.jsonl", "audio", 6, audio[2:])]:
        bad[name] = broken_manifest(demo_tiny, out, name, key, count, files)
    return bad


# ----------------------------------------------------------------------------- one file
@pytest.mark.parametrize("name, message", [*BAD_AUDIO.items(), ("gone.wav", "file not found"),
                                           ("header_only.wav", "no audio samples"), ("nan.wav", "NaN"),
                                           ("not_an_image.png", "unreadable audio"), (".", "not a file")])
def test_read_audio_says_what_is_wrong(tmp_path, name, message):
    write_bad_media(tmp_path)
    sf.write(tmp_path / "header_only.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    sf.write(tmp_path / "nan.wav", np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")
    path = os.path.normpath(tmp_path / name)
    with pytest.raises(SampleError) as e:
        read_audio(path, 16000)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_quiet_speech_is_not_silence(tmp_path):
    t = np.arange(16000) / 16000
    sf.write(tmp_path / "quiet.wav", 0.01 * np.sin(2 * np.pi * 200 * t), 16000, subtype="PCM_16")   # -40 dBFS
    assert read_audio(str(tmp_path / "quiet.wav"), 16000).abs().max() > 0.009


@pytest.mark.parametrize("name, message", [*BAD_IMAGES.items(), ("empty.wav", "empty file"),
                                           ("truncated.png", "damaged image")])
def test_read_image_says_what_is_wrong(demo_tiny, tmp_path, name, message):
    write_bad_media(tmp_path)
    with open(os.path.join(demo_tiny, "images", "train_00000.png"), "rb") as f:
        png = f.read()
    (tmp_path / "truncated.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(SampleError, match=re.escape(f"{tmp_path / name}: {message}")):
        read_image(str(tmp_path / name), 64)


# ----------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("file, content, message", [
    ("m.jsonl", '{"audio": "a.wav", "text": "one"}\nthis is not json\n', "m.jsonl line 2: invalid JSON"),
    ("m.jsonl", '{"audio": "a.wav", "text": "one"}\n\n{"audio": "b.wav"}\n', "m.jsonl line 3: missing field 'text'"),
    ("m.csv", "path,text\na.wav,one\n", "m.csv line 1: the header has no column 'audio' (columns: path, text)"),
    ("m.tsv", "audio\ttext\na.wav\tone\nb.wav\t\n", "m.tsv line 3: empty field 'text'"),
    ("m.csv", "audio,text\na.wav,one\nb.wav,d\xe9j\xe0\n", "m.csv line 3: not UTF-8 text"),
])
def test_a_broken_manifest_is_one_line_naming_file_line_and_field(tmp_path, file, content, message):
    path = tmp_path / file
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_manifest(str(path), ["audio", "text"])
    assert str(e.value).startswith(os.path.join(str(tmp_path), message)) and "\n" not in str(e.value)


def test_a_spreadsheet_bom_does_not_hide_the_first_column(tmp_path):
    (tmp_path / "m.csv").write_bytes("\ufeffaudio,text\na.wav,one\n".encode("utf-8"))
    assert read_manifest(str(tmp_path / "m.csv"), ["audio", "text"])[0]["text"] == "one"


def test_a_trainer_stops_at_startup_on_a_missing_csv_column(broken, tmp_path):
    csv = tmp_path / "asr.csv"
    csv.write_text("path,transcript\nmedia/x.wav,hello\n")
    cfg = audio_enc_config(broken["dir"], tmp_path / "run", train_manifest=str(csv), test_manifest="")
    cfg["demo_dir"] = ""
    proc = run_script("train_audio_enc.py", "--config", write_config(tmp_path / "cfg.json", cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {csv} line 1: the header has no column 'audio' "
                                                "(columns: path, transcript)"]
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "run"))


# ----------------------------------------------------------------------------- bad samples in training
def trainer_run(script, cfg, tmp_path, *args):
    proc = run_script(script, "--config", write_config(tmp_path / "cfg.json", cfg), *args)
    return proc, proc.stdout + proc.stderr


def metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", ["B", "C", "D"])
def test_bad_samples_are_skipped_named_once_counted_and_training_goes_on(broken, tmp_path, stage):
    folder, run = broken["dir"], tmp_path / "run"
    script, cfg, train, val = {
        # B with a DataLoader worker: the reasons travel back from the worker process
        "B": ("train_audio_enc.py", audio_enc_config(folder, run, test_manifest="", num_workers=1, eval_batches=0),
              "asr_train.jsonl", "asr_val.jsonl"),
        "C": ("train_vision.py", vision_config(folder, run, test_manifest="", batch_size=4, eval_batches=0),
              "image_caption_train.jsonl", "image_caption_val.jsonl"),
        "D": ("train_talker.py", talker_config(folder, run, max_steps=8, codec_steps=4, eval_batches=0),
              "tts_train.jsonl", "tts_val.jsonl")}[stage]
    proc, out = trainer_run(script, {**cfg, "demo_dir": ""}, tmp_path)
    assert proc.returncode == 0, out[-3000:]
    for name in (train, val):               # each bad sample named exactly once, with its reason
        for line, file in broken[name].items():
            named = re.findall(rf"warning: skipping bad sample: .*{name} line {line}: .*{re.escape(file)}: (.*)", out)
            assert len(named) == 1, (name, line, out[-3000:])
            assert (BAD_AUDIO | BAD_IMAGES)[file].split(" (")[0] in named[0]
    epochs = cfg["max_steps"] // (16 // 4)  # 16 clips, batches of 4: every sample is met once an epoch
    skipped = len(broken[train]) * epochs
    records = metrics(run)
    assert [r["skipped_samples"] for r in records if r["split"] == "train"][-1] == skipped
    assert all(r["skipped_samples"] == len(broken[val]) for r in records if r["split"] == "val")
    summary = re.search(rf"skipped {skipped} bad samples, e\.g\. (.*) \(set strict_data=true", out)
    assert summary and any(file in summary.group(1) for file in broken[train].values()), out[-2000:]
    assert f"finished {cfg['max_steps']} steps" in out


@pytest.mark.parametrize("stage", ["B", "C"])
def test_strict_data_stops_with_one_line_naming_the_file(broken, tmp_path, stage):
    folder, run = broken["dir"], tmp_path / "run"
    # B uses a worker: an error must also stop the worker, which ignores SIGTERM (this used to hang).
    script, cfg, train = {
        "B": ("train_audio_enc.py", audio_enc_config(folder, run, test_manifest="", num_workers=1), "asr_train.jsonl"),
        "C": ("train_vision.py", vision_config(folder, run, test_manifest="", batch_size=4),
              "image_caption_train.jsonl")}[stage]
    proc, out = trainer_run(script, {**cfg, "demo_dir": "", "strict_data": True}, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in out
    last = proc.stderr.strip().splitlines()[-1]
    named = [f"{train} line {line}: {os.path.join(folder, 'media', file)}" for line, file in broken[train].items()]
    assert last.startswith("error: ") and any(n in last for n in named), last
    assert not os.path.exists(run / "vision.pt") and not os.path.exists(run / "audio_enc.pt")


def vision_stage_config(broken, tmp_path, train, val):
    from omni.stages.vision import VisionConfig
    return build_config(VisionConfig, vision_config(broken["dir"], tmp_path / "run", train_manifest=train,
                                                    val_manifest=val, test_manifest="", batch_size=4, max_steps=4))


def all_bad_manifest(tmp_path, files):
    path = tmp_path / "all_bad.jsonl"
    path.write_text("".join(json.dumps({"image": f"media/{f}", "caption": "a red circle"}) + "\n" for f in files))
    return str(path)


def test_training_data_with_no_usable_sample_is_an_error_not_a_hang(broken, tmp_path):
    from omni.stages.vision import VisionStage
    from omni.train.loop import train
    manifest = all_bad_manifest(tmp_path, ["gone.png", "not_an_image.png"] * 4)
    shutil.copytree(os.path.join(broken["dir"], "media"), tmp_path / "media")
    cfg = vision_stage_config(broken, tmp_path, manifest, os.path.join(broken["dir"], "image_caption_val.jsonl"))
    with pytest.raises(UserError, match=r"no usable training sample in 16 tries \(e\.g\. .*all_bad\.jsonl line \d"):
        train(VisionStage, cfg)


def test_validation_with_no_usable_sample_names_no_best_checkpoint(broken, tmp_path):
    from omni.stages.vision import VisionStage
    from omni.train.loop import train
    manifest = all_bad_manifest(tmp_path, ["gone.png", "not_an_image.png"])
    shutil.copytree(os.path.join(broken["dir"], "media"), tmp_path / "media")
    cfg = vision_stage_config(broken, tmp_path, os.path.join(broken["dir"], "image_caption_train.jsonl"), manifest)
    assert train(VisionStage, cfg) == 0
    val = [r for r in metrics(cfg.save_dir) if r["split"] == "val"]
    assert val and all(np.isnan(r["val_loss"]) and r["skipped_samples"] == 2 for r in val)
    assert not os.path.exists(os.path.join(cfg.save_dir, "vision_best.pt"))
    assert os.path.exists(os.path.join(cfg.save_dir, "vision.pt"))


# ----------------------------------------------------------------------------- infer.py
@pytest.mark.parametrize("args, message", [
    (["--text", ""], "--text is empty"), (["--text", "  \t"], "--text is empty"), (["--say", " "], "--say is empty"),
    (["--image", "not_an_image.png"], "not_an_image.png: not an image"),
    (["--image", "gone.png", "--text", "what colour?"], "gone.png: file not found"),
    (["--audio", "corrupt.wav"], "corrupt.wav: unreadable audio"), (["--audio", "empty.wav"], "empty.wav: empty file"),
    (["--audio", "silent.wav"], "silent.wav: silent audio"),
])
def test_infer_refuses_bad_input_before_loading_a_model(broken, args, message):
    import infer
    args = [os.path.join(broken["dir"], "media", a) if a.endswith((".png", ".wav")) else a for a in args]
    with pytest.raises(UserError, match=re.escape(message)):
        infer.main(args + ["--ckpt_dir", os.path.join(broken["dir"], "no_model_here")])


def test_infer_bad_input_is_one_line_and_exit_status_2(broken):
    proc = run_script("infer.py", "--audio", os.path.join(broken["dir"], "media", "silent.wav"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {os.path.join(broken['dir'], 'media', 'silent.wav')}: silent audio (peak 0.0e+00 < 0.001)"]


def test_chat_commands_without_a_file_are_an_error():
    from infer import parse_chat_line
    assert parse_chat_line("/image a.png what colour?") == ("what colour?", "a.png", None)
    for line in ("/image", "/audio  "):
        with pytest.raises(UserError, match=r"needs a file: /(image|audio) PATH"):
            parse_chat_line(line.strip())


# ----------------------------------------------------------------------------- stage E and the chat
@pytest.mark.slow
def test_sft_skips_bad_media_and_the_chat_reports_bad_files_and_goes_on(trained_stages, demo_tiny, tmp_path):
    out = str(tmp_path)
    write_bad_media(os.path.join(out, "media"))
    with open(os.path.join(demo_tiny, "sft_train.jsonl")) as f:
        records = [json.loads(line) for line in f][:24]
    for r in records:
        for key in ("image", "audio"):
            if key in r:
                copy = os.path.join("media", os.path.basename(r[key]))
                shutil.copy(os.path.join(demo_tiny, r[key]), os.path.join(out, copy))
                r[key] = copy
    bad_lines = {}                        # manifest line -> key: the first image and the first clip break
    for key, bad_file in (("image", "media/not_an_image.png"), ("audio", "media/silent.wav")):
        line = next(i for i, r in enumerate(records) if key in r)
        records[line][key] = bad_file
        bad_lines[line + 1] = key
    with open(os.path.join(out, "sft_train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = {**trained_stages["E"], "save_dir": os.path.join(out, "omni"),
           "train_manifest": os.path.join(out, "sft_train.jsonl"),
           "asr_manifest": "", "test_manifest": "", "max_steps": 6, "eval_interval": 6, "qa_eval_limit": 4}
    proc, log = trainer_run("sft_omni.py", cfg, tmp_path)
    assert proc.returncode == 0, log[-3000:]
    for line in bad_lines:
        assert len(re.findall(rf"skipping bad sample: .*sft_train.jsonl line {line}: ", log)) == 1, log[-3000:]
    skipped = [r["skipped_samples"] for r in metrics(cfg["save_dir"]) if r["split"] == "train"][-1]
    assert skipped == 2 and "skipped 2 bad samples, e.g." in log       # 6 batches of 4: one epoch

    media = os.path.join(out, "media")
    chat = run_script("infer.py", "--ckpt_dir", cfg["save_dir"], input="\n   \n"
                      f"/image {media}/not_an_image.png what colour is the circle?\n/audio {media}/silent.wav\n"
                      f"/image {media}/gone.png\n/image\nwhat is two plus two?\n/quit\n")
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stdout + chat.stderr
    errors = [line for line in chat.stdout.splitlines() if line.startswith("error: ")]
    assert [e.split(": ", 2)[-1] for e in errors] == ["not an image (PIL cannot identify it)",
                                                      "silent audio (peak 0.0e+00 < 0.001)", "file not found",
                                                      "/image PATH [question]"]
    assert chat.stdout.count("omni> ") == 5        # the four errors, then an answer: the chat went on
