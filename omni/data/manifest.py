"""Manifests: lists of samples in JSONL, CSV or TSV, with paths relative to the manifest.

`read_manifest` turns every line into a dict of the canonical field names a dataset asks for;
`columns` maps a canonical name to the column a user's file has (e.g. {"text": "transcript"}),
so LibriSpeech- or COCO-style lists work after conversion to one of these formats. A manifest
that cannot be read as a whole (missing, not a regular file, not UTF-8, a line that is not JSON, a
record or a CSV header without a required field, a field of the wrong JSON type) stops the run at
startup with one line naming the file, the line and the field: it is cheap to fix and would
otherwise skip every line it breaks.

`ManifestDataset` loads samples by key (index, epoch). A sample that cannot be used (missing,
empty, undecodable or silent file, empty text) is skipped: a warning names it the first time this
process meets it, `dataset[key]` returns None, and a DataLoader's batched fetch returns a
`SkippedSample` saying why, which the training loop drops, counts and sums up. With strict=True
it stops the run instead, with an error naming the manifest line and the file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass

from torch.utils.data import Dataset

from omni.data.common import DataError, require_regular
from omni.data.sampler import sample_generator

NAMED_BAD_SAMPLES = 20      # warnings per dataset and process; past that, bad samples are only counted
JSON_TYPES = {str: "a string", list: "a list", dict: "an object", bool: "true or false", int: "a number",
              float: "a number"}


class SampleError(Exception):
    """One sample is unusable (bad file, empty text, ...)."""


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample that could not be loaded, inside a fetched batch."""
    message: str            # "<manifest> line N: <file>: <why>"


def media_file(path: str) -> str:
    """`path` if it names a non-empty file; SampleError saying what is wrong with it otherwise."""
    if not os.path.exists(path):
        raise SampleError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise SampleError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise SampleError(f"{path}: empty file (0 bytes)")
    return path


def read_manifest(path: str, fields: list[str], columns: dict[str, str] | None = None,
                  path_fields: tuple[str, ...] = ("audio", "image"), optional: tuple[str, ...] = (),
                  types: dict[str, type] | None = None) -> list[dict]:
    """Records with the canonical `fields` (plus `optional` ones when present), in file order.

    Every record also has "_source" ("manifest line N") for error messages. Paths in
    `path_fields` are made relative to the manifest's folder. Every field is a string (a JSON
    manifest may hold any JSON value) unless `types` names another type for it, e.g.
    {"conversation": list}.
    """
    require_regular(path, "manifest")
    if not os.path.isfile(path):
        raise DataError(f"manifest not found: {path}")
    columns = columns or {}
    folder = os.path.dirname(os.path.abspath(path))
    header, rows = _table(path)
    missing = [columns.get(name, name) for name in fields if header and columns.get(name, name) not in header]
    if missing:     # every line would lack it: say so once, about the header
        raise DataError(f"{path} line 1: the header has no column '{missing[0]}' (columns: {', '.join(header)})")
    records = []
    for line_no, raw in rows:
        record = {"_source": f"{path} line {line_no}"}
        for name in fields + list(optional):
            column = columns.get(name, name)
            if column not in raw or raw[column] is None:
                if name in optional:
                    continue
                raise DataError(f"{path} line {line_no}: missing field '{column}'")
            value = raw[column]
            if value == "":
                if name in optional:
                    continue
                raise DataError(f"{path} line {line_no}: empty field '{column}'")
            expected = (types or {}).get(name, str)
            if not isinstance(value, expected):
                raise DataError(f"{path} line {line_no}: field '{column}' must be {JSON_TYPES[expected]}, "
                                f"not {JSON_TYPES.get(type(value), type(value).__name__)}")
            if name in path_fields:
                value = os.path.join(folder, str(value))
            record[name] = value
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _table(path: str):
    """(header columns or None for JSONL, iterator of (line number, dict)) of a manifest file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")     # -sig: spreadsheets put a BOM before the first column name
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if os.path.splitext(path)[1].lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.lower().endswith(".tsv") else ",")
        return list(reader.fieldnames or []), _csv_rows(path, reader)
    return None, _json_rows(path, text)


def _csv_rows(path: str, reader: csv.DictReader):
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path} line {reader.line_num}: more values than header columns")
            yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}") from None


def _json_rows(path: str, text: str):
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {line_no}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {line_no}: expected a JSON object")
        yield line_no, row


class ManifestDataset(Dataset):
    """Samples from manifest records; subclasses implement `load(record, generator)`.

    The generator is seeded from (seed, epoch, index): augmentation is the same whichever worker
    loads the sample, and a resumed run sees exactly what an uninterrupted one would.
    `bad_records` holds the indices this process found unusable (validation runs in the main
    process, so for the validation set it is the set of bad samples met so far).
    """

    def __init__(self, records: list[dict], seed: int = 0, strict: bool = False, augment: bool = False):
        self.records, self.seed, self.strict, self.augment = records, seed, strict, augment
        self.bad_records: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: dict, generator):
        raise NotImplementedError

    def __getitem__(self, key):
        sample = self.fetch(key)
        return None if isinstance(sample, SkippedSample) else sample

    def __getitems__(self, keys):
        # The DataLoader's batched fetch: the reasons travel with the batch to the training loop
        # (from worker processes too), which counts them and names a few at the end of the run.
        return [self.fetch(key) for key in keys]

    def fetch(self, key):
        """The sample, or a SkippedSample (DataError under strict)."""
        index, epoch = key
        record = self.records[index]
        try:
            return self.load(record, sample_generator(self.seed, epoch, index) if self.augment else None)
        except (SampleError, OSError, RuntimeError, ValueError) as e:
            message = f"{record['_source']}: {e}"
            if self.strict:
                raise DataError(message) from None
            self.note_bad(index, message)
            return SkippedSample(message)

    def note_bad(self, index: int, message: str) -> None:
        """Name a bad sample once (per process), not at every epoch or validation."""
        if index in self.bad_records:
            return
        self.bad_records.add(index)
        if len(self.bad_records) <= NAMED_BAD_SAMPLES:
            print(f"warning: skipping bad sample: {message}", file=sys.stderr, flush=True)
        if len(self.bad_records) == NAMED_BAD_SAMPLES:
            print(f"warning: {NAMED_BAD_SAMPLES} bad samples named; further ones are counted, not named",
                  file=sys.stderr, flush=True)

