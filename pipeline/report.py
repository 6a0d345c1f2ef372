"""The report stage: result tables (CSV + parquet), a JSON summary, plots and report.md.

Everything in ``summary.json`` and the tables is deterministic for a given config (no
timings, no paths), so two runs of one config give byte-identical files; wall times and
costs go to ``timings.json`` and ``cost.csv``.

summary.json schema (``"schema": "react-merging/summary/v1"``)::

    {schema, suite, backbone, tasks, tasks3, seed, preset ("full" | "fast"), merge{...}, correction{...},
     calibration{source, split, size, counts{task: n}, overlaps_evaluation, note},
     reference{label: {task: accuracy, ..., average}},          # pretrained, merged, expert
     scenarios{method: {scenario: {task: accuracy, ..., average, normalized_average}}},
     fronts{method: {"@3"|"@all": {hypervolume, uniformity, preference_alignment}}},
     metric_notes{hypervolume, uniformity, preference_alignment}}
Accuracies are fractions in [0, 1]; hypervolume is x100 of normalised accuracies.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .cache import atomic_write_text
from .evaluate import Evaluation, priority_rule_text
from .stages import calibration_split

SCHEMA = "react-merging/summary/v1"


def write_report(
    run_dir: Path, meta: dict, ev: Evaluation, sets: dict, tasks3: list[str], artifacts: dict
) -> tuple[dict, list[Path]]:
    """The report stage: every table of ``ev``, summary.json, artifacts.json, plots and
    report.md in ``run_dir``; returns (summary, plot files)."""
    from . import artifacts as artifacts_lib

    for name, df in ev.tables().items():
        write_table(df, run_dir, name)
    summary = build_summary(meta, ev.reference, ev.scenarios, ev.fronts)
    write_summary(run_dir, summary)
    plots = write_plots(ev, sets, meta["tasks"], tasks3, run_dir / "plots")
    command = "python -m pipeline.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    artifacts_lib.write_artifacts(run_dir, artifacts)
    atomic_write_text(
        run_dir / "report.md",
        markdown_report(summary, ev.scenarios, ev.fronts, ev.reference, ev.cost, command)
        + artifacts_lib.markdown_section(artifacts),
    )
    return summary, plots


def write_timings(run_dir: Path, timings: dict, cache_events: list) -> None:
    """Stage wall times and cache hits (not deterministic, so not in summary.json)."""
    atomic_write_text(
        run_dir / "timings.json",
        json.dumps({"stages": timings, "cache_events": cache_events}, indent=1),
    )


def run_meta(cfg, suite, calibration: dict, tasks3: list[str], sets: dict) -> dict:
    """What summary.json records about the run besides its numbers (see the schema above)."""
    overlap = cfg.calibration.source == "test"
    counts = ", ".join(f"{k}: {len(v)}" for k, v in calibration.items())
    return {
        "suite": suite.name,
        "suite_key": suite.key,
        "backbone": cfg.backbone.get("name", cfg.backbone.get("model_name")),
        "tasks": suite.tasks,
        "tasks3": tasks3,
        "seed": int(cfg.seed),
        "preset": str(cfg.get("preset", "full")),
        "merge": OmegaConf.to_container(cfg.merge, resolve=True),
        "correction": OmegaConf.to_container(cfg.correction, resolve=True),
        "methods": list(cfg.methods) + list(cfg.fixed_methods),
        "calibration": {
            "source": cfg.calibration.source,
            "split": calibration_split(cfg.calibration.source),
            "size": cfg.calibration.size,
            "seed": int(cfg.calibration.seed),
            "counts": {k: int(len(v)) for k, v in calibration.items()},
            "overlaps_evaluation": overlap,
            "note": (
                "unlabeled images from each task's test split (the paper's transductive protocol); "
                "they are among the evaluated test images"
                if overlap
                else "held-out validation images (never used to train the experts); disjoint from the evaluated test images"
            )
            + f"; {counts} per task",
        },
        "preference_sets": {k: int(len(v)) for k, v in sets.items()},
        "priority_rule": priority_rule_text(cfg.preferences, len(suite.tasks)),
    }


def write_plots(
    ev: Evaluation, sets: dict, tasks: list[str], tasks3: list[str], out_dir: Path
) -> list[Path]:
    """Pairwise fronts, simplex maps and scenario bars, for the sets the run swept."""
    from evaluation import plots

    results, reference = ev.results, ev.reference
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if any(s.startswith("pairwise:") for s in sets):
        # non-controllable methods (one accuracy per task) appear as reference points
        swept = results[results.pref_set.str.startswith("pairwise:")].method.unique()
        fixed = results[~results.method.isin(swept) & (results.pref_set == "equal")]
        points = fixed.assign(label=fixed.method + " (fixed)")[reference.columns]
        front_reference = pd.concat([reference, points], ignore_index=True)
        controllable = results[results.method.isin(swept)]
        written += plots.plot_pairwise_fronts(
            controllable, ev.preferences, front_reference, tasks, out_dir
        )
    if "simplex3" in sets:
        for method in results.method.unique():
            if (results[(results.method == method)].pref_set == "simplex3").any():
                written += plots.plot_simplex_maps(
                    results, ev.preferences, tasks3, out_dir, method=method
                )
    if not ev.scenarios.empty:
        avg = ev.scenarios[ev.scenarios.task == "average"].rename(
            columns={"accuracy": "average_accuracy"}
        )
        written += plots.plot_scenario_bars(avg, out_dir)
    return [Path(p) for p in written]


def write_table(df: pd.DataFrame, run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{name}.csv.tmp"
    df.to_csv(tmp, index=False, float_format="%.6f")
    tmp.replace(run_dir / f"{name}.csv")
    tmp = run_dir / f".{name}.parquet.tmp"
    df.to_parquet(tmp, index=False)
    tmp.replace(run_dir / f"{name}.parquet")


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
        *(
            [
                f"**Preset `{summary['preset']}`: reduced settings (a smoke test, not the README's numbers).**",
                "",
            ]
            if summary.get("preset", "full") != "full"
            else []
        ),
        f"Seed: {summary['seed']} (calibration subset seed {summary['calibration']['seed']})",
        "",
        f"Calibration: {summary['calibration']['note']}",
        "",
        *([f"Preferences: {summary['priority_rule']}", ""] if summary.get("priority_rule") else []),
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
