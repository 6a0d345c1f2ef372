"""Content-addressed, atomic, checksummed, lock-protected stage cache.

Every stage result is a *unit*: a directory ``<root>/<stage>/<key>/`` holding the unit's
files and a ``manifest.json`` with the sha256 of each file and the key material that made
it. The key is a hash of the stage name, the stage's own config and the keys of its inputs,
so a changed config invalidates exactly the downstream units.

Guarantees
- Atomic: a unit is written into a temporary sibling directory and renamed into place; a
  killed writer leaves only a ``.tmp-*`` directory that is ignored (and swept later).
- Verified: on every read the files' sha256 are checked against the manifest; a truncated
  or bit-flipped file is reported with its path and the unit is recomputed, never loaded.
- Concurrent: a per-unit file lock makes two jobs that need the same unit compute it once;
  the second waits and then reads the finished unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CacheCorruptionWarning(UserWarning):
    """A cached unit failed its checksum and is being recomputed."""


def stable_hash(material: Any, length: int = 16) -> str:
    """Hash of JSON-serialisable ``material`` independent of dict order."""
    blob = json.dumps(_jsonable(material), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN
        return "nan"
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    try:  # omegaconf containers
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return _jsonable(OmegaConf.to_container(obj, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return repr(obj)


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="cache-sha256"
    )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class Unit:
    """A finished cache unit: where it lives and whether this process computed it."""

    stage: str
    key: str
    path: Path
    computed: bool

    def file(self, name: str) -> Path:
        return self.path / name


class Cache:
    """Stage cache rooted at ``root``. ``events`` records (stage, key, "hit"|"computed").

    ``verify=False`` skips the sha256 check of a unit's files on read (the manifest must
    still exist); ``lock=False`` computes a missing unit without the per-unit file lock
    (one process only). Both default on; the switches exist for the overhead benchmark
    (``bench/bench_pipeline.py``) and trusted single-job use.
    """

    def __init__(self, root: str | Path, verify: bool = True, lock: bool = True):
        self.root = Path(root)
        self.verify = verify
        self.lock = lock
        self.events: list[tuple[str, str, str]] = []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                f"cannot create the cache folder {self.root}: {e.strerror}. Set paths.cache_dir "
                "(or REACT_CACHE) to a writable folder."
            ) from e
        if not os.access(self.root, os.W_OK):
            raise PermissionError(
                f"the cache folder {self.root} is not writable. Set paths.cache_dir "
                "(or REACT_CACHE) to a writable folder."
            )

    # ------------------------------------------------------------------ paths
    def unit_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _valid(self, path: Path) -> bool:
        manifest = path / MANIFEST
        if not manifest.is_file():
            return False
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("cache unit %s has an unreadable manifest; recomputing", path)
            return False
        if not self.verify:
            return True
        files = [(path / name, digest) for name, digest in meta.get("files", {}).items()]
        # hashlib releases the GIL: a unit's files are hashed in parallel threads
        actual = _hash_pool().map(
            lambda f: file_sha256(f) if f.is_file() else None, [f for f, _ in files]
        )
        for (f, digest), got in zip(files, actual, strict=True):
            if got != digest:
                import warnings

                warnings.warn(
                    f"cache file {f} is missing, truncated or corrupted (checksum mismatch); "
                    "recomputing the unit",
                    CacheCorruptionWarning,
                    stacklevel=3,
                )
                return False
        return True

    def lookup(self, stage: str, key: str) -> Unit | None:
        path = self.unit_dir(stage, key)
        if path.is_dir() and self._valid(path):
            return Unit(stage, key, path, computed=False)
        return None

    # ------------------------------------------------------------------ main entry
    @staticmethod
    def key(stage: str, material: Any) -> str:
        """The key ``unit(stage, material, ...)`` uses, without touching the cache."""
        return stable_hash({"stage": stage, "material": material})

    def unit(
        self,
        stage: str,
        material: Any,
        compute: Callable[[Path], dict[str, Any] | None],
    ) -> Unit:
        """Return the unit for ``(stage, material)``, computing it with ``compute(tmpdir)``.

        ``compute`` writes its files into the directory it is given and may return extra
        JSON metadata to keep in the manifest. The key is ``stable_hash(material)``.
        """
        key = self.key(stage, material)
        hit = self.lookup(stage, key)
        if hit is not None:
            self.events.append((stage, key, "hit"))
            return hit
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(stage_dir / f"{key}.lock")) if self.lock else contextlib.nullcontext():
            hit = self.lookup(stage, key)  # another job may have finished it meanwhile
            if hit is not None:
                self.events.append((stage, key, "hit"))
                return hit
            final = self.unit_dir(stage, key)
            tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            try:
                tmp.mkdir()  # inside the try: a full disk can fail here too
                extra = compute(tmp) or {}
                files = {
                    str(p.relative_to(tmp)): file_sha256(p)
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file()
                }
                manifest = {
                    "stage": stage,
                    "key": key,
                    "material": _jsonable(material),
                    "files": files,
                    "seconds": time.perf_counter() - t0,
                    "extra": _jsonable(extra),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                _fault_injection(stage)
                _fsync_dir(tmp)
                if final.exists():  # a corrupted previous unit: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if e.errno == errno.ENOSPC:
                    raise OSError(
                        e.errno,
                        f"disk full while writing the {stage!r} cache unit under {stage_dir}; "
                        "free space or point paths.cache_dir elsewhere (results already "
                        "cached are intact)",
                    ) from e
                raise
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.events.append((stage, key, "computed"))
        return Unit(stage, key, final, computed=True)

    def manifest(self, unit: Unit) -> dict:
        return json.loads((unit.path / MANIFEST).read_text())

    def sweep_tmp(self) -> int:
        """Remove leftovers of killed writers. Returns how many were removed.

        A writer holds its unit's lock for the whole life of its ``.tmp-<key>-<pid>-*``
        folder, so a folder is kept while its pid is alive here or its lock is held (a writer
        on another node sharing the cache, whose pid means nothing on this one).
        """
        n = 0
        for tmp in self.root.glob("*/.tmp-*"):
            parts = tmp.name.split("-")
            pid = parts[2] if len(parts) >= 4 else ""
            if pid.isdigit() and _pid_alive(int(pid)):
                continue
            if len(parts) >= 4 and not _lock_free(tmp.parent / f"{parts[1]}.lock"):
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            n += 1
        return n


_FAULT_COUNTS: dict[str, int] = {}


def _fault_injection(stage: str) -> None:
    """Test hook: REACT_KILL_AT="<stage>:<n>" SIGKILLs this process while the n-th unit
    (1-based) of ``stage`` is written but not yet renamed into place (a torn write)."""
    spec = os.environ.get("REACT_KILL_AT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != stage:
        return
    _FAULT_COUNTS[stage] = _FAULT_COUNTS.get(stage, 0) + 1
    if _FAULT_COUNTS[stage] == int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _lock_free(path: Path) -> bool:
    """True when no process (on any host sharing the folder) holds the file lock ``path``."""
    try:
        with FileLock(str(path), blocking=False):
            return True
    except Timeout:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either the old or the whole new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
