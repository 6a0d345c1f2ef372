"""What a researcher compares: the W&B runs, the collected tables and the completion marker,
all through the real command line (``python -m pipeline.main --multirun``,
``scripts/collect.py``) on the tiny offline suite.

- W&B (offline run files read back): one run per method per job, group = experiment (an
  ad-hoc sweep: ``sweep-<time>``), job_type = method, tags and name with the swept value,
  the same percent keys for every method, equal to the run's own summary.json; a failed
  job logs a run with exit code 1.
- collect: the paper's table shapes, values equal to each job's summary; jobs that differ
  only in ``num_threads=`` stay two rows; two multiruns in one folder stay apart; a failed
  job still gives collected tables naming it and the jobs never started.
- completion: ``run_complete.json`` is the last file written; a rerun into a used folder
  removes the old outputs first, so collect never reads a stale summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tiny import FAST, TABLE1_COLUMNS, TABLE2_COLUMNS
from wandb_files import read_runs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
BASE = [o for o in FAST if not o.startswith("logger=")]
SCENARIO_KEYS = ("equal", "priority", "one_hot")


def pipeline(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.main", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def collect_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/collect.py", str(folder)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_cache) -> Path:
    return tiny_cache(tmp_path_factory.mktemp("cache"))  # the suite built once per session


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache) -> Path:
    """An ad-hoc multirun over beta, three methods, W&B offline."""
    out = tmp_path_factory.mktemp("sweep")
    pipeline(
        "--multirun",
        *BASE,
        "logger=wandb_offline",
        "methods=[react,pref_ta]",
        "fixed_methods=[surgery]",
        "++baselines.surgery.steps=2",
        "preferences.sets=[equal,priority,one_hot,simplex3,grid]",  # @3 and @all, no pairwise
        f"paths.output_dir={out}",
        f"paths.cache_dir={cache}",
        f"hydra.sweep.dir={out / 'sweep'}",
        "correction.beta=0.1,1",
    )
    return out / "sweep"


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def test_wandb_one_run_per_method_with_the_same_percent_keys(sweep):
    for num, beta in (("0", "0.1"), ("1", "1")):
        job = sweep / num
        s = summary(job)
        tasks = s["tasks"]
        runs = {r.job_type: r for r in read_runs(job)}
        assert sorted(runs) == ["pref_ta", "react", "surgery"]  # one run per method
        for method, run in runs.items():
            assert run.exit_code == 0
            assert run.group == f"sweep-{sweep.name}"  # an ad-hoc sweep is its own group
            assert run.name == f"{method}-task_arithmetic-correction.beta={beta}"
            assert {method, "merge=task_arithmetic", f"correction.beta={beta}"} <= set(run.tags)
            assert (
                run.config["method"] == method and run.config["merge"]["name"] == "task_arithmetic"
            )
            assert run.config["correction"]["beta"] == float(beta)
            m = run.summary
            for sc in SCENARIO_KEYS:
                assert m[f"{sc}/avg_acc"] == pytest.approx(
                    100 * s["scenarios"][method][sc]["average"]
                )
                for t in tasks:
                    assert m[f"{sc}/acc/{t}"] == pytest.approx(100 * s["scenarios"][method][sc][t])
            merged = next(v for k, v in s["reference"].items() if k.startswith("merged"))
            assert m["merged/avg_acc"] == pytest.approx(100 * merged["average"])
            assert m["expert/avg_acc"] == pytest.approx(100 * s["reference"]["expert"]["average"])
            types = {t for _, t, _ in run.artifacts}
            assert "run-tables" in types
        for method in ("react", "pref_ta"):  # controllable: fronts in percent
            m, fr = runs[method].summary, s["fronts"][method]
            for sub in ("@3", "@all"):
                assert m[f"hv{sub}"] == pytest.approx(fr[sub]["hypervolume"])
                assert m[f"u{sub}"] == pytest.approx(100 * fr[sub]["uniformity"])
        keys = {
            m: {k for k in r.summary if not k.startswith(("_", "cost/", "time/"))}
            for m, r in runs.items()
        }
        assert keys["react"] - {"preferences"} == keys["pref_ta"] - {"preferences"}
        assert {"hv@3", "hv@all", "u@3", "u@all", "merged/avg_acc"} <= keys["react"]
        assert keys["surgery"] - {"preferences"} <= keys["react"]
        assert any(t == "statistics" for _, t, _ in runs["react"].artifacts)
        # the per-preference table: weights and accuracies per preference, for a scatter panel
        (table,) = (runs["react"].folder / "files" / "media" / "table").glob(
            "preferences_*.table.json"
        )
        t = json.loads(table.read_text())
        df = pd.DataFrame(t["data"], columns=t["columns"])
        assert len(df) == sum(s["preference_sets"].values())
        results = pd.read_csv(job / "results.csv")
        r = results[results.method == "react"]
        for task in tasks:
            # NaN where a set is not scored on the task (a pairwise panel of two other tasks)
            got = df.set_index(["pref_set", "pref_id"])[f"acc_{task}"].dropna()
            want = 100 * r[r.task == task].set_index(["pref_set", "pref_id"]).accuracy
            pd.testing.assert_series_equal(
                got.sort_index(), want.sort_index(), check_names=False, atol=1e-4
            )
            assert {f"p_{task}", f"norm_{task}"} <= set(df.columns)


def test_collected_tables_have_the_paper_shape(sweep):
    proc = collect_cli(sweep)
    assert proc.returncode == 0, proc.stderr
    t1 = pd.read_csv(sweep / "table1.csv")
    assert list(t1.columns) == ["correction.beta", *TABLE1_COLUMNS]
    # sweep order, one row per job and method
    assert list(t1["correction.beta"]) == [0.1] * 3 + [1] * 3
    t2 = pd.read_csv(sweep / "table2.csv")
    assert list(t2.columns) == ["correction.beta", *TABLE2_COLUMNS]
    assert sorted(t2.method.unique()) == ["pref_ta", "react"]  # controllable methods only
    sweep_t = pd.read_csv(sweep / "sweep.csv")
    for num, beta in (("0", 0.1), ("1", 1)):
        s = summary(sweep / num)
        row = t1[(t1["correction.beta"] == beta) & (t1.method == "react")].iloc[0]
        assert row["equal"] == pytest.approx(100 * s["scenarios"]["react"]["equal"]["average"])
        assert row["one-hot"] == pytest.approx(100 * s["scenarios"]["react"]["one_hot"]["average"])
        assert row["expert"] == pytest.approx(100 * s["reference"]["expert"]["average"])
        row2 = t2[(t2["correction.beta"] == beta) & (t2.method == "react")].iloc[0]
        assert row2["HV@3"] == pytest.approx(s["fronts"]["react"]["@3"]["hypervolume"])
        assert row2["U@all"] == pytest.approx(100 * s["fronts"]["react"]["@all"]["uniformity"])
        srow = sweep_t[(sweep_t["correction.beta"] == beta) & (sweep_t.method == "react")].iloc[0]
        assert srow["HV@all"] == pytest.approx(s["fronts"]["react"]["@all"]["hypervolume"])
    tasks = summary(sweep / "0")["tasks"]
    per_task = pd.read_csv(sweep / "table1_tasks.csv")
    assert list(per_task.columns) == ["correction.beta", "model", *tasks, "avg"]
    md = (sweep / "collected.md").read_text()
    assert "## Table 1" in md and "## Table 2" in md and "nan" not in md
    assert (sweep / "plots" / "sweep_correction.beta.png").stat().st_size > 10_000


def test_marker_is_the_last_file_of_a_run(sweep):
    for job in (sweep / "0", sweep / "1"):
        marker = job / "run_complete.json"
        files = json.loads(marker.read_text())["files"]
        assert {"summary.json", "results.csv", "report.md"} <= set(files)
        written = [job / f for f in files] + list(job.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(written) == len(files) + 3  # and one W&B run file per method
        assert marker.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in written)


def test_failed_job_still_gives_tables_naming_failed_and_missing_jobs(tmp_path, cache, sweep):
    """Jobs 2 and 3 fail after the suite is built (a calibration count larger than a split;
    the basic launcher runs every job, then Hydra skips on_multirun_end); jobs 0 and 1
    differ only in num_threads= and stay two rows (they were once averaged into one)."""
    base = [o for o in BASE if not o.startswith("num_threads=")]
    sweep_dir = tmp_path / "sweep"
    proc = pipeline(
        "--multirun",
        *base,
        "logger=wandb_offline",
        "preferences.sets=[equal,priority,one_hot]",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache}",  # built by the sweep fixture
        f"hydra.sweep.dir={sweep_dir}",
        "calibration.size=0.1,100000",
        "num_threads=1,2",
        ok=False,
    )
    assert proc.returncode != 0
    md = (sweep_dir / "collected.md").read_text()
    assert "Collected 2 complete job(s) of 4." in md
    for num in ("2", "3"):
        assert f"`{num}` failed: ValueError: calibration.size=100000 is larger than" in md
    t1 = pd.read_csv(sweep_dir / "table1.csv")
    assert list(t1[["calibration.size", "num_threads"]].itertuples(index=False, name=None)) == [
        (0.1, 1),
        (0.1, 2),
    ]
    # the failed job: run_failed.json, no marker, and a W&B run with exit code 1
    assert not (sweep_dir / "2" / "run_complete.json").exists()
    assert (
        "calibration.size" in json.loads((sweep_dir / "2" / "run_failed.json").read_text())["error"]
    )
    (failed,) = read_runs(sweep_dir / "2")
    assert failed.exit_code == 1 and failed.job_type == "pipeline" and "failed" in failed.tags
    assert [r.exit_code for r in read_runs(sweep_dir / "0")] == [0]
    # scripts/collect.py says the same, on stderr, and still exits 0 (two jobs collected)
    cli = collect_cli(sweep_dir)
    assert cli.returncode == 0, cli.stderr
    assert "`2` failed" in cli.stderr and "`3` failed" in cli.stderr


def test_a_job_with_a_bad_config_is_named_failed(tmp_path, cache, sweep):
    """A job rejected by validation (before any folder output or W&B run) is still a
    failed job of the sweep, with its error, not an unexplained incomplete folder."""
    sweep_dir = tmp_path / "sweep"
    proc = pipeline(
        "--multirun",
        *BASE,
        "logger=disabled",
        "preferences.sets=[equal,priority,one_hot]",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache}",
        f"hydra.sweep.dir={sweep_dir}",
        "correction.beta=0.2,-1",
        ok=False,
    )
    assert proc.returncode != 0
    md = (sweep_dir / "collected.md").read_text()
    assert "Collected 1 complete job(s) of 2." in md
    assert "`1` failed: ConfigError: correction.beta=-1: must be a number in [0, inf]" in md


def test_two_multiruns_in_one_folder_stay_apart(tmp_path, sweep):
    """Two sweeps of the same overrides under one experiment folder: four jobs, never
    merged by job number; a job whose summary.json is not the one its marker records (a
    stale folder) is named and not read."""
    exp = tmp_path / "ablation"
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        shutil.copytree(
            sweep, exp / name, ignore=shutil.ignore_patterns("wandb", "collected*", "table*")
        )
    stale = exp / "2026-01-02_00-00-00" / "1" / "summary.json"
    s = json.loads(stale.read_text())
    s["scenarios"]["react"]["equal"]["average"] = 0.0
    stale.write_text(json.dumps(s))
    proc = collect_cli(exp)
    assert proc.returncode == 0, proc.stderr
    t1 = pd.read_csv(exp / "table1.csv")
    react = t1[t1.method == "react"]
    assert list(react.job) == [
        "2026-01-01_00-00-00/0",
        "2026-01-01_00-00-00/1",
        "2026-01-02_00-00-00/0",
    ]
    assert (react.equal > 0).all()
    assert (
        "`2026-01-02_00-00-00/1` incomplete: summary.json is missing or not the one" in proc.stderr
    )


def test_rerun_into_a_used_folder_removes_its_old_outputs_first(tmp_path, cache, sweep):
    """A complete run folder reused by a run that fails after its config was accepted: the
    old summary, tables and marker are gone before anything else happens; reused by a run
    whose config is rejected: the folder is marked failed. Collect reads neither."""
    for name, bad, removed in (
        ("late", "calibration.size=100000", True),
        ("bad_config", "correction.beta=-1", False),
    ):
        run = tmp_path / name
        shutil.copytree(sweep / "0", run, ignore=shutil.ignore_patterns("wandb"))
        assert (run / "summary.json").exists() and (run / "run_complete.json").exists()
        proc = pipeline(
            *BASE,
            "logger=disabled",
            "preferences.sets=[equal,priority,one_hot]",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={cache}",
            f"hydra.run.dir={run}",
            bad,
            ok=False,
        )
        assert proc.returncode != 0 and bad.split("=")[0] in proc.stderr
        left = {p.name for p in run.iterdir()}
        assert "run_complete.json" not in left and "run_failed.json" in left
        if removed:
            assert not left & {"summary.json", "results.csv", "fronts.csv", "report.md", "plots"}
        cli = collect_cli(run)
        assert cli.returncode == 1 and "failed" in cli.stderr
