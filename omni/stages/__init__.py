"""The stage classes, imported by letter when a caller needs the stage itself (their identity, such as
prefix, script and weight keys, is in omni/registry.py and needs no import)."""
from __future__ import annotations

import importlib

from omni.registry import STAGES


def stage_class(letter: str):
    spec = STAGES[letter]
    return getattr(importlib.import_module(spec.module), spec.cls)
