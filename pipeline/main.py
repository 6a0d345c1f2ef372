"""Hydra entry point: ``python -m pipeline.main [overrides]``.

    prepare -> merge -> features -> fit -> sweep -> evaluate -> report

The task function lives in this package module (not a script) so Hydra's joblib and
submitit launchers can import it in their workers; ``pipeline/__init__`` installs the
torchvision guard first.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from . import compat, lifecycle  # noqa: F401
from .cache import Cache, atomic_write_text, disk_full
from .evaluate import (
    front_metrics,
    preference_sets,
    preferences_frame,
    resolve_tasks3,
    scenario_table,
)
from .features import resolve_device
from .merge import load_merged, run_merge
from .methods import build_method, model_accuracies
from .report import build_summary, markdown_report, write_summary, write_table
from .stages import (
    Context,
    ModelRef,
    calibration_indices,
    calibration_split,
    long_results,
)
from .suites import build_suite
from .tracking import Tracker
from .validation import validate_config

log = logging.getLogger("react")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m pipeline.main <overrides>`` would run (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def script_config(ap, argv: list[str] | None = None):
    """Parse a script's own flags plus Hydra ``key=value`` overrides; returns (args, validated cfg)."""
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        ap.error(f"unrecognised arguments {bad}; Hydra overrides look like key=value")
    cfg = compose_config(overrides)
    validate_config(cfg)
    args.overrides = overrides
    return args, cfg


def apply_runtime(cfg: DictConfig) -> torch.device:
    """Threads and seeds from the config (the pipeline and every script); returns the device."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return resolve_device(cfg.device)


def script_output_dir(out: Path | None, cfg: DictConfig, name: str) -> Path:
    """``out``, or ``<paths.output_dir>/<name>/<time>-<run id>`` (unique per process); created."""
    stamp = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{lifecycle.run_id()}"
    out = Path(out) if out else Path(cfg.paths.output_dir) / name / stamp
    out.mkdir(parents=True, exist_ok=True)
    return out


def method_cfg(cfg: DictConfig, name: str):
    if name == "react":
        return cfg.correction
    return cfg.baselines.get(name)


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Run the whole pipeline for ``cfg``; returns the summary dict."""
    validate_config(cfg)
    run_dir = Path(run_dir or cfg.paths.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"the output folder {run_dir} is not writable ({e.strerror}); set hydra.run.dir or paths.output_dir"
        ) from e
    device = apply_runtime(cfg)
    cache = Cache(cfg.paths.cache_dir)
    cache.sweep_tmp()
    config = OmegaConf.to_container(cfg, resolve=True)
    tracker = Tracker(
        cfg.logger,
        run_dir,
        config,
        group=cfg.experiment_name,
        name=f"{cfg.suite.name}-{cfg.merge.name}-{'+'.join(cfg.methods)}",
    )
    try:
        with disk_full(run_dir, "the run's tables and report"):
            summary = _run(cfg, cache, device, run_dir, tracker)
    finally:
        tracker.finish()
    if tracker.message:
        log.info(tracker.message)
    return summary


def load_suite(cfg: DictConfig, cache: Cache):
    """Stage prepare: build (or load from ``cache``) the suite of ``cfg``."""
    return build_suite(
        cfg.suite if cfg.suite.name != "paper8" else _with_backbone(cfg),
        cache,
        progress=cfg.progress,
    )


def prepare_context(cfg: DictConfig, cache: Cache, device: torch.device, suite=None) -> Context:
    """Stages prepare and merge: the built suite, the calibration subsets and the merged model.

    Everything later (features, fit, sweep) reads from the returned ``Context``; scripts
    (t-SNE, cost curves) start here too. ``suite``: an already built suite (e.g. a task
    subset of one, ``scripts/cost_vs_tasks.py``) instead of building ``cfg.suite``.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if suite is None:
        suite = load_suite(cfg, cache)
    timings["prepare"] = time.perf_counter() - t
    ctx = Context(cfg, cache, suite, device, progress=cfg.progress, timings=timings)
    ctx.calibration = calibration_indices(suite, cfg.calibration)
    with ctx.timed("merge"):
        merge_unit = run_merge(cfg.merge, suite, cache, device, progress=cfg.progress)
        merged_state = load_merged(merge_unit)
        ctx.merged = ModelRef(
            f"merged:{merge_unit.key}", f"merged ({cfg.merge.name})", lambda: merged_state
        )
    return ctx


def _run(cfg, cache: Cache, device, run_dir: Path, tracker: Tracker) -> dict:
    ctx = prepare_context(cfg, cache, device)
    timings, suite = ctx.timings, ctx.suite
    tasks, tasks3 = suite.tasks, resolve_tasks3(suite.tasks, cfg.tasks3)
    sets = preference_sets(cfg.preferences, tasks, tasks3)
    # ---- features of the fixed models (pretrained, merged, experts) on the test splits
    with ctx.timed("features"):
        reference = _reference(ctx)
    expert_acc = {r.task: r.accuracy for r in reference[reference.label == "expert"].itertuples()}
    # ---- fit + sweep, per method
    frames, cost_rows = [], []
    for name in list(cfg.methods):
        method = build_method(name, method_cfg(cfg, name))
        with ctx.timed("fit"):
            method.fit(ctx)
        with ctx.timed("sweep"):
            for set_name, p in sets.items():
                frames.append(_sweep(ctx, method, set_name, p, expert_acc))
        cost_rows.append({"method": name, **method.cost, "device": str(device)})
    for name in list(cfg.fixed_methods):
        method = build_method(name, method_cfg(cfg, name))
        with ctx.timed("fit"):
            method.fit(ctx)
        with ctx.timed("sweep"):
            for set_name in [s for s in sets if s in ("equal", "priority", "one_hot")]:
                frames.append(_sweep(ctx, method, set_name, sets[set_name], expert_acc))
        cost_rows.append({"method": name, **method.cost, "device": str(device)})
    # ---- evaluate
    t = time.perf_counter()
    results = pd.concat(frames, ignore_index=True)
    prefs_df = preferences_frame(sets, tasks)
    scenarios = (
        scenario_table(results, tasks)
        if {"equal", "priority", "one_hot"} & set(sets)
        else pd.DataFrame()
    )
    fronts = front_metrics(results[results.method.isin(list(cfg.methods))], sets, tasks, tasks3)
    timings["evaluate"] = time.perf_counter() - t
    # ---- report
    t = time.perf_counter()
    for name, df in (
        ("results", results),
        ("preferences", prefs_df),
        ("reference", reference),
        ("scenarios", scenarios),
        ("fronts", fronts),
    ):
        write_table(df, run_dir, name)
    cost = pd.DataFrame(cost_rows)
    write_table(cost, run_dir, "cost")
    overlap = cfg.calibration.source == "test"
    meta = {
        "suite": suite.name,
        "suite_key": suite.key,
        "backbone": cfg.backbone.get("name", cfg.backbone.get("model_name")),
        "tasks": tasks,
        "tasks3": tasks3,
        "seed": int(cfg.seed),
        "merge": OmegaConf.to_container(cfg.merge, resolve=True),
        "correction": OmegaConf.to_container(cfg.correction, resolve=True),
        "methods": list(cfg.methods) + list(cfg.fixed_methods),
        "calibration": {
            "source": cfg.calibration.source,
            "split": calibration_split(cfg.calibration.source),
            "size": cfg.calibration.size,
            "seed": int(cfg.calibration.seed),
            "counts": {k: int(len(v)) for k, v in ctx.calibration.items()},
            "overlaps_evaluation": overlap,
            "note": (
                "unlabeled images from each task's test split (the paper's transductive protocol); "
                "they are among the evaluated test images"
                if overlap
                else "held-out validation images (never used to train the experts); disjoint from the evaluated test images"
            )
            + f"; {', '.join(f'{k}: {len(v)}' for k, v in ctx.calibration.items())} per task",
        },
        "preference_sets": {k: int(len(v)) for k, v in sets.items()},
    }
    summary = build_summary(meta, reference, scenarios, fronts)
    write_summary(run_dir, summary)
    plots = _plots(results, prefs_df, reference, scenarios, tasks, tasks3, sets, run_dir / "plots")
    command = "python -m pipeline.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    timings["report"] = time.perf_counter() - t
    atomic_write_text(
        run_dir / "report.md", markdown_report(summary, scenarios, fronts, reference, cost, command)
    )
    atomic_write_text(
        run_dir / "timings.json",
        json.dumps({"stages": timings, "cache_events": cache.events}, indent=1),
    )
    # ---- W&B
    tracker.summary(_flat_metrics(summary))
    tracker.log({f"time/{k}": v for k, v in timings.items()})
    for name, df in (
        ("scenarios", scenarios),
        ("fronts", fronts),
        ("reference", reference),
        ("cost", cost),
    ):
        tracker.table(name, df)
    for p in plots:
        if p.suffix == ".png":
            tracker.image(f"plots/{p.stem}", p)
    log.info("results in %s", run_dir)
    return summary


def _sweep(ctx: Context, method, set_name: str, p: np.ndarray, expert_acc: dict) -> pd.DataFrame:
    """Accuracies of one method over one preference set: a cache unit (results.parquet)."""
    material = {
        "method": method.material(),
        "merged": ctx.merged.key,
        "calibration": {t: ctx.calibration[t].tolist() for t in ctx.tasks},
        "calibration_source": ctx.cfg.calibration.source,
        "preferences": np.round(p, 12).tolist(),
        "set": set_name,
    }

    def compute(out: Path):
        acc = method.accuracies(ctx, p)
        long_results(method.name, set_name, acc, ctx.tasks, expert_acc).to_parquet(
            out / "results.parquet", index=False
        )

    unit = ctx.cache.unit("sweep", material, compute)
    return pd.read_parquet(unit.file("results.parquet"))


def _reference(ctx: Context) -> pd.DataFrame:
    """Test accuracy of the fixed models: pretrained, merged, and each expert on its own task."""
    rows = []
    for label, ref in (
        ("pretrained", ctx.pretrained_ref()),
        (f"merged ({ctx.cfg.merge.name})", ctx.merged),
    ):
        rows += [
            (label, t, float(a)) for t, a in zip(ctx.tasks, model_accuracies(ctx, ref), strict=True)
        ]
    rows += [
        ("expert", t, ctx.accuracy(ctx.features(ctx.expert_ref(t), t, "test"), t))
        for t in ctx.tasks
    ]
    df = pd.DataFrame(rows, columns=["label", "task", "accuracy"])
    expert = df[df.label == "expert"].set_index("task").accuracy
    df["normalized_accuracy"] = df.accuracy / df.task.map(expert)
    return df


def _plots(
    results, prefs_df, reference, scenarios, tasks, tasks3, sets, out_dir: Path
) -> list[Path]:
    from evaluation import plots

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
            controllable, prefs_df, front_reference, tasks, out_dir
        )
    if "simplex3" in sets:
        for method in results.method.unique():
            if (results[(results.method == method)].pref_set == "simplex3").any():
                written += plots.plot_simplex_maps(
                    results, prefs_df, tasks3, out_dir, method=method
                )
    if not scenarios.empty:
        avg = scenarios[scenarios.task == "average"].rename(
            columns={"accuracy": "average_accuracy"}
        )
        written += plots.plot_scenario_bars(avg, out_dir)
    return [Path(p) for p in written]


def _flat_metrics(summary: dict) -> dict:
    flat = {}
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            flat[f"{method}/{scenario}/average_accuracy"] = d["average"]
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            for metric, v in d.items():
                flat[f"{method}/{metric}{subset}"] = v
    for label, d in summary["reference"].items():
        flat[f"reference/{label}/average_accuracy"] = d["average"]
    return flat


def _with_backbone(cfg):
    """The suite config with the backbone inside (paper8 builds per backbone)."""
    return OmegaConf.create(
        {
            **OmegaConf.to_container(cfg.suite, resolve=True),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        }
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    logging.basicConfig(level=logging.INFO)
    for noisy in ("fontTools", "matplotlib", "PIL"):  # PDF font subsetting logs every glyph
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        lifecycle.watch_launcher()  # a joblib / submitit-local worker ends with its launcher
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, run_dir)
    _print_summary(summary, run_dir)
    return summary


def _print_summary(summary: dict, run_dir: Path) -> None:
    print(f"\nReACT pipeline finished: {run_dir}")
    for label, d in summary["reference"].items():
        print(f"  {label:<28s} avg acc {100 * d['average']:.1f}%")
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            print(f"  {method + ' (' + scenario + ')':<28s} avg acc {100 * d['average']:.1f}%")
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            print(f"  {method} {subset}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()))
    print(f"  report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    lifecycle.mark_launcher()
    main()
