"""t-SNE of merged, expert and ReACT-corrected test embeddings (`make tsne`).

    python scripts/tsne.py suite=offline backbone=offline [merge=ties] [--max-per-task 200] [--out DIR]

``key=value`` arguments are Hydra overrides of ``configs/config.yaml`` (as for
``python -m pipeline.main``); ``--...`` flags belong to this script.

Uses the pipeline's cached stages (``pipeline.main.prepare_context``: built suite, merge;
``Context.features``; ``ReACT.fit``: calibration statistics), so after a pipeline run with
the same config nothing but the t-SNE is computed. Per task, up to ``--max-per-task``
seeded test images are embedded by four models:

- ``expert``: the task's own expert,
- ``merged``: the merged model (``cfg.merge``),
- ``ReACT one-hot``: the merged embedding corrected with W_p, p = e_task,
- ``ReACT equal``: corrected with W_p, p = (1/T, ..., 1/T).

Embeddings are L2-normalised (the heads score cosines) and reduced with
``sklearn.manifold.TSNE`` (PCA init, seeded by ``cfg.seed``). Two figures:

- ``tsne_by_task``: one t-SNE per task over its four models' embeddings, coloured by model
  (does the correction move the merged embeddings onto the expert's?);
- ``tsne_by_model``: one joint t-SNE over every model and task, one panel per model,
  coloured by task, the other models' points in light grey (are the tasks separated?).

Writes ``tsne_by_task.png/.pdf``, ``tsne_by_model.png/.pdf`` and ``tsne_points.csv``
(coordinates, task, model, label) into ``--out`` (default ``<paths.output_dir>/tsne/<time>``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from correction import react  # noqa: E402
from evaluation.plots import save_figure  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.main import apply_runtime, prepare_context, script_config, script_output_dir  # noqa: E402
from pipeline.methods import build_method  # noqa: E402

MODELS = ("expert", "merged", "ReACT one-hot", "ReACT equal")
MODEL_STYLE = {  # colour, marker
    "expert": ("#d62728", "o"),
    "merged": ("#7f7f7f", "x"),
    "ReACT one-hot": ("#1f77b4", "^"),
    "ReACT equal": ("#2ca02c", "s"),
}


def embeddings(cfg, max_per_task: int, device) -> pd.DataFrame:
    """Long table: task, model, index, label, then D embedding columns (L2-normalised)."""
    cache = Cache(cfg.paths.cache_dir)
    ctx = prepare_context(cfg, cache, device)
    tasks = ctx.tasks
    method = build_method("react", cfg.correction)
    method.fit(ctx)
    T = len(tasks)
    prefs = np.vstack([np.eye(T), np.full((1, T), 1.0 / T)])
    W = method.maps(prefs)  # (T + 1, D, D): one-hot per task, then equal
    normalize_fit = bool(cfg.correction.normalize_features)
    frames = []
    for j, task in enumerate(tasks):
        z_m = ctx.features(ctx.merged, task, "test")
        z_e = ctx.features(ctx.expert_ref(task), task, "test")
        labels = ctx.labels(task, "test").numpy()
        rng = np.random.default_rng([int(cfg.seed), j])
        n = len(z_m)
        idx = np.sort(rng.choice(n, size=min(n, max_per_task), replace=False))
        zm = z_m[idx]
        zin = torch.nn.functional.normalize(zm, dim=-1) if normalize_fit else zm
        z = {
            "expert": z_e[idx],
            "merged": zm,
            "ReACT one-hot": react.apply(W[j], zin),
            "ReACT equal": react.apply(W[T], zin),
        }
        for model in MODELS:
            e = torch.nn.functional.normalize(z[model].float(), dim=-1).numpy()
            df = pd.DataFrame(e, columns=[f"e{i}" for i in range(e.shape[1])])
            df.insert(0, "label", labels[idx])
            df.insert(0, "index", idx)
            df.insert(0, "model", model)
            df.insert(0, "task", task)
            frames.append(df)
    return pd.concat(frames, ignore_index=True), tasks


def tsne(x: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    from sklearn.manifold import TSNE

    p = min(perplexity, max(2.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(x)


def run_tsne(
    points: pd.DataFrame, seed: int, perplexity: float, progress: bool = True
) -> pd.DataFrame:
    """One t-SNE per task, then a joint one; a bar over them (the joint one is the longest)."""
    from tqdm.auto import tqdm

    cols = [c for c in points.columns if c.startswith("e") and c[1:].isdigit()]
    out = points[["task", "model", "index", "label"]].copy()
    out[["task_x", "task_y"]] = np.nan
    groups = list(points.groupby("task", sort=False))
    with tqdm(total=len(groups) + 1, desc="t-SNE", unit="map", disable=not progress) as bar:
        for task, d in groups:
            bar.set_postfix_str(f"{task} ({len(d)} points)")
            out.loc[d.index, ["task_x", "task_y"]] = tsne(
                d[cols].to_numpy(np.float64), seed, perplexity
            )
            bar.update()
        bar.set_postfix_str(f"all tasks ({len(points)} points)")
        out[["joint_x", "joint_y"]] = tsne(points[cols].to_numpy(np.float64), seed, perplexity)
        bar.update()
    return out


def _grid(n: int, ncols_max: int = 4) -> tuple[int, int]:
    ncols = min(ncols_max, n)
    return math.ceil(n / ncols), ncols


def figure_by_task(xy: pd.DataFrame, tasks: list[str], title: str):
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from evaluation import plots

    nrows, ncols = _grid(len(tasks))
    with mpl.rc_context(plots.STYLE):
        fig = Figure(figsize=(3.3 * ncols, 3.2 * nrows + 0.9), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, task in zip(axes, tasks, strict=False):
            d = xy[xy.task == task]
            for model in MODELS:
                m = d[d.model == model]
                colour, marker = MODEL_STYLE[model]
                if model == "expert":  # hollow and larger: what lands on it stays visible
                    ax.scatter(
                        m.task_x,
                        m.task_y,
                        s=26,
                        facecolors="none",
                        edgecolors=colour,
                        linewidths=0.9,
                    )
                else:
                    ax.scatter(
                        m.task_x, m.task_y, s=9, c=colour, marker=marker, alpha=0.6, linewidths=0.6
                    )
            ax.set_title(f"{task} ({len(d) // len(MODELS)} test images)")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        for ax in axes[len(tasks) :]:
            ax.set_visible(False)
        handles = [
            Line2D(
                [],
                [],
                ls="none",
                marker=MODEL_STYLE[m][1],
                color=MODEL_STYLE[m][0],
                label=m,
                ms=6,
                mfc="none" if m == "expert" else MODEL_STYLE[m][0],
            )
            for m in MODELS
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(MODELS), frameon=False)
        fig.suptitle(title)
    return fig


def figure_by_model(xy: pd.DataFrame, tasks: list[str], title: str):
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from evaluation import plots

    cmap = mpl.colormaps["tab10"]
    colours = {t: cmap(i % 10) for i, t in enumerate(tasks)}
    with mpl.rc_context(plots.STYLE):
        fig = Figure(figsize=(3.3 * len(MODELS), 3.2 + 0.9), layout="constrained")
        axes = fig.subplots(1, len(MODELS), squeeze=False).ravel()
        for ax, model in zip(axes, MODELS, strict=True):
            other = xy[xy.model != model]
            ax.scatter(other.joint_x, other.joint_y, s=4, c="0.88", linewidths=0)
            for task in tasks:
                m = xy[(xy.model == model) & (xy.task == task)]
                ax.scatter(m.joint_x, m.joint_y, s=8, color=colours[task], alpha=0.75, linewidths=0)
            ax.set_title(model)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        handles = [
            Line2D([], [], ls="none", marker="o", color=colours[t], label=t, ms=6) for t in tasks
        ]
        handles.append(
            Line2D([], [], ls="none", marker="o", color="0.8", label="other models", ms=6)
        )
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 9), frameon=False
        )
        fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, help="output folder (default <paths.output_dir>/tsne/<time>)"
    )
    ap.add_argument(
        "--max-per-task", type=int, default=200, help="test images per task (seeded subset)"
    )
    ap.add_argument(
        "--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped at (n-1)/3)"
    )
    args, cfg = script_config(ap, argv)
    if args.max_per_task < 2:
        ap.error("--max-per-task must be >= 2")
    device = apply_runtime(cfg)
    out = script_output_dir(args.out, cfg, "tsne")

    t0 = time.perf_counter()
    points, tasks = embeddings(cfg, args.max_per_task, device)
    t1 = time.perf_counter()
    xy = run_tsne(points, int(cfg.seed), args.perplexity, progress=bool(cfg.progress))
    t2 = time.perf_counter()
    xy.to_csv(out / "tsne_points.csv", index=False)
    label = f"{cfg.suite.name} suite, merge {cfg.merge.name}, beta {cfg.correction.beta}"
    written = save_figure(
        figure_by_task(xy, tasks, f"t-SNE per task of test embeddings ({label})"),
        out,
        "tsne_by_task",
    )
    written += save_figure(
        figure_by_model(
            xy, tasks, f"Joint t-SNE of all tasks' test embeddings, by model ({label})"
        ),
        out,
        "tsne_by_model",
    )
    print(
        f"embeddings: {t1 - t0:.1f} s (cached stages), t-SNE: {t2 - t1:.1f} s; {len(points)} points"
    )
    for p in written:
        print(f"written: {p}")
    return xy


if __name__ == "__main__":
    main()
