"""`python -m omni.data.prepare`: tiny fixtures in each real data set's layout (folder and file
names as the data sets ship them) -> manifests, splits, summary, skipped files, idempotence, and
stages training a few steps on what was imported."""
import io
import json
import os
import shlex

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from test_audio_enc import audio_enc_config
from test_talker import tiny_stage_config as talker_config
from test_vision import vision_config

from conftest import ROOT, run_script, thinker_config, tree_bytes, write_config
from omni.config import load_config
from omni.data import layouts, prepare
from omni.data.manifest import read_manifest
from omni.stages.audio_enc import AudioEncConfig

CLIP_SECONDS = 0.3
WORDS = ["go", "up", "no", "on", "we", "me", "so", "at", "it", "be"]


def clip_bytes(seed: int, fmt: str, rate: int = 16000) -> bytes:
    """A 0.3 s tone with a little noise (loud enough not to count as silence)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * CLIP_SECONDS)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype("float32"), rate, format=fmt)
    return buf.getvalue()


def image_bytes(seed: int, fmt: str) -> bytes:
    colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][seed % 4]
    im = Image.new("RGB", (48, 40), (230, 230, 230))
    im.paste(colour, (8 + seed % 5, 8, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def put(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def run_prepare(*argv) -> dict:
    assert prepare.main([*map(str, argv), "--quiet"]) == 0
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    """LibriSpeech/{train-clean-100,dev-clean,test-clean}/SPEAKER/CHAPTER/ with 9 FLAC clips, of which
    one is not audio, and a transcript line whose clip is missing."""
    root = tmp_path_factory.mktemp("ls") / "LibriSpeech"
    put(root / "README.TXT", "LibriSpeech ASR corpus\n")
    chapters = {"train-clean-100": [("19", "198", 3), ("26", "495", 3)], "dev-clean": [("84", "121123", 2)],
                "test-clean": [("61", "70968", 2)]}
    seed = 0
    for subset, entries in chapters.items():
        for speaker, chapter, n in entries:
            folder = root / subset / speaker / chapter
            lines = []
            for i in range(n):
                utt = f"{speaker}-{chapter}-{i:04d}"
                put(folder / f"{utt}.flac", clip_bytes(seed, "FLAC"))
                lines.append(f"{utt} {WORDS[seed % 10].upper()} {WORDS[(seed + 3) % 10].upper()}")
                seed += 1
            if speaker == "19":
                lines.append(f"{speaker}-{chapter}-0009 THIS CLIP IS MISSING")
            put(folder / f"{speaker}-{chapter}.trans.txt", "\n".join(lines) + "\n")
    put(root / "train-clean-100" / "26" / "495" / "26-495-0001.flac", b"this is not a flac file")
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """annotations/captions_{train,val}2017.json with 2 captions per image; train2017/ holds one
    file that is not an image and misses one listed image."""
    root = tmp_path_factory.mktemp("coco")
    colours, shapes = ["red", "green", "blue", "yellow"], ["square", "box", "block"]
    for split, ids in (("train2017", range(1, 13)), ("val2017", range(101, 105))):
        images, notes = [], []
        for image_id in ids:
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "height": 40, "width": 48})
            if image_id != 12:                      # image 12 is listed but missing
                put(root / split / name, image_bytes(image_id, "JPEG"))
            for k in range(2):
                notes.append({"id": 1000 * image_id + k, "image_id": image_id,
                              "caption": f"A {colours[image_id % 4]} {shapes[k]}  on grey.\n"})
        notes.reverse()     # COCO's annotations are not grouped by image
        put(root / "annotations" / f"captions_{split}.json", json.dumps({"images": images, "annotations": notes}))
    put(root / "train2017" / f"{5:012d}.jpg", b"\xff\xd8 broken jpeg")
    return root


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory):
    """A folder of .txt books (paragraphs wrapped over lines) and a .jsonl file with a bad line."""
    root = tmp_path_factory.mktemp("text") / "corpus"
    rng = np.random.default_rng(0)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]

    def sentence():
        return (f"a {rng.choice(['small', 'big'])} {rng.choice(colours)} {rng.choice(shapes)} is "
                f"{rng.choice(['above', 'below', 'left of'])} a {rng.choice(colours)} {rng.choice(shapes)}")
    for book in ("a", "b"):
        paragraphs = [f"{sentence()}\n{sentence()}." for _ in range(150)]
        put(root / "books" / f"{book}.txt", "\n\n".join(paragraphs) + "\n")
    lines = [json.dumps({"text": sentence(), "id": i}) for i in range(40)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"body": "no text field"})
    put(root / "web.jsonl", "\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- LibriSpeech
def test_librispeech_keeps_its_splits_skips_bad_clips_and_trains_stage_b(librispeech, tmp_path):
    out = tmp_path / "ls"
    summary = run_prepare("librispeech", librispeech.parent, "--out", out)   # the folder holding LibriSpeech/
    train, val, test = (records(out / f"asr_{s}.jsonl") for s in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [5, 2, 2]
    first = train[0]
    assert first["audio"] == os.path.relpath(librispeech / "train-clean-100/19/198/19-198-0000.flac", out)
    assert first["text"] == "GO ON" and first["duration"] == CLIP_SECONDS
    assert [r["audio"].rsplit("/", 1)[1] for r in val] == ["84-121123-0000.flac", "84-121123-0001.flac"]
    assert summary["splits"] == {"given": ["train", "val", "test"], "carved": []}
    assert summary["manifests"]["asr_train.jsonl"] == {
        "split": "train", "records": 5, "hours": round(5 * CLIP_SECONDS / 3600, 4),
        "characters": sum(len(r["text"]) for r in train), "words": 10}
    assert summary["skipped"]["count"] == 2
    reasons = " ".join(summary["skipped"]["examples"])
    assert "26-495-0001.flac: unreadable audio" in reasons and "19-198-0009.flac: file not found" in reasons
    # the manifests read as the stages read them
    assert len(read_manifest(str(out / "asr_train.jsonl"), ["audio", "text"])) == 5

    cfg = audio_enc_config("", tmp_path / "run", train_manifest=str(out / "asr_train.jsonl"),
                           val_manifest=str(out / "asr_val.jsonl"), test_manifest=str(out / "asr_test.jsonl"),
                           batch_size=2, max_steps=3, eval_interval=3, checkpoint_freq=3)
    proc = run_script("train_audio_enc.py", "--config", write_config(tmp_path / "b.json", cfg), check=True)
    assert "audio_enc: 5 training clips, 2 validation clips" in proc.stdout
    assert "bad sample" not in proc.stdout + proc.stderr and os.path.isfile(tmp_path / "run" / "audio_enc.pt")


def test_rerun_writes_byte_identical_files(librispeech, tmp_path, capsys):
    out = tmp_path / "ls"
    assert prepare.main(["librispeech", str(librispeech), "--out", str(out)]) == 0    # with progress lines
    printed = capsys.readouterr().out
    assert "prepare librispeech: clip 11/11 (100%)" in printed
    # the printed command trains on what was written
    command = shlex.split(next(line for line in printed.splitlines() if line.startswith("next: "))[6:])
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    cfg = load_config(AudioEncConfig, os.path.join(ROOT, command[command.index("--config") + 1]), sets)
    assert (cfg.demo_dir, cfg.train_manifest, cfg.test_manifest) == ("", str(out / "asr_train.jsonl"),
                                                                     str(out / "asr_test.jsonl"))
    first = tree_bytes(out)
    run_prepare("librispeech", librispeech, "--out", out)
    assert tree_bytes(out) == first and set(first) == {"asr_train.jsonl", "asr_val.jsonl", "asr_test.jsonl",
                                                      "summary.json"}


def test_no_usable_record_is_an_error_that_leaves_earlier_files_alone(librispeech, tmp_path, capsys):
    out = tmp_path / "ls"
    run_prepare("librispeech", librispeech, "--out", out)
    before = tree_bytes(out)
    empty = tmp_path / "LibriSpeech" / "dev-clean" / "1" / "2"
    put(empty / "1-2.trans.txt", "1-2-0000 NO AUDIO HERE\n")
    with pytest.raises(SystemExit) as exit_info:
        prepare.run_cli(lambda: prepare.main(["librispeech", str(tmp_path / "LibriSpeech"), "--out", str(out)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no usable librispeech record (1 skipped, e.g. " in err
    assert "1-2-0000.flac: file not found" in err and tree_bytes(out) == before


def test_a_subset_folder_alone_gets_val_and_test_carved_by_hash(librispeech, tmp_path):
    out = tmp_path / "ls"
    summary = run_prepare("librispeech", librispeech / "train-clean-100", "--out", out,
                          "--val_fraction", "0.3", "--test_fraction", "0.3")
    assert summary["splits"]["given"] == ["train"]
    by_split = {s: [r["audio"].rsplit("/", 1)[1][:-5] for r in records(out / f"asr_{s}.jsonl")]
                for s in ("train", "val", "test") if os.path.isfile(out / f"asr_{s}.jsonl")}
    assert sorted(utt for ids in by_split.values() for utt in ids) == [
        "19-198-0000", "19-198-0001", "19-198-0002", "26-495-0000", "26-495-0002"]
    for split, ids in by_split.items():     # each id sits where its hash puts it
        for utt in ids:
            h = prepare.hash_fraction(utt)
            assert split == ("val" if h < 0.3 else "test" if h >= 0.7 else "train")


def test_hash_split_is_stable_and_near_the_fractions():
    ids = [f"spk-{i}" for i in range(20000)]
    given = set()
    item = prepare.layouts.Item
    splits = [prepare.assign_split(item(i, ("x",), None), given, 0.05, 0.1) for i in ids]
    assert abs(splits.count("val") / len(ids) - 0.05) < 0.01 and abs(splits.count("test") / len(ids) - 0.1) < 0.01
    assert splits == [prepare.assign_split(item(i, ("x",), None), given, 0.05, 0.1) for i in ids]
    # a split the data set names is kept whatever the hash says
    assert prepare.assign_split(item("spk-1", ("x",), "test"), {"test"}, 0.5, 0.5) == "test"
    assert {prepare.assign_split(item(i, ("x",), "train"), {"train", "val", "test"}, 0.4, 0.4)
            for i in ids[:200]} == {"train"}


def test_layouts_read_split_names_and_listings_without_touching_the_media(tmp_path):
    """omni.data.layouts on its own: split_of reads the split a file or folder name gives, and a
    reader turns a listing into Items in order, a bad line an Item with its problem, and opens no
    clip (checking the media is prepare's job: wavs/ here is empty)."""
    names = ["train-clean-100", "dev.tsv", "val2017", "validation", "test", "testing", "trainer", "readme.md"]
    assert [layouts.split_of(n) for n in names] == ["train", "val", "val", "val", "test", None, None, None]
    src = tmp_path / "LJ"
    put(src / "metadata.csv", "LJ001|Dr. Smith, 1 cat|doctor smith one cat\nLJ002|raw only|\n\nLJ003\n")
    os.makedirs(src / "wavs")
    source = layouts.ljspeech(str(src), str(tmp_path / "out"), None)
    items = list(source.items)
    assert source.outputs == ("tts", "asr") and source.total == 3
    assert [(i.id, i.texts) for i in items] == [("LJ001", ("doctor smith one cat",)), ("LJ002", ("raw only",)),
                                                ("LJ003", ("",))]
    assert items[0].audio == str(src / "wavs" / "LJ001.wav") and items[0].problem is None
    assert items[2].problem == f"{src / 'metadata.csv'} line 4: expected 'ID|raw text|normalized text'"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- LJSpeech, Common Voice
def test_ljspeech_writes_tts_and_asr_from_the_normalized_column(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    lines = []
    for i in range(1, 9):
        utt = f"LJ001-{i:04d}"
        if i != 4:                                  # LJ001-0004 is listed but has no wav
            put(root / "wavs" / f"{utt}.wav", clip_bytes(i, "WAV", rate=22050))
        lines.append(f'{utt}|In {i} "quoted|in {WORDS[i]} quoted')
    sf.write(root / "wavs" / "LJ001-0009.wav", np.zeros(4800, "float32"), 16000)     # 0.3 s of silence
    lines.append("LJ001-0009|Quiet.|quiet")
    put(root / "metadata.csv", "\n".join(lines) + "\n")
    out = tmp_path / "lj"
    summary = run_prepare("ljspeech", root, "--out", out, "--val_fraction", "0.25", "--test_fraction", "0.25")
    assert summary["skipped"]["count"] == 1 and "LJ001-0004.wav: file not found" in summary["skipped"]["examples"][0]
    names = [n for n in sorted(os.listdir(out)) if n.endswith(".jsonl")]
    tts = {s: records(out / f"tts_{s}.jsonl") for s in ("train", "val", "test") if f"tts_{s}.jsonl" in names}
    assert {n.replace("tts_", "asr_") for n in names if n.startswith("tts_")} == {
        n for n in names if n.startswith("asr_")}
    for split, recs in tts.items():
        assert recs == records(out / f"asr_{split}.jsonl")
    every = sorted((r for recs in tts.values() for r in recs), key=lambda r: r["audio"])
    assert len(every) == 8 and every[0] == {"audio": "../LJSpeech-1.1/wavs/LJ001-0001.wav", "text": "in up quoted",
                                             "duration": CLIP_SECONDS}
    assert summary["splits"] == {"given": [], "carved": ["val (0.25 of train by id hash)",
                                                          "test (0.25 of train by id hash)"]}
    # the header check lets the silent clip through; decoding it with the suite's reader does not
    assert "../LJSpeech-1.1/wavs/LJ001-0009.wav" in {r["audio"] for r in every}
    full = run_prepare("ljspeech", root, "--out", tmp_path / "full", "--full_check")
    assert full["skipped"]["count"] == 2 and "LJ001-0009.wav: silent audio" in full["skipped"]["examples"][1]


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3")
def test_commonvoice_uses_train_dev_test_tsv_and_reads_mp3(tmp_path):
    root = tmp_path / "cv-corpus" / "en"
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\tlocale"
    tables = {"train.tsv": [1, 2, 3, 4], "dev.tsv": [5], "test.tsv": [6], "validated.tsv": [1, 2, 3, 4, 5, 6, 7]}
    sentences = {1: 'He said "go', 2: "Up we go.", 3: "", 4: "So be it.", 5: "No.", 6: "At me.", 7: "Not used."}
    for name, clips in tables.items():
        rows = [f"c{n}\tcommon_voice_en_{n}.mp3\ts{n}\t{sentences[n]}\t\t2\t0\t\t\ten" for n in clips]
        put(root / name, "\n".join([header] + rows) + "\n")
    for n in range(1, 8):
        put(root / "clips" / f"common_voice_en_{n}.mp3", clip_bytes(n, "MP3", rate=48000))
    out = tmp_path / "cv"
    summary = run_prepare("commonvoice", root, "--out", out)
    train = records(out / "asr_train.jsonl")
    assert [r["text"] for r in train] == ['He said "go', "Up we go.", "So be it."]
    assert [r["text"] for r in records(out / "asr_val.jsonl")] == ["No."]
    assert [r["text"] for r in records(out / "asr_test.jsonl")] == ["At me."]
    assert abs(train[0]["duration"] - CLIP_SECONDS) < 0.06      # MP3 frames pad the end a little
    assert summary["skipped"] == {"count": 1, "examples": [f"{root / 'clips' / 'common_voice_en_3.mp3'}: empty text"]}


# ----------------------------------------------------------------------------- COCO
def test_coco_one_record_per_caption_in_train_one_per_image_in_val_and_trains_stage_c(coco, tmp_path):
    out = tmp_path / "coco"
    summary = run_prepare("coco", coco, "--out", out, "--test_fraction", "0.3")
    train = records(out / "image_caption_train.jsonl")
    val = records(out / "image_caption_val.jsonl")
    test = records(out / "image_caption_test.jsonl")
    assert val == [{"image": os.path.relpath(coco / f"val2017/{i:012d}.jpg", out), "caption": f"A {c} square on grey."}
                   for i, c in zip(range(101, 105), ["green", "blue", "yellow", "red"])]
    good = {i for i in range(1, 12) if i != 5}
    in_train = [int(r["image"][-16:-4]) for r in train]
    in_test = [int(r["image"][-16:-4]) for r in test]
    # train: both captions of an image (so an image never straddles splits); test like val: one per image
    assert len(train) == 2 * len(set(in_train)) and len(test) == len(set(in_test))
    assert set(in_train) | set(in_test) == good and not set(in_train) & set(in_test) and in_test
    assert summary["skipped"] == {"count": 2, "examples": [
        f"{coco / 'train2017' / '000000000005.jpg'}: not an image (PIL cannot identify it)",
        f"{coco / 'train2017' / '000000000012.jpg'}: file not found"]}

    cfg = vision_config("", tmp_path / "run", train_manifest=str(out / "image_caption_train.jsonl"),
                        val_manifest=str(out / "image_caption_val.jsonl"),
                        test_manifest=str(out / "image_caption_test.jsonl"),
                        batch_size=4, gallery_size=4, max_steps=3, eval_interval=3, checkpoint_freq=3)
    proc = run_script("train_vision.py", "--config", write_config(tmp_path / "c.json", cfg), check=True)
    assert f"vision: {len(train)} training pairs, 4 validation pairs" in proc.stdout
    assert "bad sample" not in proc.stdout + proc.stderr and os.path.isfile(tmp_path / "run" / "vision.pt")


# ----------------------------------------------------------------------------- text
def test_text_paragraphs_and_jsonl_records_become_documents_and_train_stage_a(corpus_folder, tmp_path):
    out = tmp_path / "txt"
    summary = run_prepare("text", corpus_folder, "--out", out, "--val_fraction", "0.1", "--test_fraction", "0.05")
    docs = {s: (out / "text" / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert sum(len(d) for d in docs.values()) == 300 + 38
    assert all(doc.count(" is ") == 2 for d in docs.values() for doc in d if doc.endswith("."))   # joined lines
    assert 20 < len(docs["val"]) < 50 and 5 < len(docs["test"]) < 35
    assert summary["skipped"]["count"] == 2
    assert "web.jsonl line 4: invalid JSON" in summary["skipped"]["examples"][0]
    assert "web.jsonl line 8: no field 'text'" in summary["skipped"]["examples"][1]
    assert summary["manifests"]["text/val.txt"]["words"] == sum(len(d.split()) for d in docs["val"])

    lines = run_prepare("text", corpus_folder / "books", "--out", tmp_path / "lines", "--text_unit", "line")
    assert sum(m["records"] for m in lines["manifests"].values()) == 600

    cfg = thinker_config((str(out / "text" / "train.txt"), str(out / "text" / "val.txt")), tmp_path / "run",
                         max_steps=3, eval_interval=3, checkpoint_freq=3)
    proc = run_script("train_text.py", "--config", write_config(tmp_path / "a.json", cfg), check=True)
    assert "training tokens" in proc.stdout and os.path.isfile(tmp_path / "run" / "thinker.pt")


def test_text_files_named_after_a_split_keep_it(tmp_path):
    root = tmp_path / "wiki"
    put(root / "train.txt", "".join(f"train line {i}\n\n" for i in range(30)))
    put(root / "valid.txt", "a valid line\n")
    put(root / "test" / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    summary = run_prepare("text", root, "--out", out, "--test_fraction", "0")
    assert summary["splits"] == {"given": ["train", "val", "test"], "carved": []}
    assert summary["skipped"]["count"] == 1 and "latin1.txt: not UTF-8 text" in summary["skipped"]["examples"][0]
    assert (out / "text" / "val.txt").read_text() == "a valid line\n"
    assert len((out / "text" / "train.txt").read_text().splitlines()) == 30
    assert not (out / "text" / "test.txt").exists()


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_parquet_audio_bytes_are_written_out_and_rerun_is_identical(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "hf_asr"
    clip = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, rows in (("train", range(5)), ("test", range(5, 7))):
        audio = [{"bytes": clip_bytes(i, "FLAC" if i % 2 else "WAV"), "path": f"utt{i}.x"} for i in rows]
        if split == "train":
            audio[1] = {"bytes": b"garbage", "path": "bad.wav"}
            audio[2] = {"bytes": None, "path": None}
        table = pa.table({"audio": pa.array(audio, clip), "sentence": [f"say {WORDS[i]}" for i in rows],
                          "speaker": list(rows)})
        os.makedirs(root / "data", exist_ok=True)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "out"
    argv = ("hf", root, "--out", out, "--audio_column", "audio", "--text_column", "sentence", "--val_fraction", "0")
    summary = run_prepare(*argv)
    train, test = records(out / "asr_train.jsonl"), records(out / "asr_test.jsonl")
    assert [r["text"] for r in train] == ["say go", "say on", "say we"] and [r["text"] for r in test] == [
        "say me", "say so"]
    # named by their row in file order (test-... sorts before train-...)
    assert [r["audio"] for r in train] == ["audio/00000002.wav", "audio/00000005.flac", "audio/00000006.wav"]
    assert (out / "audio" / "00000005.flac").read_bytes() == clip_bytes(3, "FLAC")
    assert summary["skipped"]["count"] == 2 and "unreadable audio" in summary["skipped"]["examples"][0]
    assert "row 2: empty 'audio'" in summary["skipped"]["examples"][1]
    first = tree_bytes(out)
    run_prepare(*argv)
    assert tree_bytes(out) == first


def test_hf_save_to_disk_images_and_a_missing_column(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    root = tmp_path / "hf_disk"
    put(root / "dataset_dict.json", json.dumps({"splits": ["train", "validation"]}))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, rows in (("train", range(4)), ("validation", range(4, 6))):
        table = pa.table({"image": pa.array([{"bytes": image_bytes(i, "PNG"), "path": None} for i in rows], image),
                          "captions": [[f"caption {i} one", f"caption {i} two"] for i in rows]})
        os.makedirs(root / split)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:    # save_to_disk writes Arrow streams
            writer.write_table(table, max_chunksize=3)
        put(root / split / "state.json", json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                      "_split": split}))
        put(root / split / "dataset_info.json", json.dumps({"features": {}}))
    out = tmp_path / "out"
    summary = run_prepare("hf", root, "--out", out, "--image_column", "image", "--text_column", "captions",
                          "--test_fraction", "0")
    assert summary["splits"]["given"] == ["train", "val"]
    train, val = records(out / "image_caption_train.jsonl"), records(out / "image_caption_val.jsonl")
    assert len(train) == 8 and train[1] == {"image": "images/00000000.png", "caption": "caption 0 two"}
    assert val == [{"image": "images/00000004.png", "caption": "caption 4 one"},
                   {"image": "images/00000005.png", "caption": "caption 5 one"}]
    with Image.open(out / "images" / "00000005.png") as im:
        assert im.size == (48, 40)

    with pytest.raises(SystemExit) as exit_info:
        prepare.run_cli(lambda: prepare.main(["hf", str(root), "--out", str(out), "--image_column", "img",
                                              "--text_column", "captions"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no column 'img' (--image_column; columns: image, captions)" in err
    assert len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- bad layouts
@pytest.mark.parametrize("kind,expected", [
    ("librispeech", "expected LibriSpeech subset folders such as train-clean-100/"),
    ("ljspeech", "metadata.csv: not found"),
    ("commonvoice", "train.tsv: not found"),
    ("coco", "annotations: not found; expected COCO's annotations/captions_train2017.json"),
    ("text", "no .txt or .jsonl files found"),
    ("hf", "dataset_dict.json: not found; expected a datasets save_to_disk folder"),
])
def test_a_folder_in_the_wrong_layout_is_one_line_naming_the_expected_file(kind, expected, tmp_path, capsys):
    put(tmp_path / "src" / "readme.md", "not a data set\n")
    with pytest.raises(SystemExit) as exit_info:
        prepare.run_cli(lambda: prepare.main([kind, str(tmp_path / "src"), "--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_imported_ljspeech_trains_stage_d_with_its_own_charset(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    lines = []
    for i in range(12):
        utt = f"LJ002-{i:04d}"
        put(root / "wavs" / f"{utt}.wav", clip_bytes(i, "WAV", rate=22050))    # resampled to 16 kHz on read
        lines.append(f"{utt}|Raw {i}.|{WORDS[i % 10].capitalize()} {WORDS[(i + 3) % 10]}, Zoë!")
    put(root / "metadata.csv", "\n".join(lines) + "\n")
    out = tmp_path / "lj"
    run_prepare("ljspeech", root, "--out", out, "--val_fraction", "0.2", "--test_fraction", "0")
    cfg = talker_config(str(out), tmp_path / "talker", max_steps=4, codec_steps=2, eval_interval=4,
                        checkpoint_freq=2, train_manifest=str(out / "tts_train.jsonl"),
                        val_manifest=str(out / "tts_val.jsonl"))
    proc = run_script("train_talker.py", "--config", write_config(tmp_path / "d.json", cfg), check=True)
    train = [r for r in records(tmp_path / "talker" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[-1]["skipped_samples"] == 0, proc.stdout
    with open(tmp_path / "talker" / "config.json") as f:
        charset = json.load(f)["charset"]
    assert set("zoë ") <= set(charset) and not set(",!.") & set(charset)    # derived after normalisation
    assert os.path.isfile(tmp_path / "talker" / "talker.pt")
