"""Deterministic offline demo world: images, captions, text, speech and SFT conversations.

    python -m omni.data.demo --out data/demo --size tiny|small|medium [--seed N] [--if-missing]

Public API:
    build_demo_world(out_dir, size="tiny", seed=0, counts=None, progress=True) -> dict
    ensure_demo_world(out_dir, size="small", seed=0, counts=None, progress=True) -> dict

The layout is described in docs/demo_world.md.  Every random choice comes from
`random.Random` streams named after (seed, split, purpose), so one part's count never shifts
another part's content, and the same seed and size give byte-identical files.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path

import soundfile as sf

from omni.data import speech, world

GENERATOR_VERSION = 5   # 2: SFT records carry a topic; captioning conversations. 3: multi-turn image QA in train.
#                         4: the text corpus holds no scene lines. 5: training-only yes/no kinds
SPLITS = ("train", "val", "test")
# Per split (train, val, test).  image_qa/text_sft/speech_qa are SFT record counts.
SIZE_COUNTS = {
    "tiny": {"images": (240, 30, 30), "text": (1500, 200, 200), "asr": (100, 15, 15),
             "tts": (50, 10, 10), "speech_qa": (50, 10, 10), "image_qa": (240, 30, 30),
             "text_sft": (100, 15, 15), "caption_sft": (30, 5, 5)},
    "small": {"images": (4000, 500, 500), "text": (8000, 1000, 1000), "asr": (1600, 200, 200),
              "tts": (800, 100, 100), "speech_qa": (800, 100, 100), "image_qa": (3200, 400, 400),
              "text_sft": (800, 100, 100), "caption_sft": (800, 100, 100)},
    "medium": {"images": (20000, 2500, 2500), "text": (40000, 5000, 5000), "asr": (8000, 1000, 1000),
               "tts": (3200, 400, 400), "speech_qa": (3200, 400, 400), "image_qa": (16000, 2000, 2000),
               "text_sft": (3200, 400, 400), "caption_sft": (3200, 400, 400)},
}
SPEECH_WORKERS = 4      # processes speaking the clips (at most the machine's cores)
TTS_VOICE = {"voice": "en", "rate": 175, "pitch": 50}  # espeak's defaults, one voice
RATE_RANGE, PITCH_RANGE = (130, 200), (30, 70)
HELDOUT_FACT_SHARE = 0.5   # share of test knowledge items drawn from the held-out sums
HOT_QUESTION_SHARE = 0.75  # share of test image questions about a held-out object
# Relative frequency of image-question kinds; yes and no are equally likely.
QUESTION_WEIGHTS = {"colour": 4, "shape": 4, "size": 3, "count": 2, "relation": 4,
                    "exists_yes": 2, "exists_no": 2}
# Training conversations also ask the yes/no questions that check one attribute
# (world.attribute_questions); val and test keep the kinds above, so their figures compare across versions.
TRAIN_QUESTION_WEIGHTS = {**QUESTION_WEIGHTS, **{k: 1 for k in world.CHECK_KINDS}}
# Questions per training image conversation. Each extra turn costs a few tokens beside the image's
# tokens, so SFT sees several times more image answers per step (val and test keep one question each,
# so every one is scored alone). Four since version 5: the checks take a quarter of the questions,
# and with three turns the other kinds, colour among them, got a quarter fewer answers and did worse.
TRAIN_IMAGE_TURNS = 4


def _counts_for(size: str, override: dict | None) -> dict:
    if size not in SIZE_COUNTS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_COUNTS)}")
    counts = {k: dict(zip(SPLITS, v)) for k, v in SIZE_COUNTS[size].items()}
    for key, val in (override or {}).items():
        if key not in counts:
            raise ValueError(f"unknown count {key!r}; known: {sorted(counts)}")
        counts[key] = dict(val) if isinstance(val, dict) else dict(zip(SPLITS, val))
    return counts


def _rng(seed: int, *names) -> random.Random:
    # str seeds hash with SHA-512 inside `random`, independent of PYTHONHASHSEED
    return random.Random(":".join([str(seed), *map(str, names)]))


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=True) + "\n")


def _turns(user: str, answer: str) -> list:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


class _Builder:
    """Holds the shared state of one build (held-out items, speech queue, file counters)."""

    def __init__(self, root: Path, seed: int, counts: dict):
        self.root, self.seed, self.counts = root, seed, counts
        hrng = _rng(seed, "heldout")
        self.heldout = world.choose_heldout_pairs(hrng)
        self.heldout_sums = world.choose_heldout_sums(hrng)
        facts = world.knowledge()
        self.facts_open = [f for f in facts if not world.is_heldout_fact(f, self.heldout_sums)]
        self.facts_hot = [f for f in facts if world.is_heldout_fact(f, self.heldout_sums)]
        self.voices = speech.available_voices()
        self.speech_jobs: list = []       # (relative path, text, voice, rate, pitch)
        self.clip_index = {s: 0 for s in SPLITS}
        self.tts_used: set = set()        # TTS texts are unique across all splits
        self.stats: dict = {s: {} for s in SPLITS}

    # ---- small samplers ------------------------------------------------------------------
    def scene(self, rng, split):
        return world.sample_scene(rng, self.heldout, with_heldout=(split == "test"))

    def fact(self, rng, split) -> world.Fact:
        if split == "test" and rng.random() < HELDOUT_FACT_SHARE:
            return rng.choice(self.facts_hot)
        return rng.choice(self.facts_open)

    def image_qa(self, rng, split, scene, turns: int = 1, sft_train: bool = False) -> list:
        """`turns` different (question, answer, topic) about one scene (fewer when it has fewer);
        sft_train adds the training-only kinds."""
        qs = world.image_questions(scene, rng, self.heldout, allow_heldout=(split == "test"))
        hot = [q for q in qs if q[2]]
        if split == "test" and hot and rng.random() < HOT_QUESTION_SHARE:
            qs = hot
        weights = QUESTION_WEIGHTS
        if sft_train:
            qs, weights = qs + world.attribute_questions(scene, rng, self.heldout), TRAIN_QUESTION_WEIGHTS
        chosen = []
        while qs and len(chosen) < turns:
            q, a, _, kind = world.pick_question(qs, rng, weights)
            qs = [other for other in qs if other[0] != q]
            chosen.append((q, a, world.question_topic(kind)))
        return chosen

    def queue_clip(self, split, text, voice, rate, pitch) -> str:
        rel = f"speech/{split}_{self.clip_index[split]:05d}.wav"
        self.clip_index[split] += 1
        self.speech_jobs.append((rel, world.spoken(text), voice, rate, pitch))
        return rel

    def varied_clip(self, rng, split, text) -> str:
        return self.queue_clip(split, text, rng.choice(self.voices),
                               rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE))

    # ---- parts ---------------------------------------------------------------------------
    def images(self, split) -> list:
        rng = _rng(self.seed, split, "images")
        scenes, records = [], []
        for i in range(self.counts["images"][split]):
            scene = self.scene(rng, split)
            rel = f"images/{split}_{i:05d}.png"
            world.render(scene).save(self.root / rel, format="PNG")
            scenes.append((rel, scene))
            records.append({"image": rel, "caption": world.caption(scene)})
        _write_jsonl(self.root / f"image_caption_{split}.jsonl", records)
        self.stats[split]["images"] = len(records)
        return scenes

    def corpus_line(self, rng, split) -> str:
        """A line of the Thinker's corpus: a fact, a question on one, or a chat exchange. No scene lines:
        with captions and questions on scenes (55 % of the corpus until generator version 4) Stage A
        learnt from text which colour-shape pairs exist, and Stage E began from a Thinker sure that the
        held-out ones never do (docs/experiments/2026-12-06_stage_e_demo_world_options.md, "Stage A without scene text")."""
        kind = rng.choices(("statement", "fact_qa", "chat"), weights=(20, 15, 10))[0]
        if kind == "chat":
            return " ".join(rng.choice(world.CHAT))
        fact = self.fact(rng, split)
        return fact.statement if kind == "statement" else f"{world.as_question(fact.question)} {fact.answer}"

    def text_corpus(self, split) -> None:
        rng = _rng(self.seed, split, "text")
        lines = [self.corpus_line(rng, split) for _ in range(self.counts["text"][split])]
        for line in lines:
            if not world.LINE_RE.match(line):
                raise AssertionError(f"bad corpus line {line!r}")
        (self.root / "text" / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="ascii")
        self.stats[split]["text_lines"] = len(lines)

    def asr_text(self, rng, split) -> str:
        kind = rng.choices(("caption", "image_q", "fact_q", "statement", "chat"),
                           weights=(40, 15, 20, 15, 10))[0]
        if kind in ("caption", "image_q"):
            scene = self.scene(rng, split)
            return world.caption(scene) if kind == "caption" else self.image_qa(rng, split, scene)[0][0]
        if kind == "chat":
            return rng.choice(rng.choice(world.CHAT))
        fact = self.fact(rng, split)
        return fact.question if kind == "fact_q" else fact.statement

    def asr(self, split) -> None:
        rng = _rng(self.seed, split, "asr")
        records = []
        for _ in range(self.counts["asr"][split]):
            text = world.spoken(self.asr_text(rng, split))
            records.append({"audio": self.varied_clip(rng, split, text), "text": text})
        _write_jsonl(self.root / f"asr_{split}.jsonl", records)
        self.stats[split]["asr"] = len(records)

    def tts_text(self, rng, split) -> str:
        kind = rng.choices(("word", "reply", "statement", "caption"), weights=(25, 15, 25, 35))[0]
        if kind == "word":
            return rng.choice(sorted(set(world.NUMBERS) | set(world.COLOUR_NAMES) | set(world.SHAPES)
                                     | set(world.SIZE_NAMES) | {"yes", "no"}))
        if kind == "reply":
            return rng.choice(world.CHAT)[1]
        if kind == "statement":
            return self.fact(rng, split).statement
        return world.caption(self.scene(rng, split))

    def tts(self, split) -> None:
        rng = _rng(self.seed, split, "tts")
        records, n, tries = [], self.counts["tts"][split], 0
        while len(records) < n and tries < 100 * n:  # unique texts: repeats would add nothing
            tries += 1
            text = world.spoken(self.tts_text(rng, split))
            if text in self.tts_used:
                continue
            self.tts_used.add(text)
            rel = self.queue_clip(split, text, TTS_VOICE["voice"], TTS_VOICE["rate"], TTS_VOICE["pitch"])
            records.append({"text": text, "audio": rel})
        _write_jsonl(self.root / f"tts_{split}.jsonl", records)
        self.stats[split]["tts"] = len(records)

    def fact_topic(self, fact: world.Fact) -> str:
        if fact.sum_pair is None:
            return "facts"
        return "heldout_sums" if world.is_heldout_fact(fact, self.heldout_sums) else "arithmetic"

    def sft(self, split, scenes) -> None:
        rng = _rng(self.seed, split, "sft")
        records = []
        for i in range(self.counts["image_qa"][split]):
            rel, scene = scenes[i % len(scenes)]
            train = split == "train"
            qas = self.image_qa(rng, split, scene, TRAIN_IMAGE_TURNS if train else 1, sft_train=train)
            records.append({"kind": "image_qa", "topic": qas[0][2], "image": rel,
                            "conversation": [m for q, a, _ in qas for m in _turns(q, a)]})
        for _ in range(self.counts["speech_qa"][split]):
            fact = self.fact(rng, split)
            audio = self.varied_clip(rng, split, fact.question)
            records.append({"kind": "speech_qa", "topic": self.fact_topic(fact), "audio": audio,
                            "transcript": fact.question, "conversation": _turns("", fact.answer)})
        for _ in range(self.counts["text_sft"][split]):
            if rng.random() < 0.3:
                (user, answer), topic = rng.choice(world.CHAT), "chat"
            else:
                fact = self.fact(rng, split)
                user, answer, topic = world.as_question(fact.question), fact.answer, self.fact_topic(fact)
            records.append({"kind": "text", "topic": topic, "conversation": _turns(user, answer)})
        for i in range(self.counts["caption_sft"][split]):
            rel, scene = scenes[-1 - i % len(scenes)]    # from the end: other images than the first questions'
            records.append({"kind": "caption", "topic": "caption", "image": rel,
                            "conversation": _turns(rng.choice(world.CAPTION_PROMPTS), world.caption(scene))})
        rng.shuffle(records)  # interleave kinds: a loader reading a prefix sees all three
        _write_jsonl(self.root / f"sft_{split}.jsonl", records)
        self.stats[split]["sft"] = len(records)
        for kind in ("image_qa", "speech_qa", "text", "caption"):
            self.stats[split][f"sft_{kind}"] = sum(r["kind"] == kind for r in records)

    def synthesize_all(self, progress: bool) -> None:
        jobs = [(str(self.root), *job) for job in self.speech_jobs]
        bar = _progress(len(jobs), "speech", progress)
        seconds = {s: 0.0 for s in SPLITS}
        workers = min(os.cpu_count() or 1, SPEECH_WORKERS)
        if multiprocessing.current_process().daemon:   # a daemon (a DataLoader worker) may not fork a pool
            workers = 1
        with contextlib.ExitStack() as stack:
            durations = map(_speak_clip, jobs)
            if workers > 1:     # each clip is independent: the files are the same with any number of workers
                pool = stack.enter_context(multiprocessing.get_context("fork").Pool(workers, _one_thread))
                durations = pool.imap(_speak_clip, jobs, chunksize=8)     # in order
            for job, duration in zip(jobs, durations):
                seconds[job[1].split("/")[1].split("_")[0]] += duration
                bar.update(1)
        bar.close()
        for s in SPLITS:
            self.stats[s]["speech_clips"] = self.clip_index[s]
            self.stats[s]["speech_seconds"] = round(seconds[s], 1)


def _one_thread() -> None:
    # A forked child of a process whose OpenMP pool ran deadlocks in its first parallel op (the
    # resampling); one thread avoids the pool, as DataLoader workers do, and keeps a worker per core.
    import torch
    torch.set_num_threads(1)


def _speak_clip(job: tuple) -> float:
    """Synthesize one queued clip into its file; returns its duration in seconds."""
    root, rel, text, voice, rate, pitch = job
    audio, sr = speech.synthesize(text, voice=voice, rate=rate, pitch=pitch)
    speech.check_clip(audio, text, sr)  # raises ClipError naming the text
    sf.write(Path(root) / rel, audio, sr, subtype="PCM_16", format="WAV")
    return len(audio) / sr


def _progress(total: int, desc: str, enabled: bool):
    # stderr: stdout carries the CLI's JSON summary. A bar on a terminal, plain lines in a log.
    from omni.logs import Progress  # optional: keeps `python -m omni.data.demo` free of torch until a bar is drawn
    return Progress(total, desc, unit="clip", enabled=enabled, stream=sys.stderr)


def _world_json(b: _Builder, size: str) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": b.seed,
        "size": size,
        "sample_rate": speech.SAMPLE_RATE,
        "image_size": world.IMAGE_SIZE,
        "counts": b.stats,
        "heldout": {
            "colour_shape": [list(p) for p in b.heldout],
            "colour_shape_phrases": [f"{c} {s}" for c, s in b.heldout],
            "sums": [list(p) for p in b.heldout_sums],
            "sum_phrases": world.sum_phrases(b.heldout_sums),
        },
        "vocabulary": {"shapes": list(world.SHAPES), "colours": list(world.COLOUR_NAMES),
                       "sizes": list(world.SIZE_NAMES), "relations": list(world.RELATIONS),
                       "numbers": list(world.NUMBERS)},
        "speech": {"engine": "eSpeak NG via espeakng-loader", "tts_voice": TTS_VOICE,
                   "varied_voices": b.voices, "rate_range": list(RATE_RANGE),
                   "pitch_range": list(PITCH_RANGE)},
        "charset": {"spoken": "lowercase a-z words separated by single spaces",
                    "written": "lowercase a-z and spaces; a question ends with '?'"},
    }


def _clean_stale_tmp(out: Path) -> None:
    """Remove temporary build folders left by builds whose process is gone."""
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished build into place; a previous folder is replaced."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def build_demo_world(out_dir, size: str = "tiny", seed: int = 0, counts: dict | None = None,
                     progress: bool = True) -> dict:
    """Generate the demo world into out_dir (replacing it) and return a summary dict
    (world.json's content plus out_dir and build_seconds).  `counts` overrides entries of
    the size's SIZE_COUNTS, e.g. {"images": (20, 5, 5)}, to keep tests quick."""
    start = time.time()
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "speech", "text"):
        (tmp / sub).mkdir(parents=True)
    try:
        b = _Builder(tmp, seed, _counts_for(size, counts))
        for split in SPLITS:
            scenes = b.images(split)
            b.text_corpus(split)
            b.asr(split)
            b.sft(split, scenes)
            b.tts(split)
        b.synthesize_all(progress)
        info = _world_json(b, size)
        (tmp / "world.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        marker = {"generator_version": GENERATOR_VERSION, "seed": seed, "size": size}
        (tmp / "DONE").write_text(json.dumps(marker, sort_keys=True) + "\n")  # written LAST
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out_dir": str(out), "build_seconds": round(time.time() - start, 1)}


def _built_version(out: Path):
    try:
        return json.loads((out / "DONE").read_text()).get("generator_version")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_demo_world(out_dir, size: str = "small", seed: int = 0, counts: dict | None = None,
                      progress: bool = True) -> dict:
    """Build the demo world unless out_dir already holds a finished one (its DONE marker).
    An existing finished world is kept as is, whatever size it was built with.  A lock
    file beside out_dir makes concurrent callers (e.g. torchrun ranks) wait for one build."""
    out = Path(out_dir).resolve()
    if (out / "DONE").exists() and _built_version(out) != GENERATOR_VERSION:
        print(f"{out}: built by demo generator version {_built_version(out)}; rebuilding with version "
              f"{GENERATOR_VERSION}", flush=True)
        (out / "DONE").unlink()
    if not (out / "DONE").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "DONE").exists():
                return {**build_demo_world(out, size, seed, counts, progress), "built": True}
    info = json.loads((out / "world.json").read_text())
    return {**info, "out_dir": str(out), "built": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate the deterministic offline demo world.")
    ap.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    ap.add_argument("--size", default="small", choices=sorted(SIZE_COUNTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--if-missing", action="store_true", help="do nothing if --out is complete")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    fn = ensure_demo_world if args.if_missing else build_demo_world
    info = fn(args.out, size=args.size, seed=args.seed, progress=not args.quiet)
    counts = {s: info["counts"][s] for s in SPLITS}
    print(json.dumps({"out_dir": info["out_dir"], "build_seconds": info.get("build_seconds"),
                      "counts": counts, "heldout": info["heldout"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
