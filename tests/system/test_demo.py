"""Tests of the demo-world generator (omni.data.world / speech / demo).

One small world is built per module (counts overridden to keep the run short on 2 cores)
and shared by the tests; the determinism tests build it twice more."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omni.data import demo, speech, world

COUNTS = {"images": (24, 6, 8), "text": (120, 30, 40), "asr": (10, 3, 6), "tts": (8, 3, 4),
          "speech_qa": (8, 4, 8), "image_qa": (24, 6, 8), "text_sft": (10, 4, 6), "caption_sft": (6, 3, 3)}
SPLITS = ("train", "val", "test")
SPOKEN = re.compile(r"^[a-z]+( [a-z]+)*$")
OBJ = re.compile(r"(small|big) (\w+) (\w+)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    info = demo.build_demo_world(root / "a", size="tiny", seed=0, counts=COUNTS, progress=False)
    return root, info


@pytest.fixture(scope="module")
def out(built):
    return built[0] / "a"


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _written_texts(out, split):
    """Every piece of text of one split, with where it came from."""
    texts = [(f"text/{split}.txt", line) for line in (out / "text" / f"{split}.txt").read_text().splitlines()]
    texts += [(f"image_caption_{split}", r["caption"]) for r in _jsonl(out / f"image_caption_{split}.jsonl")]
    texts += [(f"asr_{split}", r["text"]) for r in _jsonl(out / f"asr_{split}.jsonl")]
    texts += [(f"tts_{split}", r["text"]) for r in _jsonl(out / f"tts_{split}.jsonl")]
    for r in _jsonl(out / f"sft_{split}.jsonl"):
        texts += [(f"sft_{split}", t["content"]) for t in r["conversation"]]
        if "transcript" in r:
            texts.append((f"sft_{split}", r["transcript"]))
    return texts


def _clip_texts(out):
    """wav path -> the text spoken in it."""
    texts = {}
    for split in SPLITS:
        for r in _jsonl(out / f"asr_{split}.jsonl") + _jsonl(out / f"tts_{split}.jsonl"):
            texts[r["audio"]] = r["text"]
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            if r["kind"] == "speech_qa":
                texts[r["audio"]] = r["transcript"]
    return texts


# ---- layout and formats ---------------------------------------------------------------------
def test_layout_and_counts(out, built):
    info = json.loads((out / "world.json").read_text())
    assert (out / "DONE").is_file()
    assert info["seed"] == 0 and info["size"] == "tiny" and info["sample_rate"] == 16000
    assert info["generator_version"] == demo.GENERATOR_VERSION
    for i, split in enumerate(SPLITS):
        c = info["counts"][split]
        assert c["images"] == COUNTS["images"][i] == len(_jsonl(out / f"image_caption_{split}.jsonl"))
        assert c["asr"] == COUNTS["asr"][i] == len(_jsonl(out / f"asr_{split}.jsonl"))
        assert c["tts"] == len(_jsonl(out / f"tts_{split}.jsonl")) == COUNTS["tts"][i]
        n_sft = sum(COUNTS[k][i] for k in ("image_qa", "speech_qa", "text_sft", "caption_sft"))
        assert c["sft"] == n_sft == len(_jsonl(out / f"sft_{split}.jsonl"))
        assert len((out / "text" / f"{split}.txt").read_text().splitlines()) == COUNTS["text"][i]
    assert built[1]["out_dir"] == str(out.resolve())
    assert not list(out.parent.glob(".a.tmp-*")), "temporary build folder left behind"


def test_manifests_reference_existing_files_of_their_split(out):
    referenced = set()
    for split in SPLITS:
        for name in ("image_caption", "asr", "tts", "sft"):
            for r in _jsonl(out / f"{name}_{split}.jsonl"):
                for key in ("image", "audio"):
                    if key in r:
                        assert (out / r[key]).is_file(), r[key]
                        assert Path(r[key]).name.startswith(f"{split}_"), (split, r[key])
                        referenced.add(r[key])
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            assert r["kind"] in ("image_qa", "speech_qa", "text", "caption")
            assert ("image" in r) == (r["kind"] in ("image_qa", "caption"))
            assert ("audio" in r) == ("transcript" in r) == (r["kind"] == "speech_qa")
            turns = demo.TRAIN_IMAGE_TURNS if (split, r["kind"]) == ("train", "image_qa") else 1
            assert [t["role"] for t in r["conversation"]] == ["user", "assistant"] * turns
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").iterdir()}
    on_disk |= {p.relative_to(out).as_posix() for p in (out / "speech").iterdir()}
    assert on_disk == referenced, "orphan or missing media files"


def test_images_are_64px_rgb_png(out):
    for p in sorted((out / "images").iterdir()):
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            assert 2 <= len(im.getcolors(64 * 64)) , p  # background plus at least one shape


def test_wavs_are_16k_mono_nonsilent_and_fit_their_text(out):
    texts = _clip_texts(out)
    assert len(texts) == len(list((out / "speech").iterdir()))
    for rel, text in sorted(texts.items()):
        meta = sf.info(out / rel)
        assert (meta.samplerate, meta.channels, meta.subtype, meta.format) == (16000, 1, "PCM_16", "WAV")
        audio, sr = sf.read(out / rel, dtype="int16")
        speech.check_clip(audio, text, sr)
        dur, rms = speech.clip_stats(audio, sr)
        assert rms > 0.02 and 0.2 < dur < 8.0, (rel, text, dur, rms)


def test_text_charset(out):
    for split in SPLITS:
        for where, text in _written_texts(out, split):
            if where.startswith(("asr", "tts")):
                assert SPOKEN.match(text), (where, text)
            elif text:  # speech_qa user turns are empty: the question is the audio
                assert world.LINE_RE.match(text), (where, text)
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            if r["kind"] == "speech_qa":
                assert SPOKEN.match(r["transcript"]) and r["conversation"][0]["content"] == ""
            for user, answer in zip(r["conversation"][::2], r["conversation"][1::2]):
                assert "?" not in answer["content"]
                assert "?" not in user["content"][:-1]


# ---- held-out generalization ----------------------------------------------------------------
def test_heldout_items_absent_from_train_val_present_in_test(out):
    held = json.loads((out / "world.json").read_text())["heldout"]
    pairs = held["colour_shape_phrases"]
    sums = held["sum_phrases"]
    assert len(pairs) == 4 and len(sums) == 6
    colours = [p.split()[0] for p in pairs]
    shapes = [p.split()[1] for p in pairs]
    assert len(set(colours)) == len(set(shapes)) == 4  # every colour/shape still trainable
    for split in ("train", "val"):
        for where, text in _written_texts(out, split):
            for phrase in pairs + sums:
                assert not world.mentions(text, phrase), (where, text, phrase)
    for r in _jsonl(out / "image_caption_test.jsonl"):
        assert any(world.mentions(r["caption"], p) for p in pairs), r
    test_texts = [t for _, t in _written_texts(out, "test")]
    assert any(world.mentions(t, p) for t in test_texts for p in sums)
    spoken_q = [r["transcript"] for r in _jsonl(out / "sft_test.jsonl") if r["kind"] == "speech_qa"]
    assert any(world.mentions(t, p) for t in spoken_q for p in sums)


def test_text_corpus_never_names_a_colour_with_a_shape(out):
    """Stage A's corpus is facts, sums and chat, no scenes: a Thinker that learnt from text which
    colour-shape pairs exist begins Stage E sure that the held-out ones never do."""
    lines = [line for split in SPLITS for line in (out / "text" / f"{split}.txt").read_text().splitlines()]
    words = [set(line.replace("?", "").split()) for line in lines]
    assert any("?" in line for line in lines)
    assert any(w & set(world.COLOUR_NAMES) for w in words) and any(w & set(world.SHAPES) for w in words)
    for line, w in zip(lines, words):
        assert not (w & set(world.COLOUR_NAMES) and w & set(world.SHAPES)), line


def test_image_answers_match_the_caption(out):
    for split in SPLITS:
        captions = {r["image"]: r["caption"] for r in _jsonl(out / f"image_caption_{split}.jsonl")}
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            if r["kind"] != "image_qa":
                continue
            objs = OBJ.findall(captions[r["image"]])
            turns = [t["content"] for t in r["conversation"]]
            assert len(set(turns[::2])) == len(turns) // 2, "a conversation asks each question once"
            for q, a in zip(turns[::2], turns[1::2]):
                check_image_answer(q, a, objs, captions[r["image"]])


def check_image_answer(q: str, a: str, objs: list, caption: str) -> None:
    by_shape = {s: (size, c) for size, c, s in objs}
    by_colour = {c: s for _, c, s in objs}
    if m := re.fullmatch(r"what colour is the (\w+)\?", q):
        assert by_shape[m[1]][1] == a
    elif m := re.fullmatch(r"what shape is the (\w+) one\?", q):
        assert by_colour[m[1]] == a
    elif m := re.fullmatch(r"is the (\w+) big or small\?", q):
        assert by_shape[m[1]][0] == a
    elif m := re.fullmatch(r"is the (\w+) (\w+)\?", q):
        assert a == ("yes" if by_shape[m[1]][1] == m[2] else "no")
    elif m := re.fullmatch(r"is there a (\w+) one\?", q):
        assert a == ("yes" if m[1] in by_colour else "no")
    elif m := re.fullmatch(r"is there a (\w+)\?", q):
        assert a == ("yes" if m[1] in by_shape else "no")
    elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        assert a == ("yes" if by_colour.get(m[1]) == m[2] else "no")
    elif q == "how many shapes are there?":
        assert a == world.NUMBERS[len(objs)]
    else:
        m = re.fullmatch(r"what shape is (above|below|left of|right of) the (\w+)\?", q)
        assert m and f"{a} {m[1]} a " in caption, (q, a, caption)


def test_topics_name_what_each_conversation_asks(out):
    """The per-topic accuracies of Stage E read these fields: image questions by kind, facts and
    sums (held-out ones apart), chat, and captions whose answer is the image's caption."""
    heldout = set(json.loads((out / "world.json").read_text())["heldout"]["sum_phrases"])
    for split in SPLITS:
        captions = {r["image"]: r["caption"] for r in _jsonl(out / f"image_caption_{split}.jsonl")}
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            q, a = (t["content"] for t in r["conversation"][:2])   # the topic is the first question's
            topic, text = r["topic"], r.get("transcript", q)
            if r["kind"] == "image_qa":
                expected = {"what colour": "colour", "what shape is the": "shape", "is the .* big or small": "size",
                            "how many": "count", "what shape is": "relation", "is ": "yes_no"}
                assert topic == next(v for k, v in expected.items() if re.match(k, q)), (q, topic)
            elif r["kind"] == "caption":
                assert topic == "caption" and q in world.CAPTION_PROMPTS and a == captions[r["image"]]
            elif " plus " in text:
                assert topic == ("heldout_sums" if any(world.mentions(text, p) for p in heldout) else "arithmetic")
            elif topic == "chat":
                assert r["kind"] == "text" and (q, a) in world.CHAT
            else:
                assert topic == "facts" and (text, a) not in world.CHAT


def test_ensure_rebuilds_a_world_of_an_older_generator(built):
    target = built[0] / "old"
    demo.build_demo_world(target, size="tiny", seed=1, counts=COUNTS, progress=False)
    (target / "DONE").write_text(json.dumps({"generator_version": 1, "seed": 1, "size": "tiny"}))
    info = demo.ensure_demo_world(target, size="tiny", seed=1, counts=COUNTS, progress=False)
    assert info["built"] is True
    assert json.loads((target / "DONE").read_text())["generator_version"] == demo.GENERATOR_VERSION


def test_spoken_arithmetic_answers(out):
    n = {w: i for i, w in enumerate(world.NUMBERS)}
    seen = 0
    for split in SPLITS:
        for r in _jsonl(out / f"sft_{split}.jsonl"):
            m = re.fullmatch(r"what is (\w+) plus (\w+)", r.get("transcript", ""))
            if m:
                seen += 1
                assert r["conversation"][1]["content"] == world.NUMBERS[n[m[1]] + n[m[2]]]
    assert seen > 0


# ---- determinism --------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_and_other_seed_differs(built, out, monkeypatch):
    root = built[0]
    monkeypatch.setattr(demo, "SPEECH_WORKERS", 1)   # `out` spoke its clips in a pool of processes
    demo.build_demo_world(root / "b", size="tiny", seed=0, counts=COUNTS, progress=False)
    a, b = _files(out), _files(root / "b")
    assert sorted(a) == sorted(b)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"files differ between identical builds: {diff[:5]}"
    demo.build_demo_world(root / "c", size="tiny", seed=1, counts=COUNTS, progress=False)
    c = _files(root / "c")
    assert a["world.json"] != c["world.json"]
    for prefix in ("images/", "speech/"):
        same = [k for k in a if k.startswith(prefix) and a[k] == c.get(k)]
        assert len(same) < 0.2 * sum(k.startswith(prefix) for k in a), (prefix, same[:5])


def test_synthesis_is_a_pure_function_of_its_arguments():
    first, sr = speech.synthesize("a small red circle", voice="en+f2", rate=150, pitch=60)
    speech.synthesize("something else entirely", voice="en-us+m1", rate=190, pitch=35)
    again, _ = speech.synthesize("a small red circle", voice="en+f2", rate=150, pitch=60)
    other, _ = speech.synthesize("a small red circle", voice="en-us", rate=150, pitch=60)
    assert sr == 16000 and first.dtype == np.int16
    assert np.array_equal(first, again)
    assert not np.array_equal(first[: len(other)], other[: len(first)])
    with pytest.raises(RuntimeError, match="voice"):
        speech.synthesize("hello", voice="no-such-voice")


def test_check_clip_rejects_silence_and_bad_durations():
    text = "what is two plus two"
    good, sr = speech.synthesize(text)
    speech.check_clip(good, text, sr)
    with pytest.raises(speech.ClipError, match=text):
        speech.check_clip(np.zeros_like(good), text, sr)
    with pytest.raises(speech.ClipError, match=text):
        speech.check_clip(good[: sr // 10], text, sr)  # far too short for 20 characters
    with pytest.raises(speech.ClipError, match="hi"):
        speech.check_clip(np.tile(good, 4), "hi", sr)  # far too long for two characters


# ---- the DONE marker ------------------------------------------------------------------------
def test_ensure_skips_complete_world(out):
    stamp = (out / "DONE").stat().st_mtime_ns
    info = demo.ensure_demo_world(out, size="tiny", counts=COUNTS, progress=False)
    assert info["built"] is False and info["seed"] == 0
    assert (out / "DONE").stat().st_mtime_ns == stamp
    assert demo.main(["--out", str(out), "--size", "tiny", "--if-missing", "--quiet"]) == 0
    assert (out / "DONE").stat().st_mtime_ns == stamp


def test_ensure_rebuilds_incomplete_folder(built):
    target = built[0] / "partial"
    (target / "images").mkdir(parents=True)
    (target / "images" / "train_00000.png").write_bytes(b"truncated")
    (target / "world.json").write_text("{}")
    info = demo.ensure_demo_world(target, size="tiny", seed=3, counts=COUNTS, progress=False)
    assert info["built"] is True and (target / "DONE").is_file()
    assert json.loads((target / "world.json").read_text())["seed"] == 3
    with Image.open(target / "images" / "train_00000.png") as im:
        assert im.size == (64, 64)
    assert demo.ensure_demo_world(target, size="tiny", seed=3, counts=COUNTS)["built"] is False


def test_failed_build_leaves_no_complete_looking_folder(built, monkeypatch):
    target = built[0] / "failing"

    def broken(samples, text, sample_rate=16000):
        raise speech.ClipError(f"clip for {text!r} is silent")

    monkeypatch.setattr(speech, "check_clip", broken)
    with pytest.raises(speech.ClipError, match="clip for"):
        demo.build_demo_world(target, size="tiny", counts=COUNTS, progress=False)
    assert not target.exists()
    assert not list(built[0].glob(".failing.tmp-*"))


# ---- world unit checks ----------------------------------------------------------------------
def test_scene_questions_have_unique_answers():
    import random

    rng = random.Random(5)
    held = world.choose_heldout_pairs(rng)
    for i in range(300):
        scene = world.sample_scene(rng, held, with_heldout=bool(i % 2))
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert any(p in held for p in scene.pairs) == bool(i % 2)
        qs = world.image_questions(scene, rng, held, allow_heldout=bool(i % 2))
        assert len({q[0] for q in qs}) == len(qs)  # no question asked twice with two answers
        if len(scene.objects) == 2:
            i_, rel, j = scene.relation
            assert world.relation_of(scene.objects[i_], scene.objects[j]) == rel


def test_question_kinds_are_balanced():
    import random
    from collections import Counter

    rng = random.Random(7)
    held = world.choose_heldout_pairs(rng)
    answers = Counter()
    for _ in range(3000):
        scene = world.sample_scene(rng, held, with_heldout=False)
        qs = world.image_questions(scene, rng, held, allow_heldout=False)
        answers[world.pick_question(qs, rng, demo.QUESTION_WEIGHTS)[1]] += 1
    assert 0.8 < answers["yes"] / answers["no"] < 1.25
    assert answers["yes"] < 0.15 * sum(answers.values())


def test_yes_no_that_check_one_attribute_are_asked_in_training_only(out):
    """Training conversations also ask "is there a triangle?", "is there a yellow one?", "is the
    triangle yellow?" and "is there a <colour of one> <shape of another>?" (answers checked by
    test_image_answers_match_the_caption); val and test keep the kinds their figures are compared by."""
    templates = {"has_shape": r"is there a \w+\?", "has_colour": r"is there a \w+ one\?",
                 "is_colour": r"is the \w+ (?!big or small)\w+\?"}
    asked = {split: [t["content"] for r in _jsonl(out / f"sft_{split}.jsonl") if r["kind"] == "image_qa"
                     for t in r["conversation"][::2]] for split in SPLITS}
    for name, pattern in templates.items():
        assert any(re.fullmatch(pattern, q) for q in asked["train"]), name
        for split in ("val", "test"):
            assert not any(re.fullmatch(pattern, q) for q in asked[split]), (split, name)


def test_training_questions_stay_balanced_with_the_checks():
    import random
    from collections import Counter

    rng = random.Random(3)
    held = world.choose_heldout_pairs(rng)
    answers, kinds = Counter(), Counter()
    for _ in range(3000):
        scene = world.sample_scene(rng, held, with_heldout=False)
        qs = world.image_questions(scene, rng, held, False) + world.attribute_questions(scene, rng, held)
        q, a, hot, kind = world.pick_question(qs, rng, demo.TRAIN_QUESTION_WEIGHTS)
        answers[a] += 1
        kinds[kind] += 1
        assert not hot and not any(world.mentions(q, f"{c} {s}") for c, s in held), q
        if m := re.fullmatch(r"is the (\w+) (\w+)\?", q):
            assert (m[2], m[1]) not in held, q
    assert 0.8 < answers["yes"] / answers["no"] < 1.25
    assert set(kinds) == set(demo.TRAIN_QUESTION_WEIGHTS)


def test_synthesis_works_in_a_forked_worker():
    import os

    parent, _ = speech.synthesize("hello there")
    pid = os.fork()
    if pid == 0:  # like a DataLoader worker: must get its own helper and not deadlock
        child, _ = speech.synthesize("hello there")
        os._exit(0 if np.array_equal(parent, child) else 3)
    assert os.waitpid(pid, 0)[1] == 0
    again, _ = speech.synthesize("hello there")
    assert np.array_equal(parent, again)
