"""Every paper target of the Makefile runs end to end on the tiny offline suite.

The command of each target is taken from the Makefile itself (``make -n -o .venv/.installed
<target> SUITE=offline_tiny ARGS=...``: the exact line ``make <target>`` would run, without
re-checking the venv), then run as a subprocess with small overrides (two AdaMerging steps,
few preference points, short baseline training) and one cache folder shared by the whole
module, so the tiny suite is built once. Each test checks the target's artifacts and
recomputes headline numbers from the run's own tables (multiruns: through
``scripts/collect.py``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import TABLE1_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["mnist", "animals", "digits", "faces"]  # configs/suite/offline_tiny.yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make to read the Makefile"),
]

# overrides every target gets (the Hydra ones are also valid for the two scripts)
SMALL = [
    "logger=disabled",
    "progress=false",
    "num_threads=1",
    "preferences.simplex_step=0.25",
    "preferences.dirichlet_n=12",
    "preferences.pairwise_steps=5",
    "preferences.pairs=[[mnist,animals],[digits,faces]]",
    "++merge.steps=2",  # AdaMerging(++); '++' because a swept merge may have no 'steps'
    "++baselines.pareto_merging.steps=2",
    "++baselines.map.samples=8",
    "++baselines.map.pop_size=8",
    "++baselines.map.n_gen=3",
    "++baselines.surgery.steps=2",
]
SCRIPT_FLAGS = {
    "fig-cost": ["--n-prefs", "20", "--query-budget", "5"],
    "tsne": ["--max-per-task", "24"],
}
MULTIRUN = {  # target -> (experiment name, swept values)
    "table1": ("table1", 7),
    "ablation-beta": ("ablation_beta", 7),
    "ablation-data": ("ablation_data", 6),
    "ablation-aggregation": ("ablation_aggregation", 3),
}
SINGLE = {
    "table2": "table2",
    "fig-pairwise": "fig_pairwise",
    "fig-simplex": "fig_simplex",
    "compare": "compare",
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_cache) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("make_targets")
    return {"cache": tiny_cache(base / "cache"), "out": base / "out"}


def make_command(
    target: str, args: list[str], variables: tuple[str, ...] = ("SUITE=offline_tiny",)
) -> list[str]:
    """The command ``make <target> <variables>`` runs (argv), read with ``make -n``."""
    proc = subprocess.run(
        [
            "make",
            "-n",
            "-o",
            ".venv/.installed",
            target,
            *variables,
            f"PY={sys.executable}",
            f"ARGS={shlex.join(args)}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [
        ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith(("#", "make"))
    ]
    assert len(lines) == 1, f"expected one command for {target}, got {lines}"
    return shlex.split(lines[0])


def run_target(target: str, dirs: dict[str, Path]) -> subprocess.CompletedProcess:
    args = [
        *SMALL,
        f"paths.output_dir={dirs['out']}",
        f"paths.cache_dir={dirs['cache']}",
        *SCRIPT_FLAGS.get(target, []),
    ]
    cmd = make_command(target, args)
    assert "suite=offline_tiny" in cmd
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def latest(folder: Path) -> Path:
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert runs, f"nothing under {folder}"
    return runs[-1]


def check_run(job: Path, methods: list[str]) -> dict:
    """A finished run folder: tables finite, accuracies fractions, the summary's scenario
    averages equal to a recomputation from results.csv."""
    summary = json.loads((job / "summary.json").read_text())
    results = pd.read_csv(job / "results.csv")
    assert set(methods) <= set(results.method)
    assert np.isfinite(results.accuracy).all() and results.accuracy.between(0, 1).all()
    for method, scenarios in summary["scenarios"].items():
        if "equal" in scenarios:
            eq = results[(results.method == method) & (results.pref_set == "equal")]
            assert scenarios["equal"]["average"] == pytest.approx(eq.accuracy.mean(), abs=1e-5)
    reference = pd.read_csv(job / "reference.csv")
    assert (
        set(reference.label) >= {"pretrained", "expert"} and np.isfinite(reference.accuracy).all()
    )
    assert (job / "report.md").is_file()
    return summary


def collect(folder: Path) -> pd.DataFrame:
    proc = subprocess.run(
        [sys.executable, "scripts/collect.py", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "collected.md").is_file() and "## Table 1" in proc.stdout
    return pd.read_csv(folder / "collected.csv")


@pytest.mark.parametrize("target", list(MULTIRUN))
def test_multirun_target(target, dirs):
    experiment, n_jobs = MULTIRUN[target]
    run_target(target, dirs)
    sweep = latest(dirs["out"] / "multirun" / experiment)
    jobs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(jobs) == n_jobs
    # the multirun collected itself (pipeline.callbacks); scripts/collect.py rewrites the same table
    auto = pd.read_csv(sweep / "collected.csv")
    df = collect(sweep)
    pd.testing.assert_frame_equal(auto, df)
    assert np.isfinite(df.value).all()
    assert (
        df.job.nunique() == n_jobs and df.overrides.nunique() == n_jobs
    )  # one row set per swept value
    for job in jobs:
        check_run(job, ["react"])
        # collected value == 100 x the mean of that job's own equal-preference accuracies
        results = pd.read_csv(job / "results.csv")
        eq = results[(results.method == "react") & (results.pref_set == "equal")].accuracy.mean()
        got = df[
            (df.job.astype(str) == job.name)
            & (df.row == "react (equal)")
            & (df.metric == "accuracy")
            & (df.task == "average")
        ].value
        assert got.item() == pytest.approx(100 * eq, abs=1e-3)
    # the paper-shaped table: one row per swept value, in sweep order, and its plot
    table = pd.read_csv(sweep / ("table1.csv" if target == "table1" else "sweep.csv"))
    assert len(table) == n_jobs and table.iloc[:, 0].nunique() == n_jobs
    assert list((sweep / "plots").glob("sweep_*.png"))
    if target == "table1":
        assert list(table.columns) == ["merge", *TABLE1_COLUMNS]
        assert set(df["merge"]) == {
            "adamerging_pp",
            "adamerging",
            "ties",
            "task_arithmetic",
            "lot",
            "weight_average",
            "pretrained",
        }


@pytest.mark.parametrize("target", list(SINGLE))
def test_single_run_target(target, dirs):
    run_target(target, dirs)
    job = latest(dirs["out"] / "runs" / SINGLE[target])
    methods = {
        "table2": ["react", "pref_ta"],
        "fig_pairwise": ["react", "pref_ta"],
        "fig_simplex": ["react"],
        "compare": ["react", "pref_ta"],
    }[SINGLE[target]]
    summary = check_run(job, methods)
    plots = job / "plots"
    if target == "table2":
        assert summary["merge"]["name"] == "adamerging"
        fronts = pd.read_csv(job / "fronts.csv")
        for m in ("react", "pref_ta"):
            hv = fronts[(fronts.method == m) & (fronts.metric == "hypervolume")].value
            assert len(hv) == 2 and np.isfinite(hv).all() and (hv > 0).all()  # @3 and @all
        df = collect(job.parent)  # scripts/collect.py on a single run's folder
        assert np.isfinite(df.value).all() and {"react", "pref_ta"} <= set(df.row)
    if target == "fig-pairwise":
        assert (plots / "pairwise_fronts_accuracy.png").stat().st_size > 10_000
        results = pd.read_csv(job / "results.csv")
        assert {"pairwise:mnist|animals", "pairwise:digits|faces"} == set(results.pref_set)
        assert (results.groupby(["method", "pref_set"]).pref_id.nunique() == 5).all()
    if target == "fig-simplex":
        assert (plots / "simplex_react_simplex3_accuracy.png").stat().st_size > 10_000
        assert (plots / "simplex_react_simplex3_accuracy.pdf").is_file()
    if target == "compare":
        results = pd.read_csv(job / "results.csv")
        assert len(set(results.method)) >= 2


def test_fig_cost(dirs):
    proc = run_target("fig-cost", dirs)
    out = latest(dirs["out"] / "cost_vs_tasks")
    s = pd.read_csv(out / "cost_summary.csv")
    assert sorted(s.n_tasks) == [2, 3, 4]
    assert (
        np.isfinite(s[["merge_seconds", "offline_seconds", "answer_seconds", "total_seconds"]])
        .all()
        .all()
    )
    assert (s.offline_seconds > 0).all() and (s.answer_seconds > 0).all()
    np.testing.assert_allclose(s.total_seconds, s.offline_seconds + s.answer_seconds)
    assert (s.answered == 20).all() and not s.extrapolated.any()
    # forward passes of ReACT's fit: merged + expert on 10% (calibration.size) of each test split
    sizes = []
    for t in TASKS:
        labels = _labels_of_tiny_split(dirs["cache"], t)
        sizes.append(max(1, round(0.1 * len(labels))))
    for r in s.itertuples():
        assert r.forward_passes == 2 * sum(sizes[: r.n_tasks])
    assert (out / "cost.png").stat().st_size > 10_000 and (out / "cost.pdf").is_file()
    assert "| react | 4 |" in proc.stdout


def _labels_of_tiny_split(cache: Path, task: str) -> np.ndarray:
    """Test labels of a task of the tiny suite, read from the shared cache (built by now)."""
    from hydra import compose, initialize_config_dir

    from pipeline.cache import Cache
    from pipeline.main import CONFIG_DIR, load_suite

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["suite=offline_tiny", "progress=false"])
    c = Cache(cache)
    suite = load_suite(cfg, c)
    assert c.events and all(e[2] == "hit" for e in c.events)  # the targets built it already
    return suite.split(task, "test")[1]


def test_tsne(dirs):
    run_target("tsne", dirs)
    out = latest(dirs["out"] / "tsne")
    pts = pd.read_csv(out / "tsne_points.csv")
    assert set(pts.model) == {"expert", "merged", "ReACT one-hot", "ReACT equal"} and set(
        pts.task
    ) == set(TASKS)
    assert np.isfinite(pts[["task_x", "task_y", "joint_x", "joint_y"]]).all().all()
    counts = pts.groupby(["task", "model"]).size()
    assert (
        counts.nunique() == 1 or counts.groupby(level=0).nunique().eq(1).all()
    )  # same images per model
    assert counts.max() <= 24
    for stem in ("tsne_by_task", "tsne_by_model"):
        assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.pdf").is_file()
    assert math.isfinite(pts.joint_x.std()) and pts.joint_x.std() > 0
