"""What every dataset shares: the data error type and the check that data files exist and are
regular files (building the demo world first when a default config points into it)."""
from __future__ import annotations

import os
import stat

from omni.config import UserError


class DataError(UserError):
    """A data file or sample that cannot be used (names the file, and the line where known)."""


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def require_regular(path: str, what: str) -> None:
    """DataError "<what>: <path> is not a regular file (a pipe?): ..." when path exists and is not a
    regular file (a missing one the caller reports in its own words).

    Corpora and manifests are read more than once (sizes for the tokenizer sample, signatures of
    token shards, a second pass to tokenize), so a pipe such as bash's `<(zcat corpus.gz)` would block
    forever or give nothing the second time: it is refused, not read."""
    if not os.path.exists(path):
        return
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kind = "a folder" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise DataError(f"{what}: {path} is not a regular file ({kind}?): write it to a file first")


def require_files(cfg, files_by_key: dict[str, list[str]], rt=None) -> None:
    """Fail with one line naming the config key and path of a data file that is missing or is not a
    regular file (a pipe, a folder; see `require_regular`).

    Missing files inside cfg.demo_dir are made by building the demo world (on rank 0; the other
    ranks wait), so a default config works on a fresh clone.
    """
    missing = [(key, p) for key, paths in files_by_key.items() for p in paths if not os.path.exists(p)]
    if missing and cfg.demo_dir and all(_inside(p, cfg.demo_dir) for _, p in missing):
        if rt is None or rt.is_main:
            from omni.data.demo import ensure_demo_world  # optional: only a missing demo file needs the builder
            print(f"building the demo world in {cfg.demo_dir} (size {cfg.demo_size}) ...", flush=True)
            ensure_demo_world(cfg.demo_dir, cfg.demo_size)
        if rt is not None:
            rt.barrier()
        missing = [(key, p) for key, p in missing if not os.path.exists(p)]
    if missing:
        key, path = missing[0]
        raise DataError(f"config key '{key}': data file not found: {path}")
    for key, paths in files_by_key.items():
        for path in paths:
            require_regular(path, f"config key '{key}'")

