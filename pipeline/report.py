"""The report stage: result tables (CSV + parquet), a JSON summary, plots and report.md.

Everything in ``summary.json`` and the tables is deterministic for a given config (no
timings, no paths), so two runs of one config give byte-identical files; wall times and
costs go to ``timings.json`` and ``cost.csv``.

summary.json schema (``"schema": "react-merging/summary/v1"``)::

    {schema, suite, backbone, tasks, tasks3, seed, preset ("full" | "fast"), merge{...},
     merge_conventions (TIES conventions in words, or null), pretrained_tower (where the
     suite's pretrained image tower came from, or null), correction{...},
     calibration{source, split, size, counts{task: n}, overlaps_evaluation, note},
     reference{label: {task: accuracy, ..., average}},          # pretrained, merged, expert
     scenarios{method: {scenario: {task: accuracy, ..., average, normalized_average}}},
     fronts{method: {"@3"|"@all": {hypervolume, uniformity, preference_alignment}}},
     metric_notes{hypervolume, uniformity, preference_alignment}}
Accuracies are fractions in [0, 1]; hypervolume is x100 of normalised accuracies.

A run folder is complete only when ``run_complete.json`` (written last, by
``mark_complete``) says so: it lists every output with its sha256. A run starts by removing
the marker and the outputs a previous run left in its folder (``begin_run``); a failed run
leaves ``run_failed.json`` with the error instead (``mark_failed``). ``pipeline.collect``
reads complete runs only.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .cache import atomic_write, atomic_write_text
from .evaluate import Evaluation, priority_rule_text
from .merge import merge_conventions
from .stages import calibration_split

SCHEMA = "react-merging/summary/v1"
MARKER = "run_complete.json"
FAILED = "run_failed.json"
TABLES = ("results", "preferences", "reference", "scenarios", "fronts", "cost")
OUTPUTS = (
    *(f"{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")),
    "summary.json",
    "report.md",
    "timings.json",
    "plots",
)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def begin_run(run_dir: Path) -> list[str]:
    """Mark ``run_dir`` incomplete (marker removed first), then remove the outputs an
    earlier run left there; returns the names removed (the W&B folder is kept)."""
    run_dir = Path(run_dir)
    removed = []
    for name in (MARKER, FAILED, *OUTPUTS):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def mark_complete(run_dir: Path) -> None:
    """Write ``run_complete.json`` (the last file of a successful run): every output of the
    run folder with its sha256."""
    run_dir = Path(run_dir)
    files = {}
    for name in OUTPUTS:
        for p in sorted(
            [run_dir / name] if (run_dir / name).is_file() else (run_dir / name).rglob("*")
        ):
            if p.is_file():
                files[p.relative_to(run_dir).as_posix()] = file_sha256(p)
    marker = {
        "schema": "react-merging/run-complete/v1",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    atomic_write_text(run_dir / MARKER, json.dumps(marker, indent=1))


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Write ``run_failed.json`` (what went wrong) into the run folder of a failed run, whose
    marker of an earlier success (if any) goes first."""
    text = json.dumps(
        {
            "error": f"{type(error).__name__}: {error}",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    try:
        (Path(run_dir) / MARKER).unlink(missing_ok=True)
        atomic_write_text(Path(run_dir) / FAILED, text)
    except OSError:  # an unwritable folder is what failed: the error itself says so
        pass


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
        "max_images_per_split": cfg.get("max_images_per_split"),
        "merge": OmegaConf.to_container(cfg.merge, resolve=True),
        "merge_conventions": merge_conventions(cfg.merge),
        "pretrained_tower": suite.info.get("pretrained_tower"),
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
        means = reference.groupby("label", sort=False).accuracy.mean()
        lines = {
            ("experts" if k == "expert" else k): v for k, v in means.items() if k != "pretrained"
        }
        written += plots.plot_scenario_bars(avg, out_dir, reference=lines)
    return [Path(p) for p in written]


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
        *(
            [
                f"**Preset `{summary['preset']}`: reduced settings (a smoke test, not the README's numbers"
                + (
                    f"; at most {summary['max_images_per_split']} images per task split"
                    if summary.get("max_images_per_split")
                    else ""
                )
                + ").**",
                "",
            ]
            if summary.get("preset", "full") != "full"
            else []
        ),
        f"Seed: {summary['seed']} (calibration subset seed {summary['calibration']['seed']})",
        "",
        f"Calibration: {summary['calibration']['note']}",
        "",
        *(
            line
            for label, key in (
                ("Pretrained tower", "pretrained_tower"),
                ("Merge", "merge_conventions"),
                ("Preferences", "priority_rule"),
            )
            if summary.get(key)
            for line in (f"{label}: {summary[key]}", "")
        ),
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
