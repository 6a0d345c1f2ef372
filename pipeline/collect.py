"""Collect finished runs into the paper's tables (``scripts/collect.py`` and, at the end of
every multirun or when one of its jobs fails, ``pipeline.callbacks``).

A job (one run folder) is read only when it is **complete**: its ``run_complete.json``
(written last by a successful run, ``pipeline.report.mark_complete``) exists and records
the sha256 of the ``summary.json`` beside it. Every other job is listed, never read:
``failed`` (``run_failed.json``: the error), ``incomplete`` (no marker: still running,
killed, or a stale folder) or ``missing`` (a job of a multirun's sweep with no folder:
never started because an earlier job failed).

Jobs are keyed by their folder relative to the collected folder (``<sweep>/<num>``), so
several multiruns in one folder never merge, and labelled by every override that differs
between them (``suite=``, ``backbone=`` included); no two jobs are ever averaged into one
row. Tables (percent for accuracies, HV and U; alignment is a Pearson r):

- ``table1``: one row per job and method: merged, equal, priority, one-hot, expert average
  accuracy (the paper's Table 1); ``table1_tasks``: the same per task;
- ``table2``: one row per job and controllable method: HV@3, HV@all, U@3, U@all and
  alignment (the paper's Table 2);
- ``sweep``: one row per swept value: the headline numbers of both (the ablations).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from .cache import atomic_write_text
from .report import FAILED, MARKER, file_sha256

SCENARIOS = {"equal": "equal", "priority": "priority", "one_hot": "one-hot"}
FRONT_COLUMNS = {  # (summary metric, subset) -> column
    ("hypervolume", "@3"): "HV@3",
    ("hypervolume", "@all"): "HV@all",
    ("uniformity", "@3"): "U@3",
    ("uniformity", "@all"): "U@all",
    ("preference_alignment", "@3"): "align@3",
    ("preference_alignment", "@all"): "align@all",
}
PERCENT = {"uniformity"}  # summary fractions shown in percent (HV is already x100)


@dataclass
class Job:
    folder: Path
    key: str  # folder relative to the collected folder ("." for a run folder itself)
    overrides: list[str] = field(default_factory=list)
    status: str = "complete"  # complete | failed | incomplete | missing
    reason: str = ""
    summary: dict | None = None
    swept: dict[str, str] = field(default_factory=dict)  # overrides that differ between jobs

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.swept.items())


def read_job(folder: Path, key: str) -> Job:
    """One run folder: complete (summary read) or why not."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = (
        yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else None
    ) or []
    job = Job(folder, key, [str(o) for o in overrides])
    marker = folder / MARKER
    if (folder / FAILED).exists():
        job.status = "failed"
        job.reason = json.loads((folder / FAILED).read_text()).get("error", "failed")
        return job
    if not marker.exists():
        job.status = "incomplete"
        job.reason = f"no {MARKER}: still running, killed, or written before this version"
        return job
    try:
        expected = json.loads(marker.read_text()).get("files", {}).get("summary.json")
    except (ValueError, AttributeError):
        expected = None  # an unreadable marker completes nothing
    summary = folder / "summary.json"
    if not summary.exists() or file_sha256(summary) != expected:
        job.status = "incomplete"
        job.reason = f"summary.json is missing or not the one {MARKER} records (a stale folder)"
        return job
    job.summary = json.loads(summary.read_text())
    return job


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def sweep_overrides(sweep: Path) -> list:
    """The parsed overrides a multirun expands (``multirun.yaml``: the sweeper's params,
    then the command line's), in the basic sweeper's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = yaml.safe_load((Path(sweep) / "multirun.yaml").read_text())["hydra"]
    params = [f"{k}={v}" for k, v in (cfg["sweeper"].get("params") or {}).items()]
    return OverridesParser.create().parse_overrides(params + list(cfg["overrides"]["task"]))


def expected_jobs(sweep: Path) -> list[list[str]] | None:
    """The overrides of every job a multirun's sweep launches, in job-number order (the
    basic sweeper's expansion of ``multirun.yaml``); None when it cannot be recomputed."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        subdir = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["sweep"]["subdir"]
        if str(subdir) != "${hydra.job.num}":
            return None
        batches = BasicSweeper.split_arguments(sweep_overrides(sweep), None)
        return [list(job) for batch in batches for job in batch]
    except Exception:  # noqa: BLE001 - another sweeper or a hand-made file: list what exists
        return None


def find_jobs(folder: Path) -> list[Job]:
    """Every job under ``folder`` (a run folder, a multirun folder, or a folder of either),
    in sweep order, with the missing jobs of each multirun."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a run or multirun folder")
    found = {
        p.parent
        for pattern in (".hydra", MARKER, FAILED, "summary.json")
        for p in folder.rglob(pattern)
    }
    jobs = {p: read_job(p, p.relative_to(folder).as_posix()) for p in found}
    for sweep in folder.rglob("multirun.yaml"):
        for num, overrides in enumerate(expected_jobs(sweep.parent) or []):
            job_dir = sweep.parent / str(num)
            if job_dir not in jobs:
                jobs[job_dir] = Job(
                    job_dir,
                    job_dir.relative_to(folder).as_posix(),
                    overrides,
                    "missing",
                    "never started (an earlier job of the sweep failed, or it was cut short)",
                )
    out = sorted(jobs.values(), key=lambda j: _natural(j.key))
    _label(out)
    return out


def _label(jobs: list[Job]) -> None:
    """Set each job's ``swept``: the overrides (key -> value) not shared by every job."""
    parsed = [
        {k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in j.overrides if "=" in o)}
        for j in jobs
    ]
    keys = [
        k
        for k in dict.fromkeys(k for d in parsed for k in d)
        if not k.startswith("hydra.") and len({d.get(k) for d in parsed}) > 1
    ]
    for job, d in zip(jobs, parsed, strict=True):
        job.swept = {k: d.get(k, "(default)") for k in keys}
    labels = [j.label for j in jobs]
    for j in jobs:  # two jobs with the same overrides (two multiruns): the folder tells them apart
        if labels.count(j.label) > 1:
            j.swept = {"job": j.key, **j.swept}


def long_rows(job: Job) -> list[dict]:
    """A complete job's numbers, one row per (row, metric): the long ``collected.csv``."""
    s = job.summary
    base = {
        "job": job.key,
        "overrides": job.label,
        "all_overrides": ",".join(job.overrides),
        "suite": s["suite"],
        "backbone": s.get("backbone"),
        "merge": s["merge"]["name"],
    }
    rows = []
    for label, d in s["reference"].items():
        ref = "merged" if label.startswith("merged") else label
        for task in [*s["tasks"], "average"]:
            if task in d:
                rows.append({**base, "method": ref, "scenario": "", "row": label, "task": task})
                rows[-1].update(metric="accuracy", value=100 * d[task])
    for method, sc in s["scenarios"].items():
        for scenario, d in sc.items():
            for task in [*s["tasks"], "average"]:
                row = {**base, "method": method, "scenario": scenario, "task": task}
                rows.append({**row, "row": f"{method} ({scenario})", "metric": "accuracy"})
                rows[-1]["value"] = 100 * d[task]
            rows.append({**row, "row": f"{method} ({scenario})", "metric": "normalized_accuracy"})
            rows[-1].update(task="average", value=100 * d["normalized_average"])
    for method, fr in s["fronts"].items():
        for subset, d in fr.items():
            for metric, v in d.items():
                value = 100 * v if metric in PERCENT else v
                rows.append({**base, "method": method, "scenario": "", "row": method, "task": ""})
                rows[-1].update(metric=f"{metric}{subset}", value=value)
    return rows


@dataclass
class Collected:
    jobs: list[Job]
    long: pd.DataFrame
    tables: dict[str, pd.DataFrame]

    @property
    def skipped(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "complete"]


def _swept_columns(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(k for j in jobs for k in j.swept))


def paper_tables(jobs: list[Job]) -> dict[str, pd.DataFrame]:
    """Table 1, its per-task form, Table 2 and the sweep table from complete jobs."""
    cols = _swept_columns(jobs)
    t1, t1_tasks, t2 = [], [], []
    for job in jobs:
        s, keys = job.summary, {c: job.swept.get(c, "") for c in cols}
        merged = next((d for k, d in s["reference"].items() if k.startswith("merged")), {})
        expert = s["reference"].get("expert", {})
        for label, d in s["reference"].items():
            name = "merged" if label.startswith("merged") else label
            t1_tasks.append(
                {**keys, "model": f"{name} ({s['merge']['name']})" if name == "merged" else name}
            )
            t1_tasks[-1].update(
                {t: 100 * d[t] for t in s["tasks"] if t in d}, avg=100 * d["average"]
            )
        for method, sc in s["scenarios"].items():
            row = {**keys, "method": method, "merged": 100 * merged.get("average", math.nan)}
            for scenario, name in SCENARIOS.items():
                row[name] = 100 * sc[scenario]["average"] if scenario in sc else math.nan
            row["expert"] = 100 * expert.get("average", math.nan)
            t1.append(row)
            for scenario, d in sc.items():
                t1_tasks.append(
                    {**keys, "model": f"{method} ({SCENARIOS.get(scenario, scenario)})"}
                )
                t1_tasks[-1].update({t: 100 * d[t] for t in s["tasks"]}, avg=100 * d["average"])
        for method, fr in s["fronts"].items():
            row = {**keys, "method": method}
            for (metric, subset), name in FRONT_COLUMNS.items():
                v = fr.get(subset, {}).get(metric, math.nan)
                row[name] = 100 * v if metric in PERCENT else v
            t2.append(row)
    tables = {
        "table1": pd.DataFrame(t1),
        "table1_tasks": pd.DataFrame(t1_tasks),
        "table2": pd.DataFrame(t2),
    }
    if cols and not tables["table1"].empty:
        on = [*cols, "method"]
        acc = tables["table1"].drop(columns=["expert"])
        fronts = tables["table2"][[*on, "HV@3", "HV@all", "U@3", "U@all"]] if t2 else None
        tables["sweep"] = acc.merge(fronts, on=on, how="left", sort=False) if t2 else acc
    return {k: v for k, v in tables.items() if not v.empty}


def collect(folder: Path) -> Collected:
    jobs = find_jobs(folder)
    complete = [j for j in jobs if j.status == "complete"]
    long = pd.DataFrame([r for j in complete for r in long_rows(j)])
    return Collected(jobs, long, paper_tables(complete) if complete else {})


TITLES = {
    "table1": "Table 1: average accuracy (%) at each preference scenario",
    "table1_tasks": "Table 1, per task: accuracy (%)",
    "table2": "Table 2: Pareto-front metrics (HV and U in %, alignment: Pearson r)",
    "sweep": "Sweep: headline numbers per swept value (%)",
}


def md_table(df: pd.DataFrame) -> str:
    def cell(c, v):
        if isinstance(v, float):
            return (
                ""
                if math.isnan(v)
                else f"{v:.2f}"
                if c.startswith(("HV", "U@", "align"))
                else f"{v:.1f}"
            )
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += [
        "| " + " | ".join(cell(c, v) for c, v in zip(df.columns, r, strict=True)) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def skipped_lines(jobs: list[Job]) -> list[str]:
    return [
        f"- `{j.key}` {j.status}: {j.reason} (overrides: {','.join(j.overrides) or 'none'})"
        for j in jobs
    ]


def to_markdown(c: Collected) -> str:
    n = sum(j.status == "complete" for j in c.jobs)
    out = [f"Collected {n} complete job(s) of {len(c.jobs)}."]
    if c.skipped:
        out += ["", "## Jobs not collected", "", *skipped_lines(c.skipped)]
    for name, df in c.tables.items():
        out += ["", f"## {TITLES[name]}", "", md_table(df)]
    return "\n".join(out) + "\n"


def write_collected(folder: Path) -> Collected:
    """Write ``collected.{csv,md}``, the paper tables (``table1.csv`` ...) and the sweep
    plots into ``folder``, even when some jobs failed; returns what was collected."""
    folder = Path(folder)
    c = collect(folder)
    atomic_write_text(folder / "collected.md", to_markdown(c))
    atomic_write_text(folder / "collected.csv", c.long.to_csv(index=False))
    for name, df in c.tables.items():
        atomic_write_text(folder / f"{name}.csv", df.to_csv(index=False))
    if "sweep" in c.tables:
        from evaluation import plots

        swept = [
            k for k in _swept_columns([j for j in c.jobs if j.status == "complete"]) if k != "job"
        ]
        if len(swept) == 1:
            plots.plot_sweep(c.tables["sweep"], swept[0], folder / "plots")
    return c
