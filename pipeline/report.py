"""The report stage: result tables (CSV + parquet), a JSON summary, plots and report.md.

Everything in ``summary.json`` and the tables is deterministic for a given config (no
timings, no paths), so two runs of one config give byte-identical files; wall times and
costs go to ``timings.json`` and ``cost.csv``.

summary.json schema (``"schema": "react-merging/summary/v1"``)::

    {schema, suite, backbone, tasks, tasks3, seed, merge{...}, correction{...},
     calibration{source, split, size, counts{task: n}, overlaps_evaluation, note},
     reference{label: {task: accuracy, ..., average}},          # pretrained, merged, expert
     scenarios{method: {scenario: {task: accuracy, ..., average, normalized_average}}},
     fronts{method: {"@3"|"@all": {hypervolume, uniformity, preference_alignment}}},
     metric_notes{hypervolume, uniformity, preference_alignment}}
Accuracies are fractions in [0, 1]; hypervolume is x100 of normalised accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .cache import atomic_write, atomic_write_text

SCHEMA = "react-merging/summary/v1"


def write_table(df: pd.DataFrame, run_dir: Path, name: str) -> None:
    """``<name>.csv`` and ``<name>.parquet``, each written atomically under a temporary name
    unique to this writer (two runs writing one folder never share a temporary file)."""
    atomic_write(
        run_dir / f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False, float_format="%.6f")
    )
    atomic_write(run_dir / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False))


def build_summary(
    meta: dict, reference: pd.DataFrame, scenarios: pd.DataFrame, fronts: pd.DataFrame
) -> dict:
    ref = {}
    for label, df in reference.groupby("label", sort=False):
        ref[label] = {r.task: round(float(r.accuracy), 6) for r in df.itertuples()}
        ref[label]["average"] = round(float(df.accuracy.mean()), 6)
    scen: dict = {}
    for r in scenarios.itertuples():
        d = scen.setdefault(r.method, {}).setdefault(r.scenario, {})
        d[r.task] = round(float(r.accuracy), 6)
        if r.task == "average":
            d["normalized_average"] = round(float(r.normalized_accuracy), 6)
    fr: dict = {}
    notes = {}
    for r in fronts.itertuples():
        fr.setdefault(r.method, {}).setdefault(r.subset, {})[r.metric] = round(float(r.value), 6)
        notes[r.metric] = r.how
    return {
        "schema": SCHEMA,
        **meta,
        "reference": ref,
        "scenarios": scen,
        "fronts": fr,
        "metric_notes": notes,
    }


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=False))


def markdown_report(
    summary: dict,
    scenarios: pd.DataFrame,
    fronts: pd.DataFrame,
    reference: pd.DataFrame,
    cost: pd.DataFrame,
    command: str,
) -> str:
    tasks = summary["tasks"]
    lines = [
        f"# ReACT run: suite `{summary['suite']}`, merge `{summary['merge']['name']}`",
        "",
        f"Command: `{command}`",
        "",
        f"Seed: {summary['seed']} (calibration subset seed {summary['calibration']['seed']})",
        "",
        f"Calibration: {summary['calibration']['note']}",
        "",
        "## Accuracy (%) per task",
        "",
        "| model | " + " | ".join(tasks) + " | avg |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for label, df in reference.groupby("label", sort=False):
        acc = {r.task: r.accuracy for r in df.itertuples()}
        cells = [f"{100 * acc[t]:.1f}" if t in acc else "" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * df.accuracy.mean():.1f} |")
    for (method, scenario), df in (
        scenarios.groupby(["method", "scenario"], sort=False) if not scenarios.empty else ()
    ):
        acc = {r.task: r.accuracy for r in df.itertuples()}
        cells = [f"{100 * acc[t]:.1f}" for t in tasks]
        lines.append(
            f"| {method} ({scenario}) | " + " | ".join(cells) + f" | {100 * acc['average']:.1f} |"
        )
    if not fronts.empty:
        lines += [
            "",
            "## Pareto-front metrics",
            "",
            "| method | subset | metric | value | how | points |",
            "|---|---|---|---|---|---|",
        ]
        for r in fronts.itertuples():
            lines.append(
                f"| {r.method} | {r.subset} | {r.metric} | {r.value:.2f} | {r.how} | {r.n_points} |"
            )
    if not cost.empty:
        lines += ["", "## Cost (this run; wall time, not deterministic)", "", md_table(cost)]
    return "\n".join(lines) + "\n"


def md_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A plain markdown table (no extra dependency)."""
    cells = [
        [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        for row in df.itertuples(index=False)
    ]
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    return head + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in cells)
