"""Manifests: lists of samples in JSONL, CSV or TSV, with paths relative to the manifest.

`read_manifest` turns every line into a dict of the canonical field names a dataset asks for;
`columns` maps a canonical name to the column a user's file has (e.g. {"text": "transcript"}),
so LibriSpeech- or COCO-style lists work after conversion to one of these formats.
`ManifestDataset` loads samples by key (index, epoch); a sample that cannot be read is skipped
(returned as None and counted by the training loop) or, with strict=True, stops the run with an
error naming the manifest line and the file.
"""
from __future__ import annotations

import csv
import json
import os
import sys

from torch.utils.data import Dataset

from omni.data.common import DataError
from omni.data.sampler import sample_generator


class SampleError(Exception):
    """One sample is unusable (bad file, empty text, ...)."""


def read_manifest(path: str, fields: list[str], columns: dict[str, str] | None = None,
                  path_fields: tuple[str, ...] = ("audio", "image"), optional: tuple[str, ...] = ()) -> list[dict]:
    """Records with the canonical `fields` (plus `optional` ones when present), in file order.

    Every record also has "_source" ("manifest line N") for error messages. Paths in
    `path_fields` are made relative to the manifest's folder.
    """
    if not os.path.isfile(path):
        raise DataError(f"manifest not found: {path}")
    columns = columns or {}
    folder = os.path.dirname(os.path.abspath(path))
    records = []
    for line_no, raw in _rows(path):
        record = {"_source": f"{path} line {line_no}"}
        for name in fields + list(optional):
            column = columns.get(name, name)
            if column not in raw or raw[column] in (None, ""):
                if name in optional:
                    continue
                raise DataError(f"{path} line {line_no}: missing field '{column}'")
            value = raw[column]
            if name in path_fields:
                value = os.path.join(folder, str(value))
            record[name] = value
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _rows(path: str):
    """(line number, dict) for every record of a .jsonl/.json, .csv or .tsv file."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            for row in reader:
                if None in row:
                    raise DataError(f"{path} line {reader.line_num}: more values than header columns")
                yield reader.line_num, row
            return
        for line_no, line in enumerate(f, 1):
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
    """

    def __init__(self, records: list[dict], seed: int = 0, strict: bool = False, augment: bool = False):
        self.records, self.seed, self.strict, self.augment = records, seed, strict, augment

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: dict, generator):
        raise NotImplementedError

    def __getitem__(self, key):
        index, epoch = key
        record = self.records[index]
        try:
            return self.load(record, sample_generator(self.seed, epoch, index) if self.augment else None)
        except (SampleError, OSError, RuntimeError, ValueError) as e:
            message = f"{record['_source']}: {e}"
            if self.strict:
                raise DataError(message) from None
            if epoch == 0:              # say it once, not every epoch
                print(f"warning: skipping bad sample: {message}", file=sys.stderr, flush=True)
            return None
