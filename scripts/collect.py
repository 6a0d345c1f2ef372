"""Collect the jobs of a --multirun (or several runs) into one table.

    python scripts/collect.py outputs/multirun/table1/<time>      # a multirun folder
    python scripts/collect.py --latest table1                     # newest multirun of an experiment

Reads each job's summary.json and Hydra overrides; writes collected.csv and collected.md
beside the jobs and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml


def job_rows(job: Path) -> list[dict]:
    summary = json.loads((job / "summary.json").read_text())
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    fixed = ("experiment=", "suite=", "backbone=", "paths.", "progress=", "num_threads=", "logger=", "hydra.")
    swept = ",".join(o for o in overrides if not o.startswith(fixed))
    base = {"job": job.name, "overrides": swept, "merge": summary["merge"]["name"]}
    rows = []
    for label, d in summary["reference"].items():
        rows.append({**base, "row": label, "metric": "average_accuracy", "value": 100 * d["average"]})
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            rows.append({**base, "row": f"{method} ({scenario})", "metric": "average_accuracy", "value": 100 * d["average"]})
            rows.append({**base, "row": f"{method} ({scenario})", "metric": "normalized_accuracy", "value": 100 * d["normalized_average"]})
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            for metric, v in d.items():
                rows.append({**base, "row": method, "metric": f"{metric}{subset}", "value": v})
    return rows


def collect(folder: Path) -> pd.DataFrame:
    jobs = sorted({p.parent for p in folder.rglob("summary.json")}, key=lambda p: p.name)
    if not jobs:
        raise SystemExit(f"no summary.json under {folder}; did the runs finish?")
    return pd.DataFrame([r for j in jobs for r in job_rows(j)])


def to_markdown(df: pd.DataFrame) -> str:
    wide = df.pivot_table(index=["overrides", "row"], columns="metric", values="value", sort=False).reset_index()
    cols = list(wide.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in wide.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--latest", metavar="EXPERIMENT")
    ap.add_argument("--outputs", type=Path, default=Path("outputs"))
    a = ap.parse_args(argv)
    folder = a.folder
    if a.latest:
        runs = sorted((a.outputs / "multirun" / a.latest).glob("*")) or sorted((a.outputs / "runs" / a.latest).glob("*"))
        if not runs:
            raise SystemExit(f"no runs of experiment {a.latest!r} under {a.outputs}")
        folder = runs[-1]
    if folder is None:
        ap.error("give a folder or --latest EXPERIMENT")
    df = collect(folder)
    md = to_markdown(df)
    df.to_csv(folder / "collected.csv", index=False)
    (folder / "collected.md").write_text(md + "\n")
    print(f"# {folder}\n\n{md}")


if __name__ == "__main__":
    main()
