"""`python -m omni.data.prepare KIND SOURCE --out DIR`: the suite's manifests from a data set in its
own layout (KIND: librispeech, ljspeech, commonvoice, coco, text, hf; layouts.py reads each).

Writes in DIR, ready for the trainers' `--set` manifest keys (docs/data.md, "Bring your own data"):
- `asr_{split}.jsonl` / `tts_{split}.jsonl`: {"audio", "text", "duration"};
  `image_caption_{split}.jsonl`: {"image", "caption"}; `text/{split}.txt`: a document a line.
  Paths are relative to DIR and point at the source's own files (nothing is copied); media a
  source holds only as bytes (hf) are written under DIR/audio/ and DIR/images/.
- Splits train/val/test: the splits the data set names are kept; a split it does not name is
  carved out of its training records by a hash of each record's id (`--val_fraction`,
  `--test_fraction`, 1 % each by default), so it is the same on every run and machine.
  A split without records gets no file.
- `summary.json`, also printed as a table: records, hours of audio, characters and words per
  manifest, and the skipped records with the first few reasons.

Every media file is checked before it is listed: missing, empty or unreadable files (soundfile's
header, PIL's check; with --full_check the suite's own readers decode each file, which also finds
silent clips and damaged pixels) are skipped and counted. Running again gives byte-identical
files: items come in a deterministic order and every file is written with `atomic_write`.
A source that is not in the expected layout stops with one line naming the expected file.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor

import soundfile as sf
from PIL import Image, UnidentifiedImageError

from omni.checkpoint import atomic_write
from omni.cli import run_cli
from omni.config import UserError
from omni.data import layouts
from omni.data.manifest import SampleError, media_file
from omni.logs import Progress
from omni.registry import STAGES

LAYOUTS = {"librispeech": layouts.librispeech, "ljspeech": layouts.ljspeech, "commonvoice": layouts.commonvoice,
           "coco": layouts.coco, "text": layouts.text, "hf": layouts.hf}
KIND_OPTIONS = {"text": ("text_field", "text_unit"), "hf": ("text_column", "audio_column", "image_column")}
SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16000         # what --full_check decodes to (the suite's MelSpec rate)
EXAMPLES = 5                # skipped records named in the summary
CHUNK = 256                 # items checked at a time by the thread pool


def manifest_name(output: str, split: str) -> str:
    return f"text/{split}.txt" if output == "text" else f"{output}_{split}.jsonl"


def hash_fraction(record_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id."""
    return int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def assign_split(item: layouts.Item, given: set, val_fraction: float, test_fraction: float) -> str:
    """The data set's own val/test split; else val or test when the data set names none and the
    id's hash falls in that split's band (val at the bottom, test at the top), else train."""
    if item.split in ("val", "test"):
        return item.split
    h = hash_fraction(item.id)
    if "val" not in given and h < val_fraction:
        return "val"
    if "test" not in given and h >= 1 - test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------- media checks
def audio_seconds(path: str, full: bool) -> float:
    if full:
        from omni.data.audio import read_audio  # optional: torchaudio, only when decoding
        return read_audio(path, SAMPLE_RATE).numel() / SAMPLE_RATE
    try:
        info = sf.info(media_file(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SampleError(f"{path}: unreadable audio ({getattr(e, 'error_string', e)})") from None
    if info.frames <= 0:
        raise SampleError(f"{path}: no audio samples")
    return info.frames / info.samplerate


def check_image(path: str, full: bool) -> None:
    if full:
        from omni.data.image import read_image  # optional: torch, only when decoding
        read_image(path, 8)     # decodes every pixel; the size hardly matters
        return
    try:
        with Image.open(media_file(path)) as im:
            im.verify()
    except UnidentifiedImageError:
        raise SampleError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleError(f"{path}: damaged image ({e})") from None


def check(item: layouts.Item, full: bool) -> tuple[float | None, str | None]:
    """(seconds of audio or None, why the item's media file cannot be used or None)."""
    try:
        if item.audio:
            return audio_seconds(item.audio, full), None
        check_image(item.image, full)
        return None, None
    except (SampleError, OSError) as e:
        return None, str(e)


def checked(items, workers: int, full: bool):
    """(item, seconds, problem) in the items' order; media files are checked by a thread pool
    (reading headers waits on the disk far more than on the CPU)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        while chunk := list(itertools.islice(items, CHUNK)):
            futures = [pool.submit(check, item, full) if (item.audio or item.image) and not item.problem else None
                       for item in chunk]
            for item, future in zip(chunk, futures):
                yield (item, *future.result()) if future else (item, None, item.problem)


# ----------------------------------------------------------------------------- writing
def write_together(paths: list[str], fill) -> None:
    """`fill(handles)` writes all of paths in one pass, each through atomic_write (a failure in
    fill leaves every old file as it was)."""
    def nest(i: int, handles: list):
        if i == len(paths):
            fill(handles)
        else:
            atomic_write(paths[i], lambda f: nest(i + 1, handles + [f]))
    nest(0, [])


def lines_of(output: str, split: str, item: layouts.Item, seconds, out: str) -> list[tuple[str, str]]:
    """(manifest line, its text) for one item. COCO-style items (several captions of one image) give a
    line per caption in train, and only the first caption in val/test, where retrieval metrics
    need every image once in a gallery."""
    texts = [t for t in item.texts if t]
    if output == "text":
        return [(t, t) for t in texts]
    if output == "image_caption":
        texts = texts if split == "train" else texts[:1]
        return [(json.dumps({"image": relpath(item.image, out), "caption": t}, ensure_ascii=False), t) for t in texts]
    record = {"audio": relpath(item.audio, out), "text": texts[0], "duration": round(seconds, 3)}
    return [(json.dumps(record, ensure_ascii=False), texts[0])]


def relpath(path: str, out: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out)).replace(os.sep, "/")


def prepare(kind: str, source: str, out: str, args) -> dict:
    """Write DIR's manifests and summary.json; return the summary."""
    if not (args.val_fraction >= 0 and args.test_fraction >= 0 and args.val_fraction + args.test_fraction < 1):
        raise UserError(f"--val_fraction {args.val_fraction} and --test_fraction {args.test_fraction}: "
                        "each must be >= 0 and together below 1")
    if not os.path.exists(source):
        raise UserError(f"{source}: not found (the {kind} data set's folder)")
    src = LAYOUTS[kind](source, out, args)
    keys = [(output, split) for output in src.outputs for split in SPLITS]
    stats = {key: {"records": 0, "seconds": 0.0, "characters": 0, "words": 0} for key in keys}
    skipped = {"count": 0, "examples": []}      # the first few reasons are named
    progress = Progress(src.total, f"prepare {kind}", unit=src.unit, enabled=not args.quiet)

    def fill(handles):
        files = dict(zip(keys, handles))
        for item, seconds, problem in checked(src.items, args.workers, args.full_check):
            progress.update((progress.n + 1 if item.progress is None else item.progress) - progress.n)
            if not item.texts and not problem:
                continue
            if not problem and not any(item.texts):
                problem = f"{item.audio or item.image or item.id}: empty text"
            if problem:
                skipped["count"] += 1
                skipped["examples"] += [problem][:EXAMPLES - len(skipped["examples"])]
                continue
            split = assign_split(item, src.given_splits, args.val_fraction, args.test_fraction)
            for output in src.outputs:
                tally = stats[(output, split)]
                for line, text in lines_of(output, split, item, seconds, out):
                    files[(output, split)].write(line.encode("utf-8") + b"\n")
                    tally["records"] += 1
                    tally["seconds"] += seconds or 0.0
                    tally["characters"] += len(text)
                    tally["words"] += len(text.split())
        progress.close()
        if not any(s["records"] for s in stats.values()):
            raise UserError(f"{source}: no usable {kind} record ({skipped['count']} skipped"
                            + (f", e.g. {skipped['examples'][0]})" if skipped["examples"] else ")"))

    write_together([os.path.join(out, manifest_name(*key)) for key in keys], fill)
    for key in keys:        # a split without records has no file (nor a stale one from an earlier run)
        if not stats[key]["records"]:
            os.unlink(os.path.join(out, manifest_name(*key)))
    summary = make_summary(kind, source, args, src, stats, skipped)
    atomic_write(os.path.join(out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))
    return summary


def make_summary(kind: str, source: str, args, src, stats: dict, skipped: dict) -> dict:
    given = [s for s in SPLITS if s in src.given_splits]
    carved = [f"{s} ({getattr(args, s + '_fraction'):g} of train by id hash)" for s in ("val", "test")
              if s not in src.given_splits and getattr(args, s + "_fraction") > 0]
    manifests = {}
    for (output, split), s in stats.items():
        if s["records"]:
            entry = {"split": split, "records": s["records"]}
            if output in ("asr", "tts"):
                entry["hours"] = round(s["seconds"] / 3600, 4)
            manifests[manifest_name(output, split)] = {**entry, "characters": s["characters"], "words": s["words"]}
    options = ["val_fraction", "test_fraction", "full_check", *KIND_OPTIONS.get(kind, ())]
    return {"kind": kind, "source": os.path.abspath(source),
            "options": {name: getattr(args, name) for name in options},
            "splits": {"given": given, "carved": carved},
            "manifests": manifests,
            "skipped": skipped}


# ----------------------------------------------------------------------------- report
TRAINERS = {"text": "A", "asr": "B", "image_caption": "C", "tts": "D"}     # output -> the stage that trains on it


def next_command(output: str, out: str, manifests: dict) -> str:
    """The trainer command that uses what was written (the stage's default config with --set)."""
    def path(split):
        return os.path.join(out, manifest_name(output, split))
    have = {split for split in SPLITS if manifest_name(output, split) in manifests}
    spec = STAGES[TRAINERS[output]]
    if output == "text":
        sets = [f"train_files={json.dumps([path('train')])}", f"val_file={path('val') if 'val' in have else ''}"]
    else:       # a {split}_manifest key for training and each split its validation scores
        sets = [f"{split}_manifest={path(split) if split in have else ''}" for split in ("train", *spec.splits)]
    sets = ["demo_dir="] + sets
    return f"{spec.command} " + " ".join(f"--set {shlex.quote(s)}" for s in sets)


def report(summary: dict, out: str) -> str:
    rows = [("manifest", "records", "hours", "characters", "words")]
    for name, s in summary["manifests"].items():
        hours = f"{s['hours']:.2f}" if "hours" in s else "-"
        rows.append((name, f"{s['records']:,}", hours, f"{s['characters']:,}", f"{s['words']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [(f"prepared {summary['kind']} from {summary['source']} into {out}  "
              f"(splits given: {', '.join(summary['splits']['given']) or 'none'}; "
              f"carved: {', '.join(summary['splits']['carved']) or 'none'})")]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    skipped = summary["skipped"]
    lines.append(f"skipped {skipped['count']} record(s)" + (": e.g. " + "; ".join(skipped["examples"][:3])
                                                             if skipped["count"] else ""))
    lines.append(f"summary: {os.path.join(out, 'summary.json')}")
    outputs = dict.fromkeys(name.split("/")[0] if "/" in name else name.rsplit("_", 1)[0]
                            for name in summary["manifests"])
    lines += [f"next: {next_command(output, out, summary['manifests'])}" for output in outputs]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m omni.data.prepare",
                                description="Write the suite's manifests from a data set in its own layout.")
    p.add_argument("kind", choices=list(LAYOUTS))
    p.add_argument("source", help="the data set's folder (as downloaded and extracted)")
    p.add_argument("--out", required=True, help="folder for the manifests and summary.json")
    p.add_argument("--val_fraction", type=float, default=0.01, help="of train, when the data set has no val split")
    p.add_argument("--test_fraction", type=float, default=0.01, help="of train, when the data set has no test split")
    p.add_argument("--text_unit", choices=["paragraph", "line"], default="paragraph",
                   help="text: a document of a .txt file is a paragraph (lines up to a blank line) or a line")
    p.add_argument("--text_field", default="text", help="text: the field of .jsonl records that holds the text")
    p.add_argument("--text_column", default="text", help="hf: the column with transcripts, captions or text")
    p.add_argument("--audio_column", default="", help="hf: the audio column (writes ASR manifests)")
    p.add_argument("--image_column", default="", help="hf: the image column (writes image-caption manifests)")
    p.add_argument("--full_check", action="store_true",
                   help="decode every media file with the suite's readers (slow; finds silent clips, bad pixels)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads checking media files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = prepare(args.kind, args.source, args.out, args)
    print(report(summary, args.out), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
