"""Cost of each controllable method against the number of tasks T (`make fig-cost`).

    python scripts/cost_vs_tasks.py suite=offline backbone=offline [methods=[react,pref_ta]]
        [--n-prefs 1000] [--repeats 3 (preset=fast: 1)] [--query-budget 20] [--out DIR]

Any argument of the form ``key=value`` is a Hydra override of ``configs/config.yaml`` (as for
``python -m pipeline.main``); ``--...`` flags belong to this script. On a CPU shared
with other jobs, ``num_threads=1`` gives steadier (and there, faster) timings.

For T = 2 .. len(suite.tasks), the first T tasks of the built suite form a sub-suite and the
pipeline's own stages run on it **in a fresh, empty cache folder** (deleted afterwards), so
nothing is a cache hit; only the built suite (images, pretrained model, experts, heads) is
read from ``paths.cache_dir``. One untimed warm-up measurement at the smallest T comes
first (lazy imports, first kernel launches). Per T and method:

- ``merge_seconds``: the merge of the T experts (``cfg.merge``), shared by methods that
  start from the merged model; reported, not added to the methods' costs.
- ``offline_seconds``: ``Method.fit`` (ReACT: features of the merged model and of the T
  experts on the calibration images, the per-task statistics, writing them to the cache).
- ``answer_seconds``: ``Method.accuracies`` for N Dirichlet(1) preferences, i.e. answering
  each preference *and* scoring the answer on every task's test split. The merged model's
  test features are extracted before this timer starts (evaluation data shared by all
  methods), so ReACT's number is maps + corrected-feature scoring. Model-producing methods
  (pref_ta, ...) pay their per-preference forward passes here. When answering all N would
  exceed ``--query-budget`` seconds, the rest is extrapolated linearly from the preferences
  answered (``answered`` < ``n_prefs``, ``extrapolated`` = True).
- ``maps_seconds`` (methods with a ``maps(prefs)`` method, i.e. ReACT): the N preference
  maps alone, without scoring.

Writes ``cost_vs_tasks.csv`` (every repeat), ``cost_summary.csv`` (median over repeats, with
the min and max of the offline and total seconds) and ``cost.png``/``cost.pdf`` (one colour
per method, solid: offline stage, dashed: offline + answering; bands: min to max over the
repeats, 3 by default) into ``--out`` (default ``<paths.output_dir>/cost_vs_tasks/<time>``)
and prints the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from pipeline.cache import Cache, stable_hash  # noqa: E402
from pipeline.main import (  # noqa: E402
    apply_runtime,
    load_suite,
    method_cfg,
    prepare_context,
    script_config,
    script_output_dir,
)
from pipeline.methods import build_method  # noqa: E402
from pipeline.report import md_table  # noqa: E402
from pipeline.suite import Suite  # noqa: E402


def subset_suite(suite: Suite, tasks: list[str]) -> Suite:
    """The built ``suite`` restricted to ``tasks`` (its files, its pretrained model), with its
    own key so every downstream cache unit differs from the full suite's."""
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the suite ({suite.tasks})")
    return dataclasses.replace(
        suite,
        tasks=list(tasks),
        classnames={t: suite.classnames[t] for t in tasks},
        expert_paths={t: suite.expert_paths[t] for t in tasks},
        data_dirs={t: suite.data_dirs[t] for t in tasks},
        key=stable_hash({"suite": suite.key, "tasks": list(tasks)}),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def answer(method, ctx, prefs: np.ndarray, budget: float, device) -> tuple[float, int]:
    """Seconds to answer all of ``prefs`` (extrapolated past ``budget``) and how many were
    actually answered. A first block of 10 measures the rate, then as many as fit."""
    done, spent = 0, 0.0
    while done < len(prefs):
        if done == 0:
            block = min(len(prefs), 10)
        else:
            rate = spent / done
            room = int((budget - spent) / max(rate, 1e-9))
            block = min(len(prefs) - done, room)
            if block < 1:
                break
        sync(device)
        t = time.perf_counter()
        method.accuracies(ctx, prefs[done : done + block])
        sync(device)
        spent += time.perf_counter() - t
        done += block
    return spent * len(prefs) / done, done


def measure(
    cfg, full: Suite, T: int, n_prefs: int, budget: float, device, scratch: Path
) -> list[dict]:
    tasks = list(full.tasks[:T])
    cfg_t = cfg.copy()
    with open_dict(cfg_t):
        cfg_t.suite.tasks = tasks
        cfg_t.tasks3 = None
    sub = subset_suite(full, tasks)
    root = Path(tempfile.mkdtemp(prefix=f"cost-T{T}-", dir=scratch))
    try:
        cache = Cache(root)
        sync(device)
        t = time.perf_counter()
        ctx = prepare_context(cfg_t, cache, device, suite=sub)
        sync(device)
        merge_s = time.perf_counter() - t
        rng = np.random.default_rng([int(cfg.seed), T])
        prefs = rng.dirichlet(np.ones(T), size=n_prefs)
        rows = []
        for name in list(cfg.methods):
            method = build_method(name, method_cfg(cfg_t, name))
            sync(device)
            t = time.perf_counter()
            method.fit(ctx)
            sync(device)
            fit_s = time.perf_counter() - t
            for task in tasks:  # evaluation data shared by every method: not part of any cost
                ctx.features(ctx.merged, task, "test")
            maps_s = None
            if callable(getattr(method, "maps", None)):
                sync(device)
                t = time.perf_counter()
                method.maps(prefs)
                sync(device)
                maps_s = time.perf_counter() - t
            answer_s, answered = answer(method, ctx, prefs, budget, device)
            rows.append(
                {
                    "method": name,
                    "n_tasks": T,
                    "merge_seconds": merge_s,
                    "offline_seconds": fit_s,
                    "n_prefs": n_prefs,
                    "answer_seconds": answer_s,
                    "answered": answered,
                    "extrapolated": answered < n_prefs,
                    "maps_seconds": maps_s,
                    "forward_passes": int(method.cost.get("forward_passes", 0)),
                    "device": str(device),
                }
            )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summarise(raw: pd.DataFrame) -> pd.DataFrame:
    """Median over repeats per (method, T); min and max of the offline and total seconds."""
    num = ["merge_seconds", "offline_seconds", "answer_seconds", "maps_seconds", "forward_passes"]
    raw = raw.assign(total_seconds=raw.offline_seconds + raw.answer_seconds)
    g = raw.groupby(["method", "n_tasks"], sort=False)
    out = g[num].median()
    out["n_prefs"] = g.n_prefs.first()
    out["answered"] = g.answered.min()
    out["extrapolated"] = g.extrapolated.any()
    out["repeats"] = g.size()
    out["forward_passes"] = out.forward_passes.round().astype(int)
    out["total_seconds"] = out.offline_seconds + out.answer_seconds
    for col in ("offline_seconds", "total_seconds"):
        out[f"{col}_min"], out[f"{col}_max"] = g[col].min(), g[col].max()
    return out.reset_index()


def plot(summary: pd.DataFrame, n_prefs: int, out: Path, label: str) -> list[Path]:
    """One colour per method; phases "offline" (solid) and "offline + N preferences"
    (dashed); median with a min-max band over the repeats."""
    from evaluation import plots

    rows = []
    answered = f"offline + {n_prefs} preferences"
    for m, d in summary.groupby("method", sort=False):
        has_offline = bool((d.offline_seconds >= 1e-3).any())  # a no-op fit would squash a log axis
        for r in d.itertuples():
            if has_offline:
                rows.append({"method": m, "n_tasks": r.n_tasks, "phase": "offline"})
                rows[-1].update(seconds=r.offline_seconds, seconds_min=r.offline_seconds_min)
                rows[-1]["seconds_max"] = r.offline_seconds_max
            rows.append({"method": m, "n_tasks": r.n_tasks, "phase": answered})
            rows[-1].update(seconds=r.total_seconds, seconds_min=r.total_seconds_min)
            rows[-1]["seconds_max"] = r.total_seconds_max
    fig = plots.cost_figure(pd.DataFrame(rows))
    ax = fig.axes[0]
    repeats = int(summary.repeats.min())
    ax.set_ylabel(f"seconds (median of {repeats}; band: min to max)")
    extrapolated = sorted(
        plots.display_name(m) for m in summary[summary.extrapolated].method.unique()
    )
    ax.set_title(
        f"Cost vs number of tasks T\noffline stage (solid); + answering and scoring {n_prefs} "
        f"preferences (dashed)\n{label}"
        + (
            f"\nanswering extrapolated from a time budget for: {', '.join(extrapolated)}"
            if extrapolated
            else ""
        ),
        fontsize=9.5,
    )
    return plots.save_figure(fig, out, "cost")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, help="output folder (default <paths.output_dir>/cost_vs_tasks/<time>)"
    )
    ap.add_argument(
        "--n-prefs", type=int, default=1000, help="preferences answered per T (default 1000)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="fresh-cache repeats per T (default 3, preset=fast 1); the median is plotted, the "
        "min-max as a band",
    )
    ap.add_argument(
        "--query-budget",
        type=float,
        default=20.0,
        help="seconds of answering per (method, T) before extrapolating (default 20)",
    )
    ap.add_argument("--min-tasks", type=int, default=2)
    args, cfg = script_config(ap, argv)
    if args.repeats is None:
        args.repeats = 1 if cfg.get("preset") == "fast" else 3
    if args.n_prefs < 1 or args.repeats < 1 or args.min_tasks < 2:
        ap.error("--n-prefs and --repeats must be >= 1, --min-tasks >= 2")
    device = apply_runtime(cfg)
    out = script_output_dir(args.out, cfg, "cost_vs_tasks")
    scratch = out / ".scratch"
    scratch.mkdir(exist_ok=True)

    full = load_suite(cfg, Cache(cfg.paths.cache_dir))
    if args.min_tasks > len(full.tasks):
        ap.error(f"--min-tasks {args.min_tasks} > the suite's {len(full.tasks)} tasks")
    raw_rows = []
    try:
        # untimed warm-up (lazy imports, first kernel launches, allocator) on the smallest T
        measure(
            cfg, full, args.min_tasks, min(args.n_prefs, 10), args.query_budget, device, scratch
        )
        for T in range(args.min_tasks, len(full.tasks) + 1):
            for r in range(args.repeats):
                for row in measure(cfg, full, T, args.n_prefs, args.query_budget, device, scratch):
                    raw_rows.append({**row, "repeat": r})
                print(f"T={T} repeat {r + 1}/{args.repeats} done", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raw = pd.DataFrame(raw_rows)
    raw.to_csv(out / "cost_vs_tasks.csv", index=False)
    summary = summarise(raw)
    summary.to_csv(out / "cost_summary.csv", index=False)
    label = f"{cfg.suite.name} suite, backbone {cfg.backbone.get('name')}, merge {cfg.merge.name}, {device.type}"
    plot(summary, args.n_prefs, out, label)
    meta = {
        "overrides": args.overrides,
        "args": {k: str(v) for k, v in vars(args).items()},
        "tasks": list(full.tasks),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "cost_meta.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(meta)))
    cols = [
        "method",
        "n_tasks",
        "merge_seconds",
        "offline_seconds",
        "maps_seconds",
        "answer_seconds",
        "answered",
        "n_prefs",
        "total_seconds",
        "forward_passes",
    ]
    print(f"\n# Cost vs number of tasks ({label}); seconds, median of {args.repeats}\n")
    print(md_table(summary[cols]))
    if summary.extrapolated.any():
        print("\n(answer_seconds extrapolated where answered < n_prefs)")
    print(f"\nwritten: {out}/cost_vs_tasks.csv, cost_summary.csv, cost.png, cost.pdf")
    return summary


if __name__ == "__main__":
    main()
