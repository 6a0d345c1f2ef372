"""Code versions for cache keys: a hash of the source of the modules a stage runs.

Every cache unit's key material includes ``code_version(*modules)`` of the modules whose code
computes it, so editing one of them recomputes exactly the units that code produces (and
what is computed from them, whose keys include the code too) and nothing else. A stage lists
its modules explicitly (``STAGE_CODE`` below and the method classes' ``code``); a suite
builder calls :func:`code_version` for each of its units.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType


@functools.cache
def _module_files(name: str) -> tuple[Path, ...]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"code_version: no module named {name!r}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every .py file under it
        return tuple(sorted(origin.parent.rglob("*.py")))
    return (origin,)


@functools.cache
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_version(*modules: str | ModuleType) -> str:
    """16 hex digits: the sha256 of the source files of ``modules`` (dotted names or module
    objects; a package counts all ``.py`` files under it). Read once per process."""
    h = hashlib.sha256()
    for name in sorted({m.__name__ if isinstance(m, ModuleType) else str(m) for m in modules}):
        for path in _module_files(name):
            h.update(f"{name}:{path.name}:{_file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


# The modules each pipeline stage runs (the offline and paper8 suites list their own).
FEATURES = ("pipeline.features", "pipeline.stages", "pipeline.suite")
MERGES = {
    "task_arithmetic": ("merging.task_arithmetic", "merging._checks"),
    "weight_average": ("merging.task_arithmetic", "merging._checks"),
    "ties": ("merging.ties", "merging._checks"),
    "adamerging": (
        "merging.adamerging",
        "merging.task_arithmetic",
        "merging.ties",
        "merging._checks",
    ),
    "lot": ("merging.lot", "merging._checks"),
    "pretrained": (),  # no merge: the pretrained weights themselves
}
MERGES["adamerging_pp"] = MERGES["adamerging"]


def merge_code(name: str) -> str:
    """Code version of the merge ``name`` (``merge=`` config)."""
    return code_version("pipeline.merge", *MERGES[name])
