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
  the second waits and then reads the finished unit. The holder of a lock is recorded next
  to it (``<key>.holder``: pid, host, command); a waiter says who it waits for, and gives up
  with a :class:`CacheLockError` when that holder is stopped (SIGSTOP, Ctrl-Z) or gone.
- Disk full: any failure while a unit is written on a full filesystem (an ``OSError`` with
  ENOSPC, or a library's own error, e.g. safetensors' or numpy's, on a folder with no space
  left) is raised as ``OSError(ENOSPC)`` naming the folder (:func:`disk_full`).
- Damaged layouts: a unit or stage folder replaced by a file, or a manifest that is not a
  JSON object, is reported (``CacheCorruptionWarning``) and repaired by recomputing. A
  read-only cache serves its finished units; only a missing unit is refused, naming it.
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
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class CacheCorruptionWarning(UserWarning):
    """A cached unit failed its checksum (or its layout is damaged) and is being recomputed."""


class DiskFullError(OSError):
    """A write failed because the filesystem is full; the message names the folder."""


class CacheLockError(RuntimeError):
    """A unit's lock is held by a process that will not release it (stopped or gone)."""


LOCK_POLL_SECONDS = float(os.environ.get("REACT_LOCK_POLL", "1.0"))
LOCK_REPORT_SECONDS = 30.0  # how often a waiter repeats who it waits for
LOCK_GIVE_UP_POLLS = 3  # a holder seen stopped/gone this many polls in a row: give up
DISK_FULL_FREE_BYTES = 1 << 20  # a write failing with less free space than this: disk full


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
        self.writable = _writable(self.root)
        if not self.writable:
            log.info("the cache folder %s is read-only: only finished units can be used", self.root)

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
        if not (isinstance(meta, dict) and isinstance(meta.get("files"), dict)):
            log.warning(
                "cache unit %s has a manifest that is not a JSON object with a 'files' table "
                "(%s); recomputing",
                path,
                type(meta).__name__,
            )
            return False
        if not self.verify:
            return True
        files = [(path / name, digest) for name, digest in meta["files"].items()]
        # hashlib releases the GIL: a unit's files are hashed in parallel threads
        actual = _hash_pool().map(
            lambda f: file_sha256(f) if f.is_file() else None, [f for f, _ in files]
        )
        for (f, digest), got in zip(files, actual, strict=True):
            if got != digest:
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
        if path.exists() and not path.is_dir():
            warnings.warn(
                f"cache unit {path} is a file, not a unit folder; recomputing the unit",
                CacheCorruptionWarning,
                stacklevel=3,
            )
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
        if not self.writable:
            raise PermissionError(
                f"the cache folder {self.root} is read-only and the {stage!r} unit {key} is not in "
                "it (or is damaged); point paths.cache_dir (or REACT_CACHE) at a writable copy"
            )
        stage_dir = self.root / stage  # created (or repaired) by locked()
        with (
            disk_full(stage_dir, f"the lock of the {stage!r} cache unit"),
            self.locked(stage, key)
            if self.lock
            else contextlib.nullcontext(self._stage_dir(stage)),
        ):
            hit = self.lookup(stage, key)  # another job may have finished it meanwhile
            if hit is not None:
                self.events.append((stage, key, "hit"))
                return hit
            final = self.unit_dir(stage, key)
            tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            t0 = time.perf_counter()
            try:
                with disk_full(stage_dir, f"the {stage!r} cache unit"):
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
                    _remove(final)  # a corrupted previous unit (a folder, or a stray file)
                    os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.events.append((stage, key, "computed"))
        return Unit(stage, key, final, computed=True)

    def _stage_dir(self, stage: str) -> Path:
        """``<root>/<stage>``, created; a file in its place is reported and replaced."""
        stage_dir = self.root / stage
        if stage_dir.exists() and not stage_dir.is_dir():
            warnings.warn(
                f"cache stage folder {stage_dir} is a file, not a folder; replacing it",
                CacheCorruptionWarning,
                stacklevel=4,
            )
            stage_dir.unlink()
        stage_dir.mkdir(parents=True, exist_ok=True)
        return stage_dir

    @contextlib.contextmanager
    def locked(self, stage: str, key: str):
        """Hold the unit's file lock; while waiting, say who holds it, and give up with
        :class:`CacheLockError` once that holder is stopped or gone."""
        path = self._stage_dir(stage) / f"{key}.lock"
        lock = FileLock(str(path))
        _acquire(lock, path, f"the {stage!r} cache unit {key}")
        holder = path.with_suffix(".holder")
        try:
            try:
                atomic_write_text(holder, json.dumps(_me()))
            except OSError:  # the record is advisory
                pass
            yield
        finally:
            with contextlib.suppress(OSError):
                holder.unlink()
            lock.release()

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
    """Test hook: REACT_KILL_AT="<stage>:<n>[:<signal>]" sends this process ``signal``
    (KILL, the default; INT for Ctrl-C; TERM as a scheduler does) while the n-th unit
    (1-based) of ``stage`` is written but not yet renamed into place (a torn write)."""
    spec = os.environ.get("REACT_KILL_AT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != stage:
        return
    n, _, name = rest.partition(":")
    _FAULT_COUNTS[stage] = _FAULT_COUNTS.get(stage, 0) + 1
    if _FAULT_COUNTS[stage] == int(n or 1):
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


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


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary sibling with a name unique to this writer (pid, random
    suffix), then rename it onto ``path``: readers see the old or the whole new file, and two
    writers of one path (two runs, two hosts) never share a temporary file. A full disk is
    reported naming the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with disk_full(path.parent, path.name):
            write(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------- disk full
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def _no_space(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` is (or was caused by) a full filesystem under ``folder``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(seen) for t in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, OSError):
        return False
    try:  # I/O errors that lost the errno (numpy: "N requested and M written")
        return shutil.disk_usage(folder).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def disk_full(folder: Path, what: str):
    """Re-raise a failure inside the block as ``OSError(ENOSPC)`` naming ``folder`` when the
    filesystem holding it is full; other failures pass through unchanged. The check runs
    before the caller removes its partial files (which would free the space)."""
    try:
        yield
    except DiskFullError:
        raise  # already named by an inner block
    except Exception as e:
        if not _no_space(e, Path(folder)):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while writing {what} under {folder}: no space left on the filesystem "
            f"holding {folder} ({type(e).__name__}: {e}). Free space there or point "
            "paths.cache_dir / paths.output_dir elsewhere (results already cached are intact)",
        ) from e


# ---------------------------------------------------------------------- layout, locks
def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (a real probe: root ignores permissions
    but not a read-only mount)."""
    probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


def _process_state(pid: int) -> str:
    """'running', 'stopped' or 'gone' for a pid on this host (Linux /proc; else a probe)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "running" if _pid_alive(pid) else "gone"
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("T", "t"):
        return "stopped"
    if state in ("Z", "X", "x"):
        return "gone"
    return "running"


def _holder(path: Path) -> tuple[str, str]:
    """(description, state) of the recorded holder of lock ``path``; state is 'running',
    'stopped', 'gone' or 'unknown' (not recorded, or on another host)."""
    try:
        h = json.loads(path.with_suffix(".holder").read_text())
        pid, host = int(h["pid"]), str(h["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "an unrecorded process", "unknown"
    who = f"pid {pid} on host {host} (since {h.get('since', '?')}: {h.get('command', '?')})"
    if host != socket.gethostname():
        return who, "unknown"
    return who, _process_state(pid)


def _acquire(lock: FileLock, path: Path, what: str) -> None:
    """Acquire ``lock`` (file ``path``), saying who holds it while waiting."""
    t0, last_report, bad_polls = time.monotonic(), None, 0
    while True:
        try:
            lock.acquire(timeout=LOCK_POLL_SECONDS)
            if last_report is not None:
                log.info("got the lock of %s after %.0f s", what, time.monotonic() - t0)
            return
        except Timeout:
            pass
        who, state = _holder(path)
        bad_polls = bad_polls + 1 if state in ("stopped", "gone") else 0
        if bad_polls >= LOCK_GIVE_UP_POLLS:
            fix = (
                f"resume it (kill -CONT {who.split()[1]}) or end it"
                if state == "stopped"
                else "a process it started may still hold the lock file; end it"
            )
            raise CacheLockError(
                f"gave up waiting for {what}: its lock {path} is held by {who}, which is "
                f"{state}; {fix}, then run again"
            )
        now = time.monotonic()
        if last_report is None or now - last_report >= LOCK_REPORT_SECONDS:
            log.warning(
                "waiting for %s: another job computes it; its lock %s is held by %s (%s)",
                what,
                path,
                who,
                state,
            )
            last_report = now
