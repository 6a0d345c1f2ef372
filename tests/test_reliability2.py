"""Reliability, second round (issue 12): each class through the real command line.

1. Concurrent runs: two runs started together get their own run folders (time + random
   token); each folder's tables come from its own config.
2. Code versions: editing a module recomputes exactly the units its code computes (and what
   is computed from them), nothing else; the old numbers never come back.
3. Oversized files: a small torch zip declaring gigabytes (a short record, a compressed
   record, views repeating one storage) is refused, naming the file, before allocating.
4. Real disk full (a small tmpfs, as root): reported as such, naming the folder, for the
   cache and the run folder; nothing half-written is left.
5. Validation: bad values of every kind fail before any stage, the key named.
6. Lock waits: a waiter names the holder and gives up when it is stopped or gone.
7. Multirun workers end when their launcher is SIGKILLed.
8. Damaged cache layouts are repaired (a file in place of a unit or stage folder, a
   ``null`` manifest); a read-only cache serves its units.
9. Hostile or bad files: messages name the file (and the expert), never advise unsafe
   loading; fold_checkpoint refuses non-finite weights.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_reliability import PIPELINE_STAGES, _assert_same_tables, _env, _events, _ok
from tiny import FAST

from correction import react
from pipeline import checkpoints as ckpt
from pipeline import main as pm
from pipeline.cache import Cache

pytestmark = pytest.mark.reliability
TASKS = list(pm.compose_config(FAST).suite.tasks)  # read from the config, not hard-coded
ONE_HOT = "[" + ",".join(["1"] + ["0"] * (len(TASKS) - 1)) + "]"

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _pipeline(out: Path, cache: Path, *extra: str, run_dir: Path | None = None, **kw):
    """``python -m pipeline.main`` on the tiny suite; the run folder is Hydra's default
    (``out/runs/default/<time>-<token>``) unless ``run_dir`` is given."""
    cmd = [PY, "-m", "pipeline.main", *FAST, f"paths.output_dir={out}", f"paths.cache_dir={cache}"]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    return subprocess.run(
        [*cmd, *extra],
        cwd=kw.pop("cwd", ROOT),
        env=kw.pop("env", None) or _env(),
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 1800),  # a cold tiny suite on a loaded shared CPU: minutes
    )


def _fails_with(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """The run failed, and its stderr matches ``pattern`` (its tail shown when not)."""
    assert proc.returncode != 0
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run from an empty cache: (its cache, its run folder, its events)."""
    root = tmp_path_factory.mktemp("reliability2")
    _ok(_pipeline(root, root / "cache", run_dir=root / "run"))
    return root / "cache", root / "run", _events(root / "run")


@pytest.fixture
def full_cache(baseline, tmp_path) -> Path:
    return Path(shutil.copytree(baseline[0], tmp_path / "cache"))


def _computed(run: Path) -> set[tuple[str, str]]:
    return {(s, k) for s, k, e in _events(run) if e == "computed"}


# ============================================================ 1. concurrent runs, run folders
RUN_FOLDER = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-[0-9a-f]{8}$")


def test_runs_started_together_get_their_own_folders(full_cache, tmp_path):
    """Three runs of different betas started at one moment: three folders, each holding its
    own config's tables (the default folder was the second: they shared one)."""
    out = tmp_path / "out"
    betas = ["0.1", "1.0", "10.0"]
    procs = [
        subprocess.Popen(
            [PY, "-m", "pipeline.main", *FAST, f"paths.output_dir={out}"]
            + [f"paths.cache_dir={full_cache}", f"correction.beta={b}"],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in betas
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    folders = sorted((out / "runs" / "default").iterdir())
    assert len(folders) == 3 and all(RUN_FOLDER.match(f.name) for f in folders), folders
    got = {}
    for f in folders:
        overrides = (f / ".hydra" / "overrides.yaml").read_text()
        beta = re.search(r"correction\.beta=([\d.]+)", overrides).group(1)
        got[beta] = json.loads((f / "summary.json").read_text())["correction"]["beta"]
        assert not list(f.glob(".*.tmp")), "a temporary file was left behind"
    assert got == {b: float(b) for b in betas}


# ============================================================ 2. code versions in cache keys
SOURCES = ("pipeline", "correction", "merging", "baselines", "evaluation", "configs")


def _copy_repo(dst: Path) -> Path:
    for name in SOURCES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_code_edit_recomputes_exactly_the_units_it_computes(baseline, full_cache, tmp_path):
    """ReACT's ``apply`` edited to correct nothing, and a comment added to the TIES merge:
    with merge=task_arithmetic the statistics and sweep units are recomputed, merges and
    features are cache hits, and ReACT's accuracies are now the merged model's."""
    repo = _copy_repo(tmp_path / "repo")
    _edit(repo / "correction" / "react.py", "def apply(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:\n", "def apply(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:\n    return z.clone()\n")  # fmt: skip
    (repo / "merging" / "ties.py").write_text((repo / "merging" / "ties.py").read_text() + "# x\n")
    run = tmp_path / "run"
    _ok(_pipeline(tmp_path, full_cache, run_dir=run, cwd=repo))
    events = _events(run)
    computed = {s for s, _, e in events if e == "computed"}
    assert computed == {"statistics", "sweep"}, events
    assert all(e == "hit" for s, _, e in events if s in ("merge", "features"))
    _, base_run, base_events = baseline
    n_sweeps = sum(s == "sweep" for s, _, e in base_events)
    assert sum(s == "sweep" for s, _, e in events if e == "computed") == n_sweeps
    import pandas as pd

    scen = pd.read_csv(run / "scenarios.csv")
    ref = pd.read_csv(run / "reference.csv")
    merged = ref[ref.label.str.startswith("merged")].set_index("task").accuracy
    equal = scen[(scen.scenario == "equal") & (scen.task != "average")].set_index("task").accuracy
    assert (equal - merged.loc[equal.index]).abs().max() < 1e-6  # corrected nothing, as edited
    old = pd.read_csv(base_run / "scenarios.csv")
    assert not old.accuracy.equals(scen.accuracy)  # the old numbers did not come back
    # and the unedited code again: every unit of the baseline is still there, all hits
    run2 = tmp_path / "run2"
    _ok(_pipeline(tmp_path, full_cache, run_dir=run2))
    assert {e for _, _, e in _events(run2)} == {"hit"}
    _assert_same_tables(run2, base_run)


# ============================================================ 5. validation before any stage
@pytest.mark.parametrize(
    "override, key",
    [
        ("correction.beta=nan", "correction.beta"),
        ("batch_size=0", "batch_size"),
        ("preferences.sets=[]", "preferences.sets"),
        (f"preferences.custom=[[0.5,0.5],{ONE_HOT}]", "preferences.custom"),
    ],
)
def test_bad_config_fails_before_any_stage_naming_the_key(tmp_path, override, key):
    proc = _pipeline(tmp_path, tmp_path / "cache", override, run_dir=tmp_path / "run")
    _fails_with(proc, rf"\b{re.escape(key)}=.+?: ")
    assert not (tmp_path / "cache").exists()  # before any stage: not even the cache folder


@pytest.mark.parametrize(
    "override, message",
    [
        ("methods=[]", "methods=[]: must name at least one method"),
        ("methods=[react,react]", "methods=['react', 'react']: names a method twice"),
        ("calibration.size=1", "calibration.size=1: an integer is a count"),
        ("calibration.seed=-1", "calibration.seed=-1: must be an integer >= 0"),
        (f"preferences.pairs=[[{TASKS[0]},nosuchtask]]", "unknown task(s) ['nosuchtask']"),
        (f"suite.tasks=[{TASKS[0]},nosuchtask]", "suite.tasks has unknown offline tasks"),
        ("seed=abc", "seed='abc': must be an integer >= 0"),
        ("num_threads=0", "num_threads=0: must be an integer >= 1 or null"),
        ("feature_workers=-1", "feature_workers=-1: must be an integer >= 0"),
        ("autocast=maybe", "autocast='maybe': must be true or false"),
        ("correction.beta=-1", "correction.beta=-1"),
        ("merge=adamerging merge.steps=0", "merge.steps=0: must be an integer >= 1"),
        ("merge=ties merge.combine=max", "merge.combine='max': must be one of sum, mean"),
        (f"preferences.pairs=[[{TASKS[0]}]]", f"preferences.pairs=[['{TASKS[0]}']]: each entry"),
        ("preferences.simplex_step=0", "preferences.simplex_step=0"),
        ("preferences.pairwise_steps=1", "preferences.pairwise_steps=1"),
        ("preferences.score_all_tasks=some", "preferences.score_all_tasks='some': must be true"),
        ("methods=[react] fixed_methods=[react]", "fixed_methods=['react']: ['react'] also in"),
        ("fixed_methods=[surgery] baselines.surgery.lr=0", "baselines.surgery.lr=0"),
        ("methods=[map] baselines.map.fit=cubic", "baselines.map.fit='cubic'"),
        ("experiment_name=a/b", "experiment_name='a/b'"),
    ],
)
def test_every_key_is_checked(override, message):
    cfg = pm.compose_config([*FAST, *override.split()])
    with pytest.raises(ValueError) as err:
        pm.validate_config(cfg)
    assert message in str(err.value)


def test_pairwise_panels_default_to_the_suites_figure_pairs():
    """Eight tasks: four panels, each task once; null asks for all 28 pairs; a run on a
    subset of the tasks keeps the panels that apply, or every pair when none do."""
    from pipeline.evaluate import pairwise_pairs

    def pairs(*overrides):
        cfg = pm.compose_config(list(overrides))
        pm.validate_config(cfg)
        return pairwise_pairs(cfg.preferences, list(cfg.suite.tasks))

    assert pairs() == [
        ("mnist", "animals"),
        ("digits", "faces"),
        ("photos", "textures"),
        ("svhn", "signs"),
    ]
    assert len(pairs("preferences.pairs=null")) == 28
    assert pairs("suite.tasks=[mnist,animals,digits]") == [("mnist", "animals")]
    assert pairs("suite.tasks=[mnist,digits,svhn]") == [
        ("mnist", "digits"),
        ("mnist", "svhn"),
        ("digits", "svhn"),
    ]
    assert len(pairs("suite=offline_tiny")) == 6  # no panels: every pair of 4
    assert pairs("preferences.pairs=[[digits,mnist]]") == [("digits", "mnist")]
    with pytest.raises(ValueError, match='must be "figure", null'):
        pm.validate_config(pm.compose_config(["preferences.pairs=some"]))


def test_flat_custom_preference_and_counts_are_still_accepted():
    for extra in ([f"preferences.custom={ONE_HOT}"], ["calibration.size=2"], []):
        pm.validate_config(pm.compose_config([*FAST, *extra]))


# ============================================================ 8. damaged cache layouts
def _damage(cache: Path, events, kind: str) -> Path:
    features = next(k for s, k, e in events if s == "features")
    sweep = next(k for s, k, e in events if s == "sweep")
    if kind == "unit_is_file":
        target = cache / "features" / features
        shutil.rmtree(target)
        target.write_text("not a unit")
    elif kind == "stage_is_file":
        target = cache / "sweep"
        shutil.rmtree(target)
        target.write_text("not a stage folder")
    else:  # a manifest that is valid JSON but not an object
        target = cache / "sweep" / sweep
        (target / "manifest.json").write_text("null")
    return target


@pytest.mark.parametrize("kind", ["unit_is_file", "stage_is_file", "null_manifest"])
def test_damaged_cache_layout_is_named_and_repaired(baseline, full_cache, tmp_path, kind):
    target = _damage(full_cache, baseline[2], kind)
    run = tmp_path / "run"
    proc = _ok(_pipeline(tmp_path, full_cache, run_dir=run))
    assert str(target) in proc.stdout + proc.stderr  # the damage is named (log or warning)
    _assert_same_tables(run, baseline[1])
    again = tmp_path / "again"
    _ok(_pipeline(tmp_path, full_cache, run_dir=again))
    assert {e for _, _, e in _events(again)} == {"hit"}  # repaired in place


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def _read_only_copy(src: Path, dst: Path):
    dst.mkdir()
    if not (_mount("--bind", str(src), str(dst)) and _mount("-o", "remount,bind,ro", str(dst))):
        subprocess.run(["umount", str(dst)], capture_output=True)
        pytest.skip("needs root and bind mounts (a read-only filesystem; root ignores chmod)")
    try:
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_read_only_cache_serves_its_units_and_names_a_missing_one(baseline, full_cache, tmp_path):
    with _read_only_copy(full_cache, tmp_path / "ro") as ro:
        run = tmp_path / "run"
        _ok(_pipeline(tmp_path, ro, run_dir=run))
        assert {e for _, _, e in _events(run)} == {"hit"}
        _assert_same_tables(run, baseline[1])
        proc = _pipeline(tmp_path, ro, "correction.beta=1.0", run_dir=tmp_path / "run2")
    _fails_with(
        proc,
        rf"the cache folder {re.escape(str(ro))} is read-only and the "
        r"'statistics' unit \w+ is not in it",
    )


# ============================================================ 3. oversized checkpoint files
class _Storage:
    """Stands for the one storage of a crafted torch zip (a persistent id when pickled)."""


class _View:
    def __init__(self, storage: _Storage, size: tuple, stride: tuple):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        from torch import _utils

        args = (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())
        return (_utils._rebuild_tensor_v2, args)


def _crafted_zip(path: Path, numel: int, views: dict, record_bytes: int, compress: bool) -> Path:
    """A torch zip (torch.save's layout) with one float32 storage declaring ``numel``
    elements, tensors ``views`` {name: (size, stride)} on it, and a record of
    ``record_bytes`` zero bytes, stored or deflated (a few MB for a GiB), streamed."""
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({k: _View(storage, *v) for k, v in views.items()})
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        with z.open(info, "w", force_zip64=True) as f:
            chunk, left = bytes(1 << 20), record_bytes
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
    return path


GIB = 1 << 30
CASES = {  # name -> (declared elements, views, record bytes, compressed)
    "short_record": (GIB // 4, {"w": ((GIB // 4,), (1,))}, 16, False),
    "compressed_record": (GIB // 4, {"w": ((GIB // 4,), (1,))}, GIB, True),
    "repeated_views": (
        1024,
        {f"w{i}": ((GIB // 64,), (0,)) for i in range(16)},  # 16 x 64 MiB views of 4 KiB
        4096,
        False,
    ),
}


def _make_case(path: Path, name: str) -> Path:
    return _crafted_zip(path, *CASES[name])


# Linux keeps a process's peak RSS across fork + exec, so a child of a large pytest worker
# would report the worker's size: measure through a small fresh interpreter instead.
_MEASURE = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(f'\\n__maxrss_kib__ {usage.ru_maxrss}', flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _run_measured(cmd: list[str], **kw) -> tuple[int, str, int]:
    """(returncode, output, peak RSS in MiB) of one child process."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _, tail = proc.stdout.rpartition("__maxrss_kib__ ")
    return proc.returncode, out, int(tail.split()[0]) // 1024


def _stats_file(path: Path) -> Path:
    torch.manual_seed(0)
    stats = [react.task_statistics(torch.randn(20, 8), torch.randn(20, 8), beta=0.1) for _ in "ab"]
    react.save_statistics(stats, path, task_names=["a", "b"])
    return path


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tool", ["fold_checkpoint", "convert_task_vectors"])
def test_small_file_declaring_gigabytes_is_refused_before_allocating(tmp_path, case, tool):
    """A file of a few MB declaring 1 GiB of tensors: refused, naming the file, while the
    process stays near its import size (no gigabyte allocated)."""
    if tool == "fold_checkpoint":
        bad = _make_case(tmp_path / "bad.pt", case)
        cmd = [PY, "scripts/fold_checkpoint.py", "--stats", str(_stats_file(tmp_path / "s.st"))]
        cmd += ["--checkpoint", str(bad), "--model", "ViT-B-32", "--preference", "0.5,0.5"]
        cmd += ["--out", str(tmp_path / "out.safetensors")]
    else:
        (tmp_path / "src" / "MNIST").mkdir(parents=True)
        bad = _make_case(tmp_path / "src" / "zeroshot.pt", case)
        shutil.copy(bad, tmp_path / "src" / "MNIST" / "finetuned.pt")
        cmd = [PY, "scripts/convert_task_vectors.py", str(tmp_path / "src"), str(tmp_path / "dst")]
    assert bad.stat().st_size < 8 << 20
    rc, out, peak_mib = _run_measured(cmd)
    assert rc != 0
    assert f"{bad}: " in out and "refused before allocating anything" in out, out[-2000:]
    assert peak_mib < 900, f"peak RSS {peak_mib} MiB: the declared size was allocated"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob("dst/*.safetensors"))


def test_crafted_zips_are_real_torch_files(tmp_path):
    """The crafting is torch's format: a consistent one loads, through both readers."""
    good = _crafted_zip(tmp_path / "good.pt", 6, {"w": ((2, 3), (3, 1))}, 24, False)
    assert torch.equal(ckpt.load_torch_weights(good)["w"], torch.zeros(2, 3))
    assert torch.equal(ckpt.safe_torch_load(good)["w"], torch.zeros(2, 3))
    tied = _crafted_zip(tmp_path / "tied.pt", 6, {"a": ((6,), (1,)), "b": ((2, 3), (3, 1))}, 24, False)  # fmt: skip
    assert ckpt.safe_torch_load(tied)["b"].shape == (2, 3)  # views of one storage within budget


# ============================================================ 4. real disk full (tmpfs)
@contextlib.contextmanager
def _tmpfs(path: Path, size_bytes: int):
    path.mkdir(parents=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)):
        pytest.skip("needs root to mount a small tmpfs (a real full filesystem)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _suite_only(full: Path, dst: Path) -> Path:
    return Path(
        shutil.copytree(
            full,
            dst,
            ignore=lambda d, names: [n for n in names if Path(d) == full and n in PIPELINE_STAGES],
        )
    )


def test_full_cache_filesystem_is_reported_naming_the_folder(baseline, tmp_path):
    """The suite's units fill a tmpfs but for 16 KiB: the first pipeline unit's write fails
    for want of space, and the run says so, naming the cache stage folder."""
    with _tmpfs(tmp_path / "full", 256 << 20) as mnt:
        _suite_only(baseline[0], mnt / "cache")
        used = shutil.disk_usage(mnt).used  # then shrink the filesystem to what is used
        assert _mount("-o", f"remount,size={used + (16 << 10)}", str(mnt))
        proc = _pipeline(tmp_path, mnt / "cache", run_dir=tmp_path / "run")
        leftovers = list((mnt / "cache").glob("*/.tmp-*"))
    _fails_with(
        proc,
        rf"\[Errno 28\] disk full while writing the '\w+' cache unit under "
        rf"{re.escape(str(mnt / 'cache'))}/\w+: no space left",
    )
    assert leftovers == []


def test_full_run_folder_filesystem_is_reported_naming_the_folder(full_cache, tmp_path):
    """A warm cache, a run folder on a 96 KiB tmpfs: the tables do not fit."""
    with _tmpfs(tmp_path / "small", 96 << 10) as mnt:
        proc = _pipeline(tmp_path, full_cache, run_dir=mnt / "run")
    _fails_with(
        proc, rf"\[Errno 28\] disk full while writing [^\n]* under {re.escape(str(mnt))}/run"
    )


@pytest.mark.parametrize("writer", ["numpy", "pyarrow", "safetensors", "text"])
def test_every_writer_library_on_a_full_filesystem(tmp_path, writer):
    """The libraries lose or reword the errno; each failure is still a disk-full error."""
    import numpy as np
    import pandas as pd

    def compute(out: Path):
        big = np.random.default_rng(0).integers(0, 255, (1 << 20,), dtype=np.uint8)
        if writer == "numpy":
            np.save(out / "a.npy", big)
        elif writer == "pyarrow":
            pd.DataFrame({"x": big.astype(np.float64)}).to_parquet(out / "a.parquet")
        elif writer == "safetensors":
            save_file({"x": torch.from_numpy(big)}, str(out / "a.safetensors"))
        else:
            (out / "a.txt").write_bytes(big.tobytes())

    with _tmpfs(tmp_path / "m", 256 << 10) as mnt:
        cache = Cache(mnt / "cache")
        with pytest.raises(
            OSError, match=rf"disk full while writing .* under {re.escape(str(mnt))}"
        ):
            cache.unit("stage", {"w": writer}, compute)
        assert not list((mnt / "cache").glob("*/.tmp-*"))


# ============================================================ 6. lock waits
HOLDER = """
import fcntl, json, os, signal, subprocess, sys
from pathlib import Path
from pipeline.cache import Cache, _me
cache, stage, key, mode = sys.argv[1:5]
if mode == "gone":  # the recorded holder exits; a process it started keeps the lock's file open
    # (a raw flock: filelock closes its own descriptor in fork children, so a filelock holder's
    # lock always ends with it)
    path = Path(cache) / stage / f"{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    path.with_suffix(".holder").write_text(json.dumps(_me()))
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=[fd])
    print("held", flush=True)
    os._exit(0)
with Cache(cache).locked(stage, key):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.parametrize("mode", ["stopped", "gone"])
def test_lock_wait_names_the_holder_and_gives_up_when_it_is_stopped_or_gone(
    baseline, full_cache, tmp_path, mode
):
    stage, key = next((s, k) for s, k, e in baseline[2] if s == "sweep")
    shutil.rmtree(full_cache / stage / key)  # the run needs this unit; someone holds its lock
    holder = subprocess.Popen(
        [PY, "-c", HOLDER, str(full_cache), stage, key, mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        pid = json.loads((full_cache / stage / f"{key}.holder").read_text())["pid"]
        t0 = time.monotonic()
        proc = _pipeline(
            tmp_path,
            full_cache,
            run_dir=tmp_path / "run",
            env=_env(REACT_LOCK_POLL="0.3"),
            timeout=120,
        )
        waited = time.monotonic() - t0
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0 and waited < 60
    out = proc.stdout + proc.stderr
    assert f"its lock {full_cache / stage / key}.lock is held by pid {pid} on host" in out
    assert re.search(rf"gave up waiting for the 'sweep' cache unit {key}", out)
    assert f"which is {mode}" in out, out[-2000:]


def test_lock_wait_for_a_running_holder_says_who_and_then_proceeds(tmp_path):
    cache = Cache(tmp_path)
    holder = subprocess.Popen(
        [PY, "-c", "import sys, time\nfrom pipeline.cache import Cache\n"
         "with Cache(sys.argv[1]).locked('s', 'k'):\n    print('held', flush=True)\n    time.sleep(3)\n",
         str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("pipeline.cache").addHandler(handler)
    try:
        with cache.locked("s", "k"):
            pass
    finally:
        logging.getLogger("pipeline.cache").removeHandler(handler)
        holder.wait()
    assert any(f"held by pid {holder.pid} on host" in r and "(running)" in r for r in records)


# ============================================================ 7. multirun workers end with the launcher
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_joblib_workers_end_when_the_launcher_is_killed(baseline, tmp_path):
    suite = _suite_only(baseline[0], tmp_path / "cache")
    sweep = tmp_path / "multi"
    launcher = subprocess.Popen(
        [PY, "-m", "pipeline.main", "--multirun", "launcher=joblib", *FAST]
        + [
            "correction.beta=0.1,1.0",
            "fixed_methods=[surgery]",
            "baselines.surgery.steps=100000000",
        ]
        + [f"paths.output_dir={tmp_path}", f"paths.cache_dir={suite}", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # both jobs running (their logs exist)
            if all((sweep / j / "main.log").is_file() for j in "01"):
                break
            assert launcher.poll() is None, "the multirun ended early"
            time.sleep(0.5)
        time.sleep(3)
        workers = [
            p
            for p in _children(launcher.pid)
            if _alive(p) and "resource_tracker" not in _cmdline(p)
        ]
        assert len(workers) >= 2, workers
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.25)
        assert not [p for p in workers if _alive(p)], (
            "workers kept computing after their launcher died"
        )
    finally:
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log = "".join((sweep / j / "main.log").read_text() for j in "01")
    assert "the multirun launcher (pid" in log and "is gone: ending this job" in log


# ============================================================ 9. hostile and bad files
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hf_expert_folder_with_a_pickle_payload_names_file_and_expert(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "hf_expert"
    model = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8)
    )  # fmt: skip
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "PWNED"
    weights = folder / "pytorch_model.bin"
    torch.save({**model.state_dict(), "payload": _Evil(marker)}, weights)
    ref = ckpt.CheckpointRef("expert MNIST", "hf", str(folder))
    with pytest.raises(pickle.UnpicklingError) as err:
        ckpt.load_checkpoint(ref, {"proj": torch.zeros(16, 8)})
    message = str(err.value)
    assert message.startswith("expert MNIST (hf checkpoint): ") and str(weights) in message
    assert "posix.system" in message and "weights_only=False" not in message
    assert not marker.exists()


def _fold_cmd(tmp_path: Path, checkpoint: Path, config: Path) -> list[str]:
    return [PY, "scripts/fold_checkpoint.py", "--stats", str(_stats_file(tmp_path / "s.st")),
            "--checkpoint", str(checkpoint), "--model-config", str(config),
            "--preference", "0.5,0.5", "--out", str(tmp_path / "folded.safetensors")]  # fmt: skip


def _tiny_visual(tmp_path: Path) -> tuple[dict, Path]:
    import open_clip

    cfg = {
        "embed_dim": 8,
        "vision_cfg": {
            "image_size": 16,
            "patch_size": 8,
            "width": 16,
            "layers": 1,
            "head_width": 8,
        },
        "text_cfg": {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1},
    }
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**cfg).visual.state_dict().items()}
    return state, path


def test_fold_checkpoint_refuses_non_finite_weights(tmp_path):
    state, config = _tiny_visual(tmp_path)
    state["transformer.resblocks.0.mlp.c_fc.weight"][0, 0] = float("inf")
    save_file(state, str(tmp_path / "base.safetensors"))
    proc = subprocess.run(
        _fold_cmd(tmp_path, tmp_path / "base.safetensors", config),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "non-finite weights in 1 tensor(s) (transformer.resblocks.0.mlp.c_fc.weight)" in proc.stderr
    )
    assert not (tmp_path / "folded.safetensors").exists()


def test_tampered_safetensors_header_is_named(tmp_path):
    state, config = _tiny_visual(tmp_path)
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    raw = bytearray(path.read_bytes())
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    raw[8 : 8 + len(header)] = header.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    path.write_bytes(bytes(raw))
    proc = subprocess.run(
        _fold_cmd(tmp_path, path, config), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{path} is not a valid safetensors file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
