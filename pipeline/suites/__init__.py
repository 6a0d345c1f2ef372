"""Suite builders. Each module exposes ``build(cfg, cache, progress=True) -> Suite``."""

from __future__ import annotations

import importlib

from ..cache import Cache
from ..suite import Suite

BUILDERS = {"offline": "pipeline.suites.offline", "paper8": "pipeline.suites.paper8"}


def build_suite(cfg, cache: Cache, progress: bool = True) -> Suite:
    """Build (or load from cache) the suite named by ``cfg.name``."""
    name = cfg.name
    if name not in BUILDERS:
        raise ValueError(f"unknown suite {name!r}; choose one of {sorted(BUILDERS)} (suite=...)")
    return importlib.import_module(BUILDERS[name]).build(cfg, cache, progress=progress)
