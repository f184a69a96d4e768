"""Readers of the standard data-set layouts for `python -m omni.data.prepare` (see prepare.py).

Each reader takes the data set's folder and returns a `Source`: which manifests it feeds, the
splits the data set itself names, and an iterator of `Item`s (one utterance, image or document)
in a deterministic order. Readers only read the layout; checking media files, assigning splits
and writing manifests is prepare.py's job. A layout that is not there raises a UserError naming
the file or folder that was expected.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from omni.checkpoint import atomic_write
from omni.config import UserError

SPLIT_NAME = re.compile(r"^(train|dev|validation|valid|val|test)(?![a-z])", re.IGNORECASE)
MEGABYTE = 1_000_000
SPLIT_OF_NAME = {"train": "train", "dev": "val", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def split_of(name: str) -> str | None:
    """The split a file or folder name gives ('train-clean-100', 'dev.tsv', 'val2017',
    'validation' ...), None when it names none."""
    m = SPLIT_NAME.match(name)
    return SPLIT_OF_NAME[m.group(1).lower()] if m else None


@dataclass
class Item:
    id: str                     # stable id: the hash split and the order come from it
    texts: tuple[str, ...]      # a transcript or a document; every caption of a COCO image; () without
                                # a problem: a marker that only advances the progress count
    split: str | None           # the split the data set gives it, None if it gives none
    audio: str | None = None    # media file (absolute path) to check and point at
    image: str | None = None
    problem: str | None = None  # why it cannot be used, when known from the listing alone
    progress: int | None = None  # progress count once this item is done (None: one more)


@dataclass
class Source:
    outputs: tuple[str, ...]    # manifests it feeds: "asr", "tts", "image_caption", "text"
    given_splits: set           # splits the data set names; the others are carved out of train
    total: int                  # progress units
    unit: str
    items: Iterator[Item]


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"{path}: not found; expected {what}")
    return path


def read_utf8_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# ----------------------------------------------------------------------------- LibriSpeech
LIBRISPEECH = "LibriSpeech subset folders such as train-clean-100/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt"


def librispeech(source: str, out: str, args) -> Source:
    """SOURCE is LibriSpeech/ (its subset folders), one subset folder, or the folder holding LibriSpeech/."""
    if os.path.isdir(os.path.join(source, "LibriSpeech")):
        source = os.path.join(source, "LibriSpeech")
    if split_of(os.path.basename(os.path.normpath(source))):
        subsets = [source]
    else:
        subsets = [os.path.join(source, d) for d in sorted(os.listdir(source))
                   if split_of(d) and os.path.isdir(os.path.join(source, d))]
    items = [item for subset in subsets for item in librispeech_subset(subset)]
    if not items:
        raise UserError(f"{source}: no *.trans.txt found; expected {LIBRISPEECH}")
    return Source(("asr",), {item.split for item in items}, len(items), "clip", iter(items))


def librispeech_subset(folder: str) -> list[Item]:
    split, items = split_of(os.path.basename(os.path.normpath(folder))), []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".trans.txt")):
            path = os.path.join(root, name)
            for line_no, line in enumerate(read_utf8_lines(path), 1):
                utt, _, text = line.strip().partition(" ")
                if not utt:
                    continue
                problem = None if text.strip() else f"{path} line {line_no}: expected 'SPEAKER-CHAPTER-UTT TRANSCRIPT'"
                items.append(Item(utt, (text.strip(),), split, audio=os.path.join(root, utt + ".flac"),
                                  problem=problem))
    return items


# ----------------------------------------------------------------------------- LJSpeech
def ljspeech(source: str, out: str, args) -> Source:
    """metadata.csv lines `ID|raw text|normalized text`, clips wavs/ID.wav; one voice: TTS and ASR."""
    path = require(os.path.join(source, "metadata.csv"), "LJSpeech's metadata.csv (ID|raw text|normalized text) "
                                                          "beside wavs/")
    require(os.path.join(source, "wavs"), "LJSpeech's wavs/ folder beside metadata.csv")
    items = []
    for line_no, line in enumerate(read_utf8_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("|")   # not csv: transcripts hold unbalanced quotes
        utt = fields[0].strip()
        # The normalized column spells numbers and abbreviations out, as speech says them.
        text = (fields[2] if len(fields) > 2 and fields[2].strip() else fields[1] if len(fields) > 1 else "").strip()
        problem = None if utt and text else f"{path} line {line_no}: expected 'ID|raw text|normalized text'"
        items.append(Item(utt, (text,), None, audio=os.path.join(source, "wavs", utt + ".wav"), problem=problem))
    return Source(("tts", "asr"), set(), len(items), "clip", iter(items))


# ----------------------------------------------------------------------------- Common Voice
def commonvoice(source: str, out: str, args) -> Source:
    """train.tsv, dev.tsv and test.tsv (else validated.tsv) with `path` and `sentence`, clips in clips/."""
    tables = [name for name in ("train.tsv", "dev.tsv", "test.tsv") if os.path.isfile(os.path.join(source, name))]
    if not tables and os.path.isfile(os.path.join(source, "validated.tsv")):
        tables = ["validated.tsv"]
    if not tables:
        raise UserError(f"{os.path.join(source, 'train.tsv')}: not found; expected Common Voice's train.tsv, "
                        "dev.tsv, test.tsv or validated.tsv beside clips/")
    require(os.path.join(source, "clips"), "Common Voice's clips/ folder beside the .tsv files")
    items = [item for name in tables for item in commonvoice_table(os.path.join(source, name))]
    return Source(("asr",), {split_of(name) for name in tables} - {None}, len(items), "clip", iter(items))


def commonvoice_table(path: str) -> list[Item]:
    split, clips = split_of(os.path.basename(path)), os.path.join(os.path.dirname(path), "clips")
    lines = read_utf8_lines(path)
    # QUOTE_NONE: sentences hold quotes that are text, not CSV quoting.
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    for column in ("path", "sentence"):
        if column not in (reader.fieldnames or []):
            raise UserError(f"{path} line 1: the header has no column '{column}' "
                            f"(columns: {', '.join(reader.fieldnames or [])})")
    items = []
    for line_no, row in enumerate(reader, 2):
        clip, text = (row.get("path") or "").strip(), (row.get("sentence") or "").strip()
        problem = None if clip else f"{path} line {line_no}: empty 'path'"
        items.append(Item(clip or f"line {line_no}", (text,), split, audio=os.path.join(clips, clip), problem=problem))
    return items


# ----------------------------------------------------------------------------- COCO captions
def coco(source: str, out: str, args) -> Source:
    """annotations/captions_{NAME}.json ({images: [{id, file_name}], annotations: [{image_id, caption}]})
    with the images in NAME/ (train2017/, val2017/ ...). One item per image, with all its captions."""
    folder = require(os.path.join(source, "annotations"), "COCO's annotations/captions_train2017.json")
    names = sorted(f[len("captions_"):-len(".json")] for f in os.listdir(folder)
                   if f.startswith("captions_") and f.endswith(".json"))
    if not names:
        raise UserError(f"{os.path.join(folder, 'captions_train2017.json')}: not found; expected COCO caption "
                        "files annotations/captions_*.json")
    items = [item for name in names for item in coco_annotations(source, name)]
    return Source(("image_caption",), {split_of(name) for name in names} - {None}, len(items), "image", iter(items))


def coco_annotations(source: str, name: str) -> list[Item]:
    path = os.path.join(source, "annotations", f"captions_{name}.json")
    images_dir = require(os.path.join(source, name), f"the image folder of {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions: dict = {}
        for note in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            captions.setdefault(note["image_id"], []).append(" ".join(str(note["caption"]).split()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: expected 'images' [{{id, file_name}}] and 'annotations' [{{image_id, caption}}] "
                        f"(missing {e})") from None
    items = [Item(f"{name}/{image_id}", tuple(c for c in captions[image_id] if c) or ("",), split_of(name),
                  image=os.path.join(images_dir, files[image_id]))
             for image_id in sorted(files) if image_id in captions]
    unknown = sorted(set(captions) - set(files))
    items += [Item(f"{name}/{i}", (), None, problem=f"{path}: captions of image_id {i}, which 'images' lacks")
              for i in unknown]
    return items


# ----------------------------------------------------------------------------- text
def text(source: str, out: str, args) -> Source:
    """.txt files (documents: paragraphs, or lines with --text_unit line) and .jsonl files (a
    document per record, in --text_field), found anywhere under SOURCE (or SOURCE itself)."""
    if os.path.isfile(source):
        files = [source]
    else:
        files = [p for p in walk_files(source, out) if p.endswith((".txt", ".jsonl"))]
    if not files:
        raise UserError(f"{source}: no .txt or .jsonl files found")
    given = {s for s in (text_split(p, source) for p in files) if s}
    size = sum(os.path.getsize(p) for p in files)
    return Source(("text",), given, -(-size // MEGABYTE), "MB", text_items(files, source, size, args))


def walk_files(source: str, out: str) -> list[str]:
    """Files under source in sorted order, leaving out the output folder (which may sit inside)."""
    out, found = os.path.abspath(out), []
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != out)
        found += [os.path.join(root, n) for n in sorted(names)]
    return found


def relative(path: str, source: str) -> str:
    return os.path.relpath(path, source) if os.path.isdir(source) else os.path.basename(path)


def text_split(path: str, source: str) -> str | None:
    """The split named by the file (train.txt) or a folder under SOURCE (val/part1.txt)."""
    for part in reversed(os.path.splitext(relative(path, source))[0].split(os.sep)):
        if split_of(part):
            return split_of(part)
    return None


def text_items(files: list[str], source: str, size: int, args) -> Iterator[Item]:
    """Documents of the files; progress counts megabytes read (a single file can be huge)."""
    done = 0
    for path in files:
        # ids relative to SOURCE: the split of a document must not change when the folder moves
        split, rel = text_split(path, source), relative(path, source)
        try:
            with open(path, encoding="utf-8-sig") as f:
                docs = jsonl_documents(f, path, args.text_field) if path.endswith(".jsonl") else \
                    text_documents(f, path, args.text_unit)
                for n, (doc, problem) in enumerate(docs):
                    yield Item(f"{rel}#{n}", (doc,), split, problem=problem,
                               progress=(done + f.buffer.tell()) // MEGABYTE)
        except UnicodeDecodeError as e:
            yield Item(path, (), split, problem=f"{path}: not UTF-8 text ({e.reason}); the rest of the file skipped")
        done += os.path.getsize(path)
        yield Item(path, (), split, progress=-(-size // MEGABYTE) if done >= size else done // MEGABYTE)


def text_documents(f, path: str, unit: str):
    paragraph = []
    for line in f:
        words = line.split()
        if unit == "line":
            if words:
                yield " ".join(words), None
        elif words:
            paragraph += words
        elif paragraph:
            yield " ".join(paragraph), None
            paragraph = []
    if paragraph:
        yield " ".join(paragraph), None


def jsonl_documents(f, path: str, field: str):
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield "", f"{path} line {line_no}: invalid JSON: {e.msg}"
            continue
        if not isinstance(record, dict) or field not in record:
            yield "", f"{path} line {line_no}: no field '{field}' (set --text_field)"
            continue
        yield " ".join(str(record[field] or "").split()), None


# ----------------------------------------------------------------------------- Hugging Face datasets
HF_LAYOUT = "a datasets save_to_disk folder (dataset_dict.json or state.json beside data-*.arrow) or *.parquet files"
AUDIO_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
               (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))
IMAGE_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"RIFF", ".webp"))
ROWS_PER_READ = 64       # rows decoded at a time: a batch of a datasets file can hold a thousand clips


def hf(source: str, out: str, args) -> Source:
    """Rows of a Hugging Face dataset: text from --text_column, with --audio_column (ASR) or
    --image_column (image captions), or alone (a text corpus). Media stored as bytes are written
    to files under OUT; media stored as paths are pointed at."""
    try:
        import pyarrow  # optional dependency  # noqa: F401
    except ImportError:
        raise UserError("prepare hf needs the pyarrow package: pip install -e '.[data]'") from None
    if args.audio_column and args.image_column:
        raise UserError("prepare hf: give --audio_column or --image_column, not both (one manifest kind a run)")
    media = args.audio_column or args.image_column
    columns = [args.text_column] + ([media] if media else [])
    tables = hf_tables(source, out)
    for _, path in tables:
        names = hf_schema(path).names
        for column in columns:
            if column not in names:
                flag = "--text_column" if column == args.text_column else \
                    "--audio_column" if column == args.audio_column else "--image_column"
                raise UserError(f"{path}: no column '{column}' ({flag}; columns: {', '.join(names)})")
    outputs = ("asr",) if args.audio_column else ("image_caption",) if args.image_column else ("text",)
    total = sum(hf_rows(path) for _, path in tables)
    return Source(outputs, {split_of(label) for label, _ in tables if label} - {None}, total, "row",
                  hf_items(tables, source, out, args, columns))


def hf_tables(source: str, out: str) -> list[tuple[str | None, str]]:
    """(split label, data file) in order: the split folders of a saved DatasetDict, one saved
    Dataset, or parquet files (split from the file or folder name, 'train-00000-of-00002.parquet')."""
    if os.path.isfile(os.path.join(source, "dataset_dict.json")):
        splits = hf_json(os.path.join(source, "dataset_dict.json")).get("splits") or []
        return [(split, path) for split in splits for path in arrow_files(os.path.join(source, split))]
    if os.path.isfile(os.path.join(source, "state.json")):
        return [(hf_json(os.path.join(source, "state.json")).get("_split"), path) for path in arrow_files(source)]
    files = [p for p in walk_files(source, out) if p.endswith(".parquet")]
    if not files:
        raise UserError(f"{os.path.join(source, 'dataset_dict.json')}: not found; expected {HF_LAYOUT}")
    return [(text_split(p, source), p) for p in files]


def hf_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def arrow_files(folder: str) -> list[str]:
    state = os.path.join(folder, "state.json")
    require(state, f"a split folder of a datasets save_to_disk folder ({HF_LAYOUT})")
    names = [entry["filename"] for entry in hf_json(state).get("_data_files", []) if "filename" in entry]
    names = names or sorted(n for n in os.listdir(folder) if n.startswith("data-") and n.endswith(".arrow"))
    if not names:
        raise UserError(f"{os.path.join(folder, 'data-00000-of-00001.arrow')}: not found; expected {HF_LAYOUT}")
    return [require(os.path.join(folder, n), f"the data file that {state} lists") for n in names]


def hf_batches(path: str, columns: list[str] | None = None):
    """Record batches of an Arrow stream/file (save_to_disk writes streams) or a parquet file."""
    import pyarrow as pa  # optional dependency
    import pyarrow.parquet as pq
    try:
        if path.endswith(".parquet"):
            yield from pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_READ, columns=columns)
            return
        with pa.memory_map(path) as mapped:
            try:
                reader = pa.ipc.open_stream(mapped)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(mapped)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield batch.select(columns) if columns else batch
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read as Arrow/parquet data ({e})") from None


def hf_schema(path: str):
    if path.endswith(".parquet"):
        import pyarrow as pa  # optional dependency
        import pyarrow.parquet as pq
        try:
            return pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: cannot read as parquet ({e})") from None
    for batch in hf_batches(path):
        return batch.schema
    raise UserError(f"{path}: no record batches")


def hf_rows(path: str) -> int:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional dependency
        return pq.ParquetFile(path).metadata.num_rows
    return sum(batch.num_rows for batch in hf_batches(path))    # memory-mapped: no copy


def hf_items(tables, source: str, out: str, args, columns: list[str]) -> Iterator[Item]:
    n = 0       # rows so far: media written from bytes are named by it
    for label, path in tables:
        split, rel = split_of(label) if label else None, os.path.relpath(path, source)
        row = 0
        for batch in hf_batches(path, columns):
            for start in range(0, batch.num_rows, ROWS_PER_READ):
                part = batch.slice(start, ROWS_PER_READ)
                values = [part.column(i).to_pylist() for i in range(len(columns))]
                for texts, *media in zip(*values):
                    where = f"{path} row {row}"
                    item = Item(f"{rel} row {row}", hf_texts(texts), split)
                    if media:
                        name = f"{n:08d}"
                        try:
                            if args.audio_column:
                                item.audio = hf_media(media[0], args.audio_column, os.path.join(out, "audio", name),
                                                      AUDIO_MAGIC, where, os.path.dirname(path))
                            else:
                                item.image = hf_media(media[0], args.image_column, os.path.join(out, "images", name),
                                                      IMAGE_MAGIC, where, os.path.dirname(path))
                        except ValueError as e:
                            item.problem = str(e)
                    yield item
                    row, n = row + 1, n + 1


def hf_texts(value) -> tuple[str, ...]:
    """A text cell: one string, or a list of them (several captions of one image)."""
    values = value if isinstance(value, list) else [value]
    return tuple(" ".join(str(v).split()) for v in values if v is not None) or ("",)


def hf_media(value, column: str, stem: str, magic, where: str, folder: str) -> str:
    """The file of a media cell: its bytes written to stem + extension (left alone when the same
    bytes are there already), or the file its path names. ValueError saying why there is none."""
    if value is None:
        raise ValueError(f"{where}: empty '{column}'")
    if isinstance(value, str):
        value = {"bytes": None, "path": value}
    if not isinstance(value, dict) or not {"bytes", "path"} & set(value):
        raise UserError(f"{where}: column '{column}' holds {type(value).__name__}; expected a struct with "
                        "'bytes'/'path' (datasets' Audio/Image) or a file path")
    data, path = value.get("bytes"), value.get("path")
    if data:
        ext = next((e for m, e in magic if data.startswith(m)), os.path.splitext(path or "")[1].lower() or ".bin")
        dest = stem + ext
        if not (os.path.isfile(dest) and os.path.getsize(dest) == len(data) and open_bytes(dest) == data):
            atomic_write(dest, lambda f: f.write(data))
        return dest
    if path:
        return path if os.path.isabs(path) else os.path.join(folder, path)
    raise ValueError(f"{where}: empty '{column}' (no bytes, no path)")


def open_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
