"""Collect the jobs of a --multirun (or several runs) into one table (used by
``scripts/collect.py`` and, at the end of every multirun, by ``pipeline.callbacks``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml


def job_rows(job: Path) -> list[dict]:
    summary = json.loads((job / "summary.json").read_text())
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    fixed = (
        "experiment=",
        "suite=",
        "backbone=",
        "paths.",
        "progress=",
        "num_threads=",
        "logger=",
        "hydra.",
    )
    swept = ",".join(o for o in overrides if not o.startswith(fixed))
    base = {"job": job.name, "overrides": swept, "merge": summary["merge"]["name"]}
    rows = []
    for label, d in summary["reference"].items():
        rows.append(
            {**base, "row": label, "metric": "average_accuracy", "value": 100 * d["average"]}
        )
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            rows.append(
                {
                    **base,
                    "row": f"{method} ({scenario})",
                    "metric": "average_accuracy",
                    "value": 100 * d["average"],
                }
            )
            rows.append(
                {
                    **base,
                    "row": f"{method} ({scenario})",
                    "metric": "normalized_accuracy",
                    "value": 100 * d["normalized_average"],
                }
            )
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            for metric, v in d.items():
                rows.append({**base, "row": method, "metric": f"{metric}{subset}", "value": v})
    return rows


def collect(folder: Path) -> pd.DataFrame:
    jobs = sorted({p.parent for p in folder.rglob("summary.json")}, key=lambda p: p.name)
    if not jobs:
        raise FileNotFoundError(f"no summary.json under {folder}; did the runs finish?")
    df = pd.DataFrame([r for j in jobs for r in job_rows(j)])
    per_job = df.groupby("job", sort=False).overrides.first().str.split(",")
    if len(per_job) > 1:  # show what was swept: drop the overrides every job shares
        common = set.intersection(*(set(o) for o in per_job))
        kept = {job: ",".join(o for o in ov if o not in common) for job, ov in per_job.items()}
        df["overrides"] = df.job.map(kept)
    return df


def to_markdown(df: pd.DataFrame) -> str:
    wide = df.pivot_table(
        index=["overrides", "row"], columns="metric", values="value", sort=False
    ).reset_index()
    cols = list(wide.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in wide.itertuples(index=False):
        lines.append(
            "| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |"
        )
    return "\n".join(lines)


def write_collected(folder: Path) -> str:
    """Write ``collected.csv`` and ``collected.md`` into ``folder``; returns the markdown."""
    df = collect(folder)
    md = to_markdown(df)
    df.to_csv(folder / "collected.csv", index=False)
    (folder / "collected.md").write_text(md + "\n")
    return md
