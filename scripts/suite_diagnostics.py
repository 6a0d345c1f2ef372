"""The regime of a suite, measured before any method result (`make diagnostics`).

    python scripts/suite_diagnostics.py [suite=offline backbone=offline ...] [--fast]
        [--adamerging-steps N] [--lambda-grid 0.05:1.0:0.05] [--energy 0.9] [--out DIR]
        [--groups [--group-grid 0.05:0.3:0.05]]

``key=value`` arguments are Hydra overrides of ``configs/config.yaml`` (as for
``python -m pipeline.main``); ``--...`` flags belong to this script. Computes **no ReACT and
no baseline result**, only what tells whether the suite sits in the paper's regime:

- test accuracy per task and on average of zero-shot (the pretrained encoder under the
  suite's heads), the experts (each on its own task), and three merges:
  * Task Arithmetic, lambda picked on the **validation** split (the average validation
    accuracy over tasks; the first best on ties) from ``--lambda-grid`` (default
    0.05, 0.10, ..., 1.00, the task-vectors protocol's grid);
  * TIES and AdaMerging with the settings of ``configs/merge/ties.yaml`` and
    ``configs/merge/adamerging.yaml`` (layer-wise, entropy on unlabeled test batches, the
    paper's transductive protocol), AdaMerging's steps set by ``--adamerging-steps``;
- the share of the experts' gain over zero-shot each merge keeps
  (``evaluation.diagnostics.gain_share``: per task, and the ratio of the averages);
- effective dimension (participation ratio, dimensions holding ``--energy`` of the energy;
  centred covariance) of each task's test features under zero-shot, its expert and the TA
  merge, and of all tasks' merged features pooled with equal weight per task;
- the pairwise overlaps of the tasks' TA-merged test-feature subspaces (mean squared cosine
  of the principal angles between the top-k_t principal subspaces, k_t = the task's
  90%-energy dimension; chance level max(k_a, k_b) / D);
- the pairwise overlaps of the tasks' head subspaces (``evaluation.diagnostics.head_overlaps``:
  the span of each task's centred class vectors), the same measure and chance level;
- how separately the experts moved the weights: the cosines of the task vectors
  (``evaluation.diagnostics.task_vector_cosines``), and Task Arithmetic on every **pair**
  of tasks (theta_0 + lambda (tau_a + tau_b), lambda picked per pair on the two tasks'
  validation split from ``--pair-grid``, default 0.2, 0.4, ..., 1.0): each pair's test
  accuracy normalised by the experts' and the share of the two experts' gain it keeps
  (cached, one unit per suite and grid);
- with ``--groups``, where in the network the eight-task interference sits: Task
  Arithmetic on every task with the task vectors restricted to one group of weights
  (``evaluation.diagnostics.parameter_groups``: by kind, embedding / attention / MLP / block
  norms / output, and by depth, one group per block), and on all weights but that group
  (the other weights at theta_0); lambda picked on the validation split from
  ``--group-grid`` (default 0.05, 0.10, ..., 0.30) for each row, then the test accuracy and
  the share of the experts' gain kept (cached, one unit per suite and grid);
- the paper-regime targets, each met / not met with its number: zero-shot average 40-70% of
  the experts'; TA keeping 30-70% of the experts' gain; TA < TIES < AdaMerging in average
  accuracy; every expert at >= 85%.

Everything expensive goes through the pipeline's cache (the built suite, features per
model and split, the TIES and AdaMerging merge units), so a rerun takes seconds and the
features are shared with ``python -m pipeline.main merge=... `` runs of the same suite.
Writes ``regime.md`` and ``regime.json`` into ``--out`` (default
``<paths.output_dir>/diagnostics/<time>``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merging  # noqa: E402
import pipeline  # noqa: E402,F401  (torchvision guard first)
from evaluation import diagnostics as dg  # noqa: E402
from pipeline.cache import Cache, atomic_write_text  # noqa: E402
from pipeline.codeversion import code_version  # noqa: E402
from pipeline.main import (  # noqa: E402
    apply_runtime,
    compose_config,
    load_suite,
    script_config,
    script_output_dir,
)
from pipeline.merge import load_merged, merge_material, run_merge  # noqa: E402
from pipeline.methods import model_accuracies, models_accuracies  # noqa: E402
from pipeline.stages import Context, ModelRef  # noqa: E402

FAST_ADAMERGING_STEPS = 100
GROUP_GRID = "0.05:0.3:0.05"  # --groups: lambdas tried on the validation split
TARGETS = {  # the paper's regime (issue 11)
    "zeroshot_ratio": (0.40, 0.70),
    "ta_gain_share": (0.30, 0.70),
    "expert_min": 0.85,
}


def parse_grid(spec: str, flag: str = "--lambda-grid") -> list[float]:
    """``start:stop:step`` (inclusive) or a comma list -> sorted lambdas > 0 (6 decimals)."""
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            values = start + step * np.arange(int(np.floor((stop - start) / step + 1e-9)) + 1)
        else:
            values = np.array([float(v) for v in spec.split(",")])
    except ValueError:
        raise ValueError(
            f"{flag} {spec!r}: give start:stop:step (e.g. 0.05:1.0:0.05) or a comma "
            "list (e.g. 0.1,0.3,0.5)"
        ) from None
    grid = sorted({round(float(v), 6) for v in values})
    if not grid or grid[0] <= 0:
        raise ValueError(f"{flag} {spec!r}: every lambda must be > 0, got {grid}")
    return grid


def ta_ref(ctx: Context, scale: float) -> ModelRef:
    """Task Arithmetic at ``scale``, built in memory; keyed like the pipeline's merge unit of
    ``merge=task_arithmetic merge.scale=<scale>``, so features are shared with those runs."""
    cfg = OmegaConf.create({"name": "task_arithmetic", "scale": scale})
    key = Cache.key("merge", merge_material(cfg, ctx.suite, ctx.device))
    # built at most once per model (a features unit per task would otherwise rebuild it)
    state = functools.cache(lambda: merging.task_arithmetic(*ctx.task_vector_inputs, scale=scale))
    return ModelRef(f"merged:{key}", f"TA {scale:g}", state)


def merged_ref(ctx: Context, merge_cfg, label: str) -> tuple[ModelRef, float]:
    """A pipeline merge (cached unit) as a model, and the seconds its computation took."""
    unit = run_merge(merge_cfg, ctx.suite, ctx.cache, ctx.device, progress=ctx.progress)
    seconds = float(ctx.cache.manifest(unit).get("extra", {}).get("seconds", float("nan")))
    return ModelRef(
        f"merged:{unit.key}", label, functools.cache(lambda: load_merged(unit))
    ), seconds


def task_vector_merges(
    ctx: Context, grid: list[float], zs: np.ndarray, experts_acc: np.ndarray
) -> dict:
    """Merges of one or two task vectors (one cache unit per suite, grid and code):

    - the gain curve of each task: theta_0 + lambda tau_t on task t's test split for every
      lambda of ``grid``, as the share of its expert's gain over zero-shot (lambda = 1 is
      the expert: share 1);
    - Task Arithmetic on every pair a < b, theta_0 + lambda (tau_a + tau_b): lambda picked
      on the pair's average validation accuracy (the first best), then both tasks' test
      accuracies, their mean normalised accuracy (acc / expert) and the share of the
      experts' gain kept (``gain_share`` of the two-task averages).
    ``zs`` / ``experts_acc``: (T,) test accuracies of zero-shot and of each expert."""
    T = len(ctx.tasks)
    pairs = [(a, b) for a in range(T) for b in range(a + 1, T)]

    def state(tasks: tuple[int, ...], lam: float):
        w = [lam if t in tasks else 0.0 for t in range(T)]
        return merging.weighted_task_arithmetic(*ctx.task_vector_inputs, w)

    def compute(out: Path):
        curves = [
            models_accuracies(ctx, (state((t,), lam) for lam in grid), "pairs", "test", [t])[
                :, t
            ].tolist()
            for t in range(T)
        ]
        rows = []
        for a, b in pairs:
            val = models_accuracies(
                ctx, (state((a, b), lam) for lam in grid), "pairs", "val", [a, b]
            )[:, [a, b]]
            lam = grid[int(np.argmax(val.mean(axis=1)))]
            test = models_accuracies(ctx, [state((a, b), lam)], "pairs", "test", [a, b])
            rows.append({"a": a, "b": b, "lambda": lam, "test": test[0, [a, b]].tolist()})
        atomic_write_text(out / "merges.json", json.dumps({"curves": curves, "pairs": rows}))

    material = {
        "suite": ctx.suite.key,
        "grid": grid,
        "code": code_version("merging.task_arithmetic", "pipeline.methods", "pipeline.features"),
    }
    unit = ctx.cache.unit("diagnostics_task_vectors", material, compute)
    saved = json.loads(unit.file("merges.json").read_text())
    curves = {
        task: dg.gain_share(
            saved["curves"][t], np.full(len(grid), zs[t]), np.full(len(grid), experts_acc[t])
        ).per_task.tolist()
        for t, task in enumerate(ctx.tasks)
    }
    normalized, kept, lambdas = (np.full((T, T), np.nan) for _ in range(3))
    for r in saved["pairs"]:
        a, b, acc = r["a"], r["b"], np.asarray(r["test"])
        idx = [a, b]
        normalized[a, b] = normalized[b, a] = float(np.mean(acc / experts_acc[idx]))
        kept[a, b] = kept[b, a] = dg.gain_share(acc, zs[idx], experts_acc[idx]).average
        lambdas[a, b] = lambdas[b, a] = r["lambda"]
    return {
        "grid": grid,
        "gain_curve": curves,
        "lambda": lambdas.tolist(),
        "normalized_accuracy": normalized.tolist(),
        "gain_kept": kept.tolist(),
        "mean_normalized_accuracy": _offdiag_nanmean(normalized),
        "mean_gain_kept": _offdiag_nanmean(kept),
    }


def group_merges(ctx: Context, grid: list[float], zs: np.ndarray, experts_acc: np.ndarray) -> dict:
    """Task Arithmetic with the task vectors on a subset of the weights (one cache unit per
    suite, grid and code): for ``all`` weights, and for each group G of
    ``dg.parameter_groups`` ``only G`` (theta_0 + lambda sum_t tau_t on G's weights, theta_0
    elsewhere) and ``all but G`` (the complement); lambda picked on the average validation
    accuracy over tasks (the first best), then every task's test accuracy and the share of
    the experts' gain kept (``gain_share`` of the averages)."""
    pre, experts = ctx.task_vector_inputs
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    groups = dg.parameter_groups(keys)
    rows = {"all": keys}
    for name, members in groups.items():
        inside = set(members)
        rows[f"only {name}"] = members
        rows[f"all but {name}"] = [k for k in keys if k not in inside]
    members = [set(m) for m in rows.values()]

    def states(lam: float, which: list[int]):
        """The merges of rows ``which`` at ``lam``, from one Task Arithmetic state."""
        full = merging.task_arithmetic(pre, experts, scale=lam)
        for i in which:
            yield {k: full[k] if k in members[i] else v for k, v in pre.items()}

    def compute(out: Path):
        every = list(range(len(rows)))  # lambda outer: one full merge in memory at a time
        val = np.stack(
            [models_accuracies(ctx, states(lam, every), "groups", "val") for lam in grid], 1
        )  # (rows, lambdas, tasks)
        best = np.argmax(val.mean(axis=2), axis=1)  # the first best lambda of each row
        test = np.full((len(rows), len(ctx.tasks)), np.nan)
        for g in sorted(set(best.tolist())):
            which = [i for i in every if best[i] == g]
            test[which] = models_accuracies(ctx, states(grid[g], which), "groups", "test")
        saved = {
            row: {
                "weights": len(names),
                "entries": int(sum(pre[k].numel() for k in names)),
                "lambda": grid[best[i]],
                "val_average": val[i].mean(axis=1).tolist(),
                "test": test[i].tolist(),
            }
            for i, (row, names) in enumerate(rows.items())
        }
        atomic_write_text(out / "groups.json", json.dumps(saved))

    material = {
        "suite": ctx.suite.key,
        "grid": grid,
        "code": code_version(
            "merging.task_arithmetic",
            "pipeline.methods",
            "pipeline.features",
            "evaluation.diagnostics",
        ),
    }
    with tqdm(
        total=len(rows) * (len(grid) + 1),
        desc="task vectors by parameter group",
        unit=" model",
        disable=not ctx.progress,
    ) as ctx.bar:  # models_accuracies advances it (the pipeline's preference bar)
        try:
            unit = ctx.cache.unit("diagnostics_groups", material, compute)
        finally:
            ctx.bar = None
    saved = json.loads(unit.file("groups.json").read_text())
    for r in saved.values():
        r["test_average"] = float(np.mean(r["test"]))
        r["gain_kept"] = dg.gain_share(np.asarray(r["test"]), zs, experts_acc).average
    return {"grid": grid, "groups": {g: len(m) for g, m in groups.items()}, "rows": saved}


def measure(
    cfg,
    merges: dict,
    grid: list[float],
    energy: float,
    pair_grid: list[float],
    group_grid: list[float] | None = None,
) -> dict:
    """Every number of the regime report (see the module docstring); plain JSON types."""
    device = apply_runtime(cfg)
    cache = Cache(cfg.paths.cache_dir)
    cache.sweep_tmp()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    suite = load_suite(cfg, cache)
    seconds["prepare (suite)"] = time.perf_counter() - t
    ctx = Context(cfg, cache, suite, device, progress=cfg.progress)
    tasks = ctx.tasks

    T = len(tasks)
    t = time.perf_counter()
    with ctx.feature_bar("zero-shot and experts", 2 * T):  # one bar per phase, not per unit
        acc = {"zero-shot": model_accuracies(ctx, ctx.pretrained_ref())}
        acc["experts"] = np.array(
            [ctx.accuracy(ctx.features(ctx.expert_ref(task), task, "test"), task) for task in tasks]
        )
    seconds["zero-shot and experts"] = time.perf_counter() - t

    t = time.perf_counter()
    with ctx.feature_bar("Task Arithmetic: lambda search", (len(grid) + 1) * T):
        val = np.array([model_accuracies(ctx, ta_ref(ctx, lam), "val") for lam in grid])  # (L, T)
        best = grid[int(np.argmax(val.mean(axis=1)))]
        ta = ta_ref(ctx, best)
        acc["Task Arithmetic"] = model_accuracies(ctx, ta)
    seconds["Task Arithmetic (lambda search)"] = time.perf_counter() - t

    merge_seconds = {}
    for label, merge_cfg in merges.items():
        t = time.perf_counter()
        ref, merge_seconds[label] = merged_ref(ctx, merge_cfg, label)
        with ctx.feature_bar(label, T):
            acc[label] = model_accuracies(ctx, ref)
        seconds[label] = time.perf_counter() - t

    t = time.perf_counter()
    with ctx.feature_bar("geometry", 3 * T):
        feats = {
            "zero-shot": [ctx.features(ctx.pretrained_ref(), task, "test") for task in tasks],
            "experts": [ctx.features(ctx.expert_ref(task), task, "test") for task in tasks],
            "Task Arithmetic": [ctx.features(ta, task, "test") for task in tasks],
        }
    geometry = {}
    for model, fs in feats.items():
        per_task = [dg.effective_dimension(f, energy) for f in fs]
        row = {task: _ed(e) for task, e in zip(tasks, per_task, strict=True)}
        if model != "experts":  # each expert is only measured on its own task: no pooling
            pooled = np.concatenate([f.numpy() for f in fs])
            w = np.concatenate([np.full(len(f), 1.0 / len(f)) for f in fs])
            row["pooled"] = _ed(dg.effective_dimension(pooled, energy, weights=w))
        geometry[model] = row
    ov = dg.pairwise_overlaps(feats["Task Arithmetic"], energy)
    hov = dg.head_overlaps([ctx.heads[task] for task in tasks])
    cosines = dg.task_vector_cosines(*ctx.task_vector_inputs)
    seconds["geometry"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs = task_vector_merges(
        ctx, pair_grid, np.asarray(acc["zero-shot"]), np.asarray(acc["experts"])
    )
    seconds["one and two task vectors"] = time.perf_counter() - t
    groups = None
    if group_grid is not None:
        t = time.perf_counter()
        groups = group_merges(
            ctx, group_grid, np.asarray(acc["zero-shot"]), np.asarray(acc["experts"])
        )
        seconds["task vectors by parameter group"] = time.perf_counter() - t

    zs, ex = acc["zero-shot"], acc["experts"]
    shares = {
        m: dg.gain_share(a, zs, ex) for m, a in acc.items() if m not in ("zero-shot", "experts")
    }
    events = [e for _, _, e in cache.events]
    return {
        "suite": suite.name,
        "suite_key": suite.key,
        "tasks": tasks,
        "D": int(feats["zero-shot"][0].shape[1]),
        "split_sizes": {
            task: {s: suite.split_size(task, s) for s in ("train", "val", "test")} for task in tasks
        },
        "accuracy": {m: _task_dict(tasks, a) for m, a in acc.items()},
        "gain_share": {
            m: {**_task_dict(tasks, g.per_task), "average": g.average} for m, g in shares.items()
        },
        "task_arithmetic": {
            "lambda": best,
            "grid": grid,
            "val_average": val.mean(axis=1).tolist(),
            "val_accuracy": {task: val[:, i].tolist() for i, task in enumerate(tasks)},
        },
        "merges": {
            label: {"config": _plain(c), "merge_seconds": merge_seconds[label]}
            for label, c in merges.items()
        },
        "effective_dimension": {"energy": energy, "centered": True, "models": geometry},
        "subspace_overlap": {
            "features": "Task Arithmetic at the validation lambda, test split",
            "dims": dict(zip(tasks, ov.dims, strict=True)),
            "overlap": ov.overlap.tolist(),
            "chance": ov.chance.tolist(),
            "mean_offdiagonal": _offdiag_mean(ov.overlap),
            "mean_offdiagonal_chance": _offdiag_mean(ov.chance),
        },
        "head_overlap": {
            "heads": "each task's class vectors, centred (rank <= C - 1)",
            "dims": dict(zip(tasks, hov.dims, strict=True)),
            "overlap": hov.overlap.tolist(),
            "chance": hov.chance.tolist(),
            "mean_offdiagonal": _offdiag_mean(hov.overlap),
            "mean_offdiagonal_chance": _offdiag_mean(hov.chance),
        },
        "task_vector_cosines": {
            "cosine": cosines.tolist(),
            "mean_offdiagonal": _offdiag_mean(cosines),
        },
        "pairs": pairs,
        **({} if groups is None else {"parameter_groups": groups}),
        "targets": targets(acc, shares),
        "seconds": seconds,
        "cache": {"computed": events.count("computed"), "hits": events.count("hit")},
        "device": str(device),
    }


def targets(acc: dict, shares: dict) -> list[dict]:
    avg = {m: float(np.mean(a)) for m, a in acc.items()}
    lo, hi = TARGETS["zeroshot_ratio"]
    ratio = avg["zero-shot"] / avg["experts"]
    share = shares["Task Arithmetic"].average
    slo, shi = TARGETS["ta_gain_share"]
    order = [avg[m] for m in ("Task Arithmetic", "TIES", "AdaMerging")]
    ex = np.asarray(acc["experts"])
    return [
        {
            "target": f"zero-shot average {lo:.0%} to {hi:.0%} of the experts'",
            "value": ratio,
            "shown": f"{100 * ratio:.1f}% ({100 * avg['zero-shot']:.1f} / {100 * avg['experts']:.1f})",
            "met": bool(lo <= ratio <= hi),
        },
        {
            "target": f"Task Arithmetic keeps {slo:.0%} to {shi:.0%} of the experts' gain",
            "value": share,
            "shown": f"{100 * share:.1f}%",
            "met": bool(slo <= share <= shi),
        },
        {
            "target": "ordering TA < TIES < AdaMerging (average accuracy)",
            "value": order,
            "shown": " < ".join(f"{100 * v:.1f}" for v in order),
            "met": bool(order[0] < order[1] < order[2]),
        },
        {
            "target": f"every expert at >= {TARGETS['expert_min']:.0%}",
            "value": float(ex.min()),
            "shown": f"min {100 * ex.min():.1f}, average {100 * ex.mean():.1f}",
            "met": bool(ex.min() >= TARGETS["expert_min"]),
        },
    ]


def markdown(r: dict, command: str) -> str:
    tasks = r["tasks"]
    pct = lambda v: "" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731
    frac = lambda v: "n/a" if v is None or v != v else f"{v:.2f}"  # noqa: E731
    ta = r["task_arithmetic"]
    ada = r["merges"]["AdaMerging"]["config"]
    ties = r["merges"]["TIES"]["config"]
    labels = {
        "zero-shot": "zero-shot (pretrained encoder, suite heads)",
        "experts": "experts (each on its own task)",
        "Task Arithmetic": f"Task Arithmetic (lambda {ta['lambda']:g}, picked on val)",
        "TIES": f"TIES ({ties['combine']}, lambda {ties['scale']:g}, density {ties['density']:g})",
        "AdaMerging": f"AdaMerging ({ada['granularity']}-wise, {ada['steps']} steps)",
    }
    head = "| " + " | ".join(tasks) + " |"
    sep = "|---" * (len(tasks) + 2) + "|"
    out = [
        f"## Regime of the `{r['suite']}` suite ({len(tasks)} tasks, D = {r['D']})",
        "",
        f"Command: `{command}`. No ReACT or baseline result is computed.",
        "",
        "Test accuracy (%) and the share of the experts' gain over zero-shot each merge keeps:",
        "",
        "| model " + head + " avg | gain kept |",
        sep + "---|",
    ]
    for m, a in r["accuracy"].items():
        share = r["gain_share"].get(m, {}).get("average")
        cells = [pct(a[t]) for t in tasks] + [
            pct(a["average"]),
            "" if share is None else frac(share),
        ]
        out.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Share of each task's expert gain kept, (merge - zero-shot) / (expert - zero-shot):",
        "",
        "| merge " + head + " of averages |",
        sep,
    ]
    for m, g in r["gain_share"].items():
        cells = [frac(g[t]) for t in tasks] + [frac(g["average"])]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    ed = r["effective_dimension"]
    out += [
        "",
        f"Effective dimension of the test features (centred covariance): participation ratio "
        f"/ dimensions holding {ed['energy']:.0%} of the energy, of {r['D']}; pooled: all "
        "tasks, each with equal weight:",
        "",
        "| features " + head + " pooled |",
        sep,
    ]
    for m, row in ed["models"].items():
        cells = [f"{row[t]['participation_ratio']:.1f} / {row[t]['energy_dim']}" for t in tasks]
        pooled = row.get("pooled")
        cells.append(
            f"{pooled['participation_ratio']:.1f} / {pooled['energy_dim']}" if pooled else ""
        )
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    so = r["subspace_overlap"]
    out += [
        "",
        f"Pairwise overlap of the tasks' feature subspaces ({so['features']}): mean squared cosine "
        "of the principal angles between the top-k principal subspaces (k = the task's "
        f"{ed['energy']:.0%}-energy dimension); in brackets the chance level max(k_a, k_b) / D. "
        f"Mean off-diagonal {so['mean_offdiagonal']:.2f} (chance {so['mean_offdiagonal_chance']:.2f}).",
        "",
        *_overlap_table(tasks, so),
    ]
    ho = r["head_overlap"]
    out += [
        "",
        "Pairwise overlap of the tasks' head subspaces (the span of each task's class vectors "
        "after removing their mean: what a prediction within the task reads; k = C - 1), as "
        "above, chance in brackets. Mean off-diagonal "
        f"{ho['mean_offdiagonal']:.2f} (chance {ho['mean_offdiagonal_chance']:.2f}).",
        "",
        *_overlap_table(tasks, ho),
    ]
    cos, pr = r["task_vector_cosines"], r["pairs"]
    out += [
        "",
        "How separately the experts moved the weights. Upper triangle: cosine of the task "
        "vectors tau_a, tau_b (every float weight). Lower triangle: Task Arithmetic on the pair "
        "alone, theta_0 + lambda (tau_a + tau_b) with lambda picked on the pair's validation "
        f"split from {', '.join(f'{v:g}' for v in pr['grid'])}: test accuracy normalised by "
        "the experts' (mean of the two) and, in brackets, the share of the two experts' gain "
        f"kept. Mean cosine {cos['mean_offdiagonal']:.2f}; pairs: mean normalised accuracy "
        f"{pct(pr['mean_normalized_accuracy'])}%, mean gain kept {frac(pr['mean_gain_kept'])}.",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, t in enumerate(tasks):
        cells = []
        for j in range(len(tasks)):
            if i == j:
                cells.append("1")
            elif j > i:
                cells.append(f"{cos['cosine'][i][j]:.2f}")
            else:
                cells.append(
                    f"{pct(pr['normalized_accuracy'][i][j])} ({frac(pr['gain_kept'][i][j])})"
                )
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Gain curve of each task vector alone: share of its expert's gain over zero-shot that "
        "theta_0 + lambda tau_t keeps on its own task (test; lambda = 1 is the expert):",
        "",
        "| lambda | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, lam in enumerate(pr["grid"]):
        out.append(f"| {lam:g} | " + " | ".join(frac(pr["gain_curve"][t][i]) for t in tasks) + " |")
    if "parameter_groups" in r:
        out += _groups_table(r["parameter_groups"], pct, frac)
    out += ["", "Targets (the paper's regime):", "", "| target | value | |", "|---|---|---|"]
    out += [
        f"| {g['target']} | {g['shown']} | {'met' if g['met'] else '**not met**'} |"
        for g in r["targets"]
    ]
    grid = ta["grid"]
    out += [
        "",
        f"Task Arithmetic: lambda from {len(grid)} values {grid[0]:g}..{grid[-1]:g} on the "
        f"validation split (best average validation accuracy {pct(max(ta['val_average']))}). "
        f"AdaMerging: entropy on unlabeled `{ada['data_split']}` batches of {ada['batch_size']} "
        f"per task, lr {ada['lr']:g}, init {ada['init']:g} (the paper's transductive protocol). "
        "Split sizes (train / val / test): "
        + ", ".join(f"{t} {s['train']}/{s['val']}/{s['test']}" for t, s in r["split_sizes"].items())
        + ".",
        "",
        "Time (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
        + "; merge computations when first made: "
        + ", ".join(f"{k} {v['merge_seconds']:.1f}" for k, v in r["merges"].items())
        + f"; cache units computed {r['cache']['computed']}, read {r['cache']['hits']}; "
        f"device {r['device']}.",
        "",
    ]
    return "\n".join(out)


def _groups_table(pg: dict, pct, frac) -> list[str]:
    """Markdown section of ``group_merges``' rows."""
    out = [
        "",
        "Where the interference sits: Task Arithmetic on all tasks with the task vectors on "
        "one group of weights only, or on all weights but that group (the rest at theta_0); "
        f"lambda picked on the validation split from {', '.join(f'{v:g}' for v in pg['grid'])} "
        "for each row. Test accuracy (average over tasks) and the share of the experts' gain "
        "kept:",
        "",
        "| task vectors on | weights (entries) | lambda | avg | gain kept |",
        "|---|---|---|---|---|",
    ]
    for name, row in pg["rows"].items():
        out.append(
            f"| {name} | {row['weights']} ({row['entries']:,}) | {row['lambda']:g} | "
            f"{pct(row['test_average'])} | {frac(row['gain_kept'])} |"
        )
    return out


def _overlap_table(tasks: list[str], ov: dict) -> list[str]:
    """Markdown rows of a pairwise overlap matrix (``ov``: dims, overlap, chance)."""
    rows = [
        "| | " + " | ".join(f"{t} (k {ov['dims'][t]})" for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, t in enumerate(tasks):
        cells = [
            f"{ov['overlap'][i][j]:.2f} ({ov['chance'][i][j]:.2f})" if i != j else "1"
            for j in range(len(tasks))
        ]
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    return rows


def _ed(e: dg.EffectiveDimension) -> dict:
    return {"participation_ratio": e.participation_ratio, "energy_dim": e.energy_dim, "n": e.n}


def _task_dict(tasks: list[str], values) -> dict:
    values = [float(v) for v in values]
    return {**dict(zip(tasks, values, strict=True)), "average": float(np.mean(values))}


def _offdiag_mean(m: np.ndarray) -> float:
    return float(m[~np.eye(len(m), dtype=bool)].mean())


def _offdiag_nanmean(m: np.ndarray) -> float:
    """Mean of the off-diagonal entries that are defined (NaN when none is)."""
    v = m[~np.eye(len(m), dtype=bool)]
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, help="output folder (default <paths.output_dir>/diagnostics/<time>)"
    )
    ap.add_argument(
        "--fast",
        action="store_true",
        help=f"quick look: AdaMerging {FAST_ADAMERGING_STEPS} steps (unless --adamerging-steps)",
    )
    ap.add_argument(
        "--adamerging-steps",
        type=int,
        help="AdaMerging steps (default: configs/merge/adamerging.yaml)",
    )
    ap.add_argument(
        "--lambda-grid",
        default="0.05:1.0:0.05",
        help="Task Arithmetic lambdas tried on the validation split: start:stop:step or a,b,c",
    )
    ap.add_argument(
        "--pair-grid",
        default="0.2:1.0:0.2",
        help="lambdas of the pairwise Task Arithmetic merges (validation): start:stop:step or a,b,c",
    )
    ap.add_argument(
        "--energy", type=float, default=0.9, help="energy fraction of the effective dimension"
    )
    ap.add_argument(
        "--groups",
        action="store_true",
        help="also Task Arithmetic on one group of weights only / all but one (where the "
        "interference sits; 2 x (kinds + blocks) + 1 lambda searches)",
    )
    ap.add_argument(
        "--group-grid",
        help=f"lambdas of the --groups merges (validation; default {GROUP_GRID}): "
        "start:stop:step or a,b,c",
    )
    args, cfg = script_config(ap, argv)
    merge_overrides = [o for o in args.overrides if o.lstrip("+~").startswith("merge")]
    if merge_overrides:
        ap.error(
            f"{merge_overrides}: the diagnostics run fixed merges (Task Arithmetic on a lambda "
            "grid, configs/merge/ties.yaml, configs/merge/adamerging.yaml); use --lambda-grid "
            "and --adamerging-steps"
        )
    try:
        grid = parse_grid(args.lambda_grid)
        pair_grid = parse_grid(args.pair_grid, "--pair-grid")
        if args.group_grid is not None and not args.groups:
            raise ValueError("--group-grid is the lambda grid of --groups: add --groups")
        group_grid = (
            parse_grid(args.group_grid or GROUP_GRID, "--group-grid") if args.groups else None
        )
    except ValueError as e:
        ap.error(str(e))
    if not 0 < args.energy <= 1:
        ap.error(f"--energy must be a fraction in (0, 1], got {args.energy}")
    steps = args.adamerging_steps
    if steps is None and args.fast:
        steps = FAST_ADAMERGING_STEPS
    if steps is not None and steps < 0:
        ap.error(f"--adamerging-steps must be >= 0, got {steps}")
    extra = [] if steps is None else [f"merge.steps={steps}"]
    merges = {
        "TIES": compose_config([*args.overrides, "merge=ties"]).merge,
        "AdaMerging": compose_config([*args.overrides, "merge=adamerging", *extra]).merge,
    }
    out = script_output_dir(args.out, cfg, "diagnostics")

    t0 = time.perf_counter()
    result = measure(cfg, merges, grid, args.energy, pair_grid, group_grid)
    result["seconds"]["total"] = time.perf_counter() - t0
    result["command"] = "python scripts/suite_diagnostics.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    text = markdown(result, result["command"])
    atomic_write_text(out / "regime.md", text)
    atomic_write_text(out / "regime.json", json.dumps(result, indent=1))
    print(text)
    print(f"written: {out / 'regime.md'}, {out / 'regime.json'}")
    return result


if __name__ == "__main__":
    main()
