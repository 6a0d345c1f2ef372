"""Suite builders. Each module exposes ``build(cfg, cache, progress=True) -> Suite``."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from ..cache import Cache, stable_hash
from ..suite import Suite

BUILDERS = {"offline": "pipeline.suites.offline", "paper8": "pipeline.suites.paper8"}


def build_suite(cfg, cache: Cache, progress: bool = True) -> Suite:
    """Build (or load from cache) the suite named by ``cfg.name``."""
    name = cfg.name
    if name not in BUILDERS:
        raise ValueError(f"unknown suite {name!r}; choose one of {sorted(BUILDERS)} (suite=...)")
    return importlib.import_module(BUILDERS[name]).build(cfg, cache, progress=progress)


@dataclasses.dataclass
class CappedSuite(Suite):
    """A built suite whose every task split is a fixed seeded subset of at most
    ``max_per_split`` images (``max_images_per_split``, preset=fast)."""

    max_per_split: int = 0

    def split(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = super().split(task, split)
        if len(labels) <= self.max_per_split:
            return images, labels
        keep = np.random.default_rng(0).permutation(len(labels))[: self.max_per_split]
        keep.sort()  # the same subset on every call, in the split's order
        return np.ascontiguousarray(images[keep]), labels[keep]


def capped(suite: Suite, n: int | None) -> Suite:
    """``suite`` with every task split cut to at most ``n`` images, under its own key (so no
    cache unit of the whole suite is reused for it); ``None``: the suite itself. Defined here,
    not in ``pipeline.suite``, whose source is part of every suite unit's code version."""
    if n is None:
        return suite
    fields = {f.name: getattr(suite, f.name) for f in dataclasses.fields(Suite)}
    fields["key"] = stable_hash({"suite": suite.key, "max_per_split": int(n)})
    return CappedSuite(**fields, max_per_split=int(n))
