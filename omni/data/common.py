"""What every dataset shares: the data error type and the check that data files exist
(building the demo world first when a default config points into it)."""
from __future__ import annotations

import os

from omni.config import UserError


class DataError(UserError):
    """A data file or sample that cannot be used (names the file, and the line where known)."""


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def require_files(cfg, files_by_key: dict[str, list[str]], rt=None) -> None:
    """Fail with one line naming the config key and path of a missing data file.

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

