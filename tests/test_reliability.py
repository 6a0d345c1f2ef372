"""Reliability guarantees of the pipeline (issue 7), on the tiny offline suite.

1. Interruption: a run SIGKILLed (``REACT_KILL_AT``) in features, statistics or the sweep and
   started again with the same command gives byte-identical tables and recomputes only the
   cut unit and what follows it; the killed writer's temporary folder is swept.
2. Corruption: a truncated / bit-flipped / unreadable cache file is reported with its path,
   recomputed, never loaded, and the results equal the clean run's.
3. Concurrency: two joblib jobs sharing units compute each unit once; two writers of one
   unit (threads, processes) run ``compute`` once and both read the whole file.
4. Hostile files: a pickle that runs code is refused by every checkpoint reader before it
   runs; no ``torch.load`` without ``weights_only=True`` in the repository.
5. Bad input: clear errors before heavy work (no cache unit computed).
6. Determinism: the same config twice (warm cache, fresh cache) gives byte-identical tables.
7. W&B: ``logger=wandb_online`` with no key or no network finishes, in bounded time, and
   says how to sync later.

The module builds the tiny suite once (``built``) and gives each test its own copy of the
cache, so tests are independent. ``make test-reliability`` runs these alone.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import FAST

import merging
from correction import react
from pipeline import cache as cache_mod
from pipeline import checkpoints as ckpt
from pipeline import main as pm
from pipeline import stages
from pipeline.cache import Cache, CacheCorruptionWarning, file_sha256

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("results", "scenarios", "fronts", "reference")
PIPELINE_STAGES = ("merge", "features", "statistics", "sweep")  # units after the suite build


# ---------------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REACT_KILL_AT"}
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def _cli(
    out: Path,
    cache: Path,
    *extra: str,
    env: dict | None = None,
    timeout: float = 300,
    run_dir: Path | None = None,
) -> subprocess.CompletedProcess:
    """``python -m pipeline.main`` as a user types it; the run folder is ``out/run``."""
    run_dir = run_dir or out / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.main",
        *FAST,
        f"paths.output_dir={out}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


_compose = pm.compose_config


def _events(run_dir: Path) -> list[tuple[str, str, str]]:
    return [tuple(e) for e in json.loads((run_dir / "timings.json").read_text())["cache_events"]]


def _units(cache: Path) -> set[tuple[str, str]]:
    """Finished units (stage, key): folders with a manifest (temporary folders excluded)."""
    return {
        (d.parent.name, d.name)
        for d in cache.glob("*/*")
        if not d.name.startswith(".tmp-") and (d / "manifest.json").is_file()
    }


def _tmp_dirs(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/.tmp-*"))


def _assert_same_tables(run: Path, reference: Path, names=TABLES) -> None:
    for name in names:
        assert (run / f"{name}.csv").read_bytes() == (reference / f"{name}.csv").read_bytes(), name


@dataclasses.dataclass
class Built:
    full_cache: Path  # every unit of the baseline run
    suite_cache: Path  # only the suite build's units (offline_*)
    baseline: Path  # run folder of an uninterrupted run from an empty cache
    computed: list[tuple[str, str]]  # pipeline units the baseline computed, in order


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("reliability")
    full = root / "cache"
    _ok(_cli(root, full))
    suite = root / "suite_cache"
    shutil.copytree(
        full,
        suite,
        ignore=lambda d, names: [n for n in names if Path(d) == full and n in PIPELINE_STAGES],
    )
    events = _events(root / "run")
    computed = [(s, k) for s, k, e in events if e == "computed" and s in PIPELINE_STAGES]
    return Built(full, suite, root / "run", computed)


@pytest.fixture
def suite_cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built.suite_cache, tmp_path / "cache"))


@pytest.fixture
def full_cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built.full_cache, tmp_path / "cache"))


# ============================================================== 1. interruption and resume
@pytest.mark.parametrize("stage, n", [("features", 7), ("statistics", 1), ("sweep", 3)])
def test_sigkill_then_same_command_resumes_exactly(built, suite_cache, tmp_path, stage, n):
    out = tmp_path / "out"
    killed = _cli(out, suite_cache, env=_env(REACT_KILL_AT=f"{stage}:{n}"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "run" / "results.csv").exists()
    # the torn write: one temporary folder of the cut unit, never renamed into place
    tmps = _tmp_dirs(suite_cache)
    assert len(tmps) == 1 and tmps[0].parent.name == stage
    cut = (stage, tmps[0].name.split("-")[1])
    assert cut not in _units(suite_cache)
    # what finished before the kill is exactly the uninterrupted run's units before the cut
    m = built.computed.index(cut)
    assert sum(s == stage for s, _ in built.computed[: m + 1]) == n
    finished = {u for u in _units(suite_cache) if u[0] in PIPELINE_STAGES}
    assert finished == set(built.computed[:m])

    _ok(_cli(out, suite_cache))  # the same command again
    events = _events(out / "run")
    computed = [(s, k) for s, k, e in events if e == "computed"]
    assert computed == built.computed[m:]  # the cut unit and what follows, nothing else
    assert all(e == "hit" for s, k, e in events if (s, k) in finished or s not in PIPELINE_STAGES)
    assert _tmp_dirs(suite_cache) == []  # the dead writer's folder was swept
    _assert_same_tables(out / "run", built.baseline)


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_ctrl_c_or_sigterm_ends_with_one_message_and_the_same_command_resumes(
    built, suite_cache, tmp_path, sig
):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM in the middle of a unit write: one message
    naming the cache and how to resume, exit 128 + signal, the run folder marked failed, no
    temporary folder left; the same command then finishes with the uninterrupted tables."""
    out = tmp_path / "out"
    stopped = _cli(out, suite_cache, env=_env(REACT_KILL_AT=f"sweep:3:{sig}"))
    signum = getattr(signal, f"SIG{sig}")
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    err = stopped.stderr
    assert f"react-merging: interrupted (SIG{sig})" in err and "Traceback" not in err, err[-2000:]
    assert f"the cache {suite_cache}" in err and "the same command resumes" in err
    failed = json.loads((out / "run" / "run_failed.json").read_text())
    assert ("KeyboardInterrupt" if sig == "INT" else "SIGTERM") in failed["error"]
    assert not (out / "run" / "results.csv").exists()
    assert _tmp_dirs(suite_cache) == []  # the cut unit's folder went with the exception
    _ok(_cli(out, suite_cache))
    _assert_same_tables(out / "run", built.baseline)


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_sweep_spares_a_live_writer_on_another_host(tmp_path):
    """A writer holds its unit's lock while its .tmp- folder exists. A writer on another node
    sharing the cache (SLURM) has a pid that means nothing here: its folder must survive a
    sweep as long as it holds the lock, and go once the lock is free (the writer died)."""
    cache = Cache(tmp_path)
    remote = tmp_path / "features" / ".tmp-abc0-999999999-123456"  # pid not alive on this host
    dead = tmp_path / "features" / ".tmp-abd0-999999998-123456"
    remote.mkdir(parents=True)
    dead.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "features" / "abc0.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.sweep_tmp() == 1
        assert remote.is_dir() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cache.sweep_tmp() == 1 and not remote.exists()


# ============================================================================ 2. corruption
def _flip_data_byte(path: Path) -> None:
    """Flip one bit in the tensor data (after the safetensors header): still a valid file."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    pos = start + (len(raw) - start) // 2 + 3  # a float32's high byte: a large change
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def _contents(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file (its bytes are not canonical: safetensors
    writes the metadata dict in a per-process hash order)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {
            k: f.get_tensor(k).clone() for k in f.keys()
        }  # copies, not views of the file


def test_corrupted_files_are_named_recomputed_and_never_loaded(
    built, full_cache, tmp_path, monkeypatch, caplog
):
    features = next(u for u in built.computed if u[0] == "features")
    statistics = next(u for u in built.computed if u[0] == "statistics")
    sweep = next(u for u in built.computed if u[0] == "sweep")
    f_path = full_cache.joinpath(*features, "features.safetensors")
    s_path = full_cache.joinpath(*statistics, "statistics.safetensors")
    clean = {p: _contents(p) for p in (f_path, s_path)}
    f_path.write_bytes(f_path.read_bytes()[: f_path.stat().st_size // 2])  # truncated
    _flip_data_byte(s_path)  # bit-flipped
    full_cache.joinpath(*sweep, "manifest.json").write_text(
        '{"files": {"results.par'
    )  # torn manifest
    damaged = {file_sha256(f_path), file_sha256(s_path)}

    loaded: list[
        str
    ] = []  # sha256 of every cached features/statistics file at the moment it is read
    orig_load_file, orig_load_stats = stages.load_file, react.load_statistics

    def spy_load_file(path, *a, **k):
        loaded.append(file_sha256(Path(path)))
        return orig_load_file(path, *a, **k)

    def spy_load_stats(path, *a, **k):
        loaded.append(file_sha256(Path(path)))
        return orig_load_stats(path, *a, **k)

    monkeypatch.setattr(stages, "load_file", spy_load_file)
    monkeypatch.setattr(react, "load_statistics", spy_load_stats)
    cfg = _compose([*FAST, f"paths.cache_dir={full_cache}", f"paths.output_dir={tmp_path}"])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        pm.run(cfg, tmp_path / "run")
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheCorruptionWarning)]
    assert any(str(f_path) in m for m in messages) and any(str(s_path) in m for m in messages)
    assert str(full_cache.joinpath(*sweep)) in caplog.text  # the unreadable manifest is named too
    assert loaded and not damaged & set(loaded)  # never read while damaged
    events = _events(tmp_path / "run")
    assert {(s, k) for s, k, e in events if e == "computed"} == {features, statistics, sweep}
    for p, (meta, tensors) in clean.items():  # recomputed: the same tensors bit for bit
        new_meta, new_tensors = _contents(p)
        assert new_meta == meta and new_tensors.keys() == tensors.keys()
        assert all(torch.equal(new_tensors[k], tensors[k]) for k in tensors)
    _assert_same_tables(tmp_path / "run", built.baseline)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_cache_unit_detects_each_damage(tmp_path, damage):
    cache = Cache(tmp_path)
    calls = []

    def compute(out: Path):
        calls.append(1)
        (out / "a.bin").write_bytes(bytes(range(256)) * 64)

    unit = cache.unit("s", {"x": 1}, compute)
    f = unit.file("a.bin")
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[5000] ^= 1
        f.write_bytes(bytes(raw))
    elif damage == "delete":
        f.unlink()
    else:
        (unit.path / "manifest.json").write_text("{")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cache.unit("s", {"x": 1}, compute)
    if damage != "manifest":
        assert any(
            issubclass(w.category, CacheCorruptionWarning) and str(f) in str(w.message)
            for w in caught
        )
    assert len(calls) == 2 and again.computed and f.read_bytes() == bytes(range(256)) * 64
    assert cache.unit("s", {"x": 1}, compute).computed is False and len(calls) == 2


# =========================================================================== 3. concurrency
def _log_span(log: Path) -> tuple[str, str]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", log.read_text(), re.M)
    return stamps[0], stamps[-1]


def test_joblib_multirun_computes_shared_units_once(built, suite_cache, tmp_path):
    sweep_dir = tmp_path / "multi"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.main",
        "--multirun",
        "launcher=joblib",
        *FAST,
        "correction.beta=0.1,1.0",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={suite_cache}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    _ok(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300))
    jobs = [sweep_dir / "0", sweep_dir / "1"]
    (s0, e0), (s1, e1) = (_log_span(j / "main.log") for j in jobs)
    assert s0 < e1 and s1 < e0, "the two jobs did not overlap in time"
    per_unit: dict[tuple[str, str], list[str]] = {}
    for j in jobs:
        for s, k, e in _events(j):
            per_unit.setdefault((s, k), []).append(e)
    shared = {u for u in per_unit if all(any(u == (s, k) for s, k, _ in _events(j)) for j in jobs)}
    assert {s for s, _ in shared} >= {"merge", "features"}
    for unit, events in per_unit.items():  # each unit computed once overall (suite units: never)
        assert events.count("computed") == (0 if unit[0].startswith("offline_") else 1), unit
    assert Counter(s for s, _ in per_unit if s == "statistics")["statistics"] == 2  # one per beta
    # same models -> same reference; job 0 is the default beta -> the baseline's tables
    _assert_same_tables(jobs[1], jobs[0], ["reference"])
    _assert_same_tables(jobs[0], built.baseline)
    assert _tmp_dirs(suite_cache) == []


def _slow_compute(calls: list, started: threading.Event | None = None):
    def compute(out: Path):
        calls.append(1)
        if started is not None:
            started.set()
        with open(out / "big.bin", "wb") as f:
            for i in range(8):  # 8 MiB, written slowly
                f.write(bytes([i]) * (1 << 20))
                time.sleep(0.05)

    return compute


EXPECTED_BIG = b"".join(bytes([i]) * (1 << 20) for i in range(8))


def test_two_threads_one_unit_compute_once(tmp_path):
    calls: list = []
    started = threading.Event()
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def worker(i: int):
        barrier.wait()
        results[i] = Cache(tmp_path).unit("shared", {"k": 1}, _slow_compute(calls, started))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert started.wait(10)
    key = cache_mod.stable_hash({"stage": "shared", "material": {"k": 1}})
    assert Cache(tmp_path).lookup("shared", key) is None  # a reader never sees a half-written unit
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert sorted(r.computed for r in results.values()) == [False, True]
    for r in results.values():
        assert r.file("big.bin").read_bytes() == EXPECTED_BIG
    assert _tmp_dirs(tmp_path) == []


WRITER = """
import json, sys, time
from pathlib import Path
from pipeline.cache import Cache
root, counter, ready, me = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
def compute(out):
    with open(counter, "a") as f:
        f.write("computed\\n")
    with open(out / "big.bin", "wb") as f:
        for i in range(8):
            f.write(bytes([i]) * (1 << 20))
            time.sleep(0.05)
ready.mkdir(exist_ok=True)
(ready / me).touch()
while len(list(ready.iterdir())) < 2:  # both imported: call Cache.unit at the same moment
    time.sleep(0.002)
u = Cache(root).unit("shared", {"k": 2}, compute)
print(json.dumps({"computed": u.computed, "size": u.file("big.bin").stat().st_size,
                  "ok": u.file("big.bin").read_bytes() == b"".join(bytes([i]) * (1 << 20) for i in range(8))}))
"""


def test_two_processes_one_unit_compute_once(tmp_path):
    counter = tmp_path / "counter.txt"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(tmp_path / "cache"),
                str(counter),
                str(tmp_path / "ready"),
                str(i),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert counter.read_text() == "computed\n"
    assert sorted(g["computed"] for g in got) == [False, True]
    assert all(g["ok"] and g["size"] == 8 << 20 for g in got)


# ========================================================================= 4. hostile files
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    marker = tmp_path / "PWNED"
    files = {}
    files["zip"] = tmp_path / "zip.pt"  # torch.save format, tensors next to the payload
    torch.save(
        {"state_dict": {"conv1.weight": torch.ones(2)}, "payload": _Evil(marker)}, files["zip"]
    )
    files["legacy"] = tmp_path / "legacy.pt"  # a raw pickle (pre-1.6 torch / plain pickle.dump)
    files["legacy"].write_bytes(pickle.dumps({"conv1.weight": _Evil(marker)}, protocol=2))
    return marker, files


def test_hostile_payload_is_real(tmp_path):
    """The test files do run code when unpickled naively (so the refusals below mean something)."""
    marker, files = _hostile_files(tmp_path)
    with zipfile.ZipFile(files["zip"]) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = z.read(pkl)
    assert b"system" in data
    pickle.loads(files["legacy"].read_bytes())  # noqa: S301 - deliberately, in a tmp folder
    assert marker.exists()


def _project_loaders():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import convert_task_vectors
        import fold_checkpoint
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from pipeline.suites import paper8

    ref = {"conv1.weight": torch.ones(2)}
    return {
        "checkpoints.load_state_file": ckpt.load_state_file,
        "checkpoints.load_task_vectors_visual": ckpt.load_task_vectors_visual,
        "checkpoints.safe_torch_load": ckpt.safe_torch_load,
        "load_checkpoint(state_dict)": lambda p: ckpt.load_checkpoint(
            ckpt.CheckpointRef("expert x", "state_dict", str(p)), ref
        ),
        "load_checkpoint(task_vectors)": lambda p: ckpt.load_checkpoint(
            ckpt.CheckpointRef("expert x", "task_vectors", str(p)), ref
        ),
        "paper8._load_state": lambda p: paper8._load_state(str(p)),
        "fold_checkpoint.load_checkpoint": fold_checkpoint.load_checkpoint,
        "convert_task_vectors.convert": lambda p: _convert(convert_task_vectors, p),
    }


def _convert(module, path: Path):
    src = path.parent / f"src_{path.stem}"
    (src / "MNIST").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, src / "zeroshot.pt")
    shutil.copy(path, src / "MNIST" / "finetuned.pt")
    try:
        return module.convert(src, path.parent / f"dst_{path.stem}")
    finally:
        assert not list((path.parent / f"dst_{path.stem}").glob("*.safetensors"))


LOADERS = [
    "checkpoints.load_state_file",
    "checkpoints.load_task_vectors_visual",
    "checkpoints.safe_torch_load",
    "load_checkpoint(state_dict)",
    "load_checkpoint(task_vectors)",
    "paper8._load_state",
    "fold_checkpoint.load_checkpoint",
    "convert_task_vectors.convert",
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_every_checkpoint_reader_refuses_code(tmp_path, loader, kind):
    marker, files = _hostile_files(tmp_path)
    loaders = _project_loaders()
    assert sorted(loaders) == sorted(LOADERS)
    with pytest.raises((pickle.UnpicklingError, ValueError, RuntimeError)) as err:
        loaders[loader](files[kind])
    message = str(err.value)
    # names the file it read (the converter reads its copy, src_<kind>/zeroshot.pt) and why
    assert re.search(rf"{re.escape(str(tmp_path))}/(src_{kind}/zeroshot|{kind})\.pt", message), (
        message
    )
    reason = (
        "posix.system"
        if kind == "zip" or "weights_only" in message
        else "not a torch zip checkpoint"
    )
    assert reason in message, message
    assert "will likely succeed" not in message  # never advises the unsafe weights_only=False
    assert not marker.exists()


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "load"
                and isinstance(f.value, ast.Name)
                and f.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                out.append((node.lineno, safe))
    return out


def _repo_python_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored .py files (not the venv, not outputs)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / f for f in listed if (ROOT / f).is_file()]


# pickle reads of files that are not checkpoints: the animal_mnist wheel's own data arrays
TRUSTED_PICKLE_READERS = {"pipeline/suites/offline_data.py"}


def test_no_torch_load_without_weights_only():
    files = _repo_python_files()
    assert len(files) > 20
    calls = {
        f"{p.relative_to(ROOT)}:{line}": safe for p in files for line, safe in _torch_load_calls(p)
    }
    assert calls, "expected the state-dict readers' torch.load calls"
    assert [c for c, safe in calls.items() if not safe] == []
    # and no plain pickle reads in the project code, but of the trusted package data above
    plain = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        if p.relative_to(ROOT).parts[0] != "tests"
        and str(p.relative_to(ROOT)) not in TRUSTED_PICKLE_READERS
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bpickle\.loads?\(", line)
    ]
    assert plain == []


# ============================================================================ 5. bad input
def _no_units(cache: Path) -> bool:
    return not any(u[0] in PIPELINE_STAGES for u in _units(cache)) if cache.exists() else True


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigCompositionException) as err:
        _compose([*FAST, "foo=1"])
    assert "foo" in str(err.value) and "+foo=1" in str(err.value)
    _compose([*FAST, "+foo=1"])  # an explicit addition is Hydra's documented escape hatch


@pytest.mark.parametrize(
    "override, message",
    [
        ("preferences.custom=[[0.5,0.5,0]]", "length 3, expected one weight per task"),
        ("preferences.custom=[[1.2,-0.2,0,0]]", "negative"),
        (
            "preferences.custom=[[0.5,0.4,0,0]]",
            "sums to 0.9, not 1 (tolerance 1e-06); divide it by",
        ),
        ("preferences.custom=[[nan,0.5,0.5,0]]", "NaN/inf not allowed"),
        ("preferences.sets=[custom]", "not a set name: give them as preferences.custom=[["),
        ("calibration.size=0", "at least 1 calibration image"),
        ("calibration.size=1.5", "fraction outside (0, 1]"),
        ("calibration.size=true", "a fraction in (0, 1] or a count"),
    ],
)
def test_bad_preferences_and_calibration_fail_before_any_work(tmp_path, override, message):
    cfg = _compose([*FAST, f"paths.cache_dir={tmp_path / 'cache'}", override])
    with pytest.raises(ValueError) as err:
        pm.run(cfg, tmp_path / "run")
    assert message in str(err.value) and "normalize=True" not in str(err.value)
    assert override.split("=")[0] in str(err.value) or "calibration.size" in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing was built, not even the cache folder


def test_calibration_count_larger_than_split_fails_before_features(suite_cache, tmp_path):
    cfg = _compose([*FAST, f"paths.cache_dir={suite_cache}", "calibration.size=100000"])
    with pytest.raises(ValueError) as err:
        pm.run(cfg, tmp_path / "run")
    assert re.search(
        r"calibration.size=100000 is larger than the 'test' split of task '\w+' \(\d+ images\)",
        str(err.value),
    )
    assert _no_units(suite_cache)


def _pair(keys=("a.weight", "b.bias")):
    return {k: torch.randn(3, 2) for k in keys}


@pytest.mark.parametrize(
    "merge", ["task_arithmetic", "ties", "weight_average", "preference_task_arithmetic"]
)
def test_mismatched_checkpoints_name_the_first_offending_key(merge):
    torch.manual_seed(0)
    pre = _pair()
    good = _pair()
    missing = {"a.weight": torch.randn(3, 2)}
    shaped = {"a.weight": torch.randn(3, 2), "b.bias": torch.randn(4, 2)}
    call = {
        "task_arithmetic": lambda e: merging.task_arithmetic(pre, e, scale=0.3),
        "ties": lambda e: merging.ties(pre, e, scale=0.3, density=0.5),
        "weight_average": merging.weight_average,  # expert 0 is the reference
        "preference_task_arithmetic": lambda e: merging.preference_task_arithmetic(
            pre, e, [0.5, 0.5], scale=0.3
        ),
    }[merge]
    with pytest.raises(ValueError, match=r"expert 1.*'b\.bias' is missing"):
        call([good, missing])
    with pytest.raises(ValueError, match=r"expert 1.*'b\.bias' has shape \(4, 2\)"):
        call([good, shaped])


def test_non_finite_features_name_task_and_stage(suite_cache, tmp_path, monkeypatch):
    """A NaN in an expert (so in the merged model too): the feature stage stops at the first
    broken model, naming it, the task and the split; nothing downstream (statistics, sweep)
    is computed. task_statistics names the task too."""
    build = pm.build_suite

    def nan_expert_suite(*args, **kwargs):
        suite = build(*args, **kwargs)
        state = {k: v.clone() for k, v in suite.expert_state("digits").items()}
        state["proj"][0, 0] = float("nan")
        path = tmp_path / "digits_nan.safetensors"
        save_file(state, str(path))
        return dataclasses.replace(
            suite, expert_paths={**suite.expert_paths, "digits": path}, key=suite.key + "-nan"
        )

    monkeypatch.setattr(pm, "build_suite", nan_expert_suite)
    cfg = _compose([*FAST, f"paths.cache_dir={suite_cache}"])
    with pytest.raises(
        FloatingPointError,
        match=r"merged \(task_arithmetic\) \| mnist/test: \d+ of \d+ embeddings are not finite.*check the merge",
    ):
        pm.run(cfg, tmp_path / "run")
    assert not any(u[0] in ("statistics", "sweep") for u in _units(suite_cache))
    z = torch.randn(5, 4)
    bad = z.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"task 'digits': z_expert contains 1 non-finite"):
        react.task_statistics(z, bad, beta=0.1, task="digits")


def test_statistics_stage_passes_task_names(full_cache, tmp_path, monkeypatch):
    """If non-finite features ever reached the statistics stage, the error names the task."""
    for d in (full_cache / "statistics", full_cache / "sweep"):
        shutil.rmtree(d)
    features = pm.Context.features

    def nan_for_faces(self, model, task, split, indices=None):
        z = features(self, model, task, split, indices)
        if task == "faces" and model.key.startswith("expert") and indices is not None:
            z = z.clone()
            z[0, 0] = float("inf")
        return z

    monkeypatch.setattr(pm.Context, "features", nan_for_faces)
    cfg = _compose([*FAST, f"paths.cache_dir={full_cache}"])
    with pytest.raises(ValueError, match=r"task 'faces': z_expert contains 1 non-finite"):
        pm.run(cfg, tmp_path / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_folder_chmod(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = _compose([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
        with pytest.raises(PermissionError, match="not writable"):
            pm.run(cfg, locked / "run")
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "cache").exists()


def test_unwritable_output_folder(tmp_path):
    """A path below a plain file cannot be written even by root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = _compose([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(PermissionError) as err:
        pm.run(cfg, blocker / "run")
    assert str(blocker / "run") in str(err.value) and "hydra.run.dir" in str(err.value)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(
        OSError, match=rf"cannot create the cache folder {re.escape(str(blocker))}.*paths.cache_dir"
    ):
        pm.run(_compose([*FAST, f"paths.cache_dir={blocker / 'cache'}"]), tmp_path / "run")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_reported_as_such(full_cache, tmp_path, monkeypatch):
    shutil.rmtree(full_cache / "features")
    monkeypatch.setattr(stages, "save_file", _enospc)
    cfg = _compose([*FAST, f"paths.cache_dir={full_cache}"])
    with pytest.raises(OSError) as err:
        pm.run(cfg, tmp_path / "run")
    assert err.value.errno == errno.ENOSPC
    assert "disk full" in str(err.value) and str(full_cache) in str(err.value)
    assert _tmp_dirs(full_cache) == [] and not any(u[0] == "features" for u in _units(full_cache))


@pytest.mark.parametrize("where", ["compute", "manifest", "tmpdir"])
def test_full_disk_anywhere_in_a_unit_write(tmp_path, monkeypatch, where):
    cache = Cache(tmp_path / "cache")
    orig_write, orig_mkdir = Path.write_text, Path.mkdir

    def compute(out: Path):
        if where == "compute":
            _enospc()
        (out / "a.txt").write_text("a")

    if where == "manifest":
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: (
                _enospc() if self.name == "manifest.json" else orig_write(self, *a, **k)
            ),
        )
    if where == "tmpdir":
        monkeypatch.setattr(
            Path,
            "mkdir",
            lambda self, *a, **k: (
                _enospc() if self.name.startswith(".tmp-") else orig_mkdir(self, *a, **k)
            ),
        )
    with pytest.raises(OSError, match="disk full") as err:
        cache.unit("stage", {"x": 1}, compute)
    assert err.value.errno == errno.ENOSPC and str(tmp_path / "cache") in str(err.value)
    monkeypatch.undo()
    assert (
        _tmp_dirs(tmp_path / "cache") == []
        and cache.lookup("stage", cache_mod.stable_hash({"stage": "stage", "material": {"x": 1}}))
        is None
    )


# ============================================================================ 6. determinism
def test_same_config_gives_byte_identical_tables(built, full_cache, tmp_path):
    warm = tmp_path / "warm"
    _ok(_cli(warm, full_cache))  # fresh run folder, every unit from the cache
    assert {e for _, _, e in _events(warm / "run")} == {"hit"}
    _assert_same_tables(warm / "run", built.baseline)
    fresh = tmp_path / "fresh"
    _ok(_cli(fresh, fresh / "cache"))  # fresh run folder and an empty cache: everything rebuilt
    _assert_same_tables(fresh / "run", built.baseline)
    for run in (built.baseline, warm / "run", fresh / "run"):
        assert json.loads((run / "summary.json").read_text())["seed"] == 0
        assert re.search(r"^Seed: 0\b", (run / "report.md").read_text(), re.M)


# ===================================================================== 7. W&B unreachable
@pytest.mark.parametrize(
    "key, mode",
    [
        ("", None),  # no API key, WANDB_MODE unset: W&B refuses at once
        ("0123456789abcdef0123456789abcdef01234567", "online"),  # a key, but no server answers
    ],
)
def test_wandb_online_without_network_finishes_and_says_how_to_sync(
    full_cache, tmp_path, key, mode
):
    home = tmp_path / "home"  # no ~/.netrc, no ~/.config/wandb
    home.mkdir()
    env = _env(HOME=str(home), WANDB_API_KEY=key, WANDB_BASE_URL="http://127.0.0.1:9")
    if mode is None:
        env.pop("WANDB_MODE")
    else:
        env["WANDB_MODE"] = mode
    t0 = time.perf_counter()
    proc = _ok(
        _cli(
            tmp_path / "out",
            full_cache,
            "logger=wandb_online",
            "logger.init_timeout=5",
            env=env,
            timeout=120,
        )
    )
    elapsed = time.perf_counter() - t0
    run = tmp_path / "out" / "run"
    assert all((run / f"{t}.csv").is_file() for t in TABLES)
    output = proc.stdout + proc.stderr
    assert "W&B online init failed" in output
    assert f"wandb sync {run / 'wandb'}" in output
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run folder to sync"
    assert elapsed < 60, f"took {elapsed:.0f} s (init_timeout=5)"
