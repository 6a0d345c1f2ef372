"""The paper's figures, from the pipeline's tidy tables. No pyplot: figures are built as
``matplotlib.figure.Figure`` objects and rendered with the Agg (PNG) and PDF backends, so
importing this module changes no global matplotlib state.

Tidy tables (pandas DataFrames) used by the whole pipeline; accuracies are fractions in
[0, 1] and every axis shows them in percent:

- ``results``:     [method, pref_set, pref_id, task, accuracy, normalized_accuracy]
- ``preferences``: [pref_set, pref_id] + one float column per task name (its weight)
- ``reference``:   [label, task, accuracy, normalized_accuracy] for fixed models, labels
  like "pretrained", "merged (task_arithmetic)", "expert" (expert = each expert on its
  own task)

Pairwise sweeps are the preference sets named ``f"pairwise:{a}|{b}"``.

Each ``plot_*`` function writes ``<stem>.png`` and ``<stem>.pdf`` into ``out_dir`` and
returns the written paths; the matching ``*_figure`` function returns the Figure itself
(used by the tests to check labels, and by notebooks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, MaxNLocator
from matplotlib.tri import Triangulation

__all__ = [
    "METHOD_NAMES",
    "cost_figure",
    "display_name",
    "pairwise_fronts_figure",
    "pairwise_set_name",
    "plot_cost",
    "plot_pairwise_fronts",
    "plot_scenario_bars",
    "plot_simplex_maps",
    "scenario_bars_figure",
    "simplex_limits",
    "simplex_maps_figure",
    "plot_sweep",
    "sweep_figure",
]

RESULTS_COLUMNS = ("method", "pref_set", "pref_id", "task", "accuracy", "normalized_accuracy")
REFERENCE_COLUMNS = ("label", "task", "accuracy", "normalized_accuracy")
METRICS = {"accuracy": "accuracy", "normalized_accuracy": "normalised accuracy"}
SCENARIO_ORDER = ("equal", "priority", "one_hot")
SCENARIO_NAMES = {"equal": "equal", "priority": "priority", "one_hot": "one-hot"}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable / searchable in the PDF
}
DPI = 150
_REF_MARKERS = ("X", "P", "D", "v", "^", "<", "h")
_REF_COLOURS = ("0.35", "tab:brown", "tab:pink", "tab:olive", "0.6", "tab:cyan", "0.1")


# ----------------------------------------------------------------------------- helpers
METHOD_NAMES = {
    "react": "ReACT",
    "pref_ta": "preference-weighted TA",
    "pareto_merging": "Pareto Merging",
    "map": "MAP",
    "surgery": "Representation Surgery",
}


def display_name(method: str) -> str:
    """The name legends show for a method id (``pref_ta`` -> "preference-weighted TA")."""
    return METHOD_NAMES.get(str(method), str(method))


def pairwise_set_name(a: str, b: str) -> str:
    """Name of the pairwise sweep between tasks a and b in ``results.pref_set``."""
    return f"pairwise:{a}|{b}"


def _require(df, columns: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what} is empty")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _check_fractions(values: np.ndarray, what: str) -> None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) and (v.min() < 0 or v.max() > 1.0 + 1e-9):
        raise ValueError(
            f"{what} must be fractions in [0, 1] (plots show them in %); got range "
            f"[{v.min():g}, {v.max():g}]. Divide percentages by 100."
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _colours(names: Sequence[str]) -> dict[str, object]:
    cmap = mpl.colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def save_figure(fig: Figure, out_dir, stem: str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` in the project's style."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    with mpl.rc_context(STYLE):
        fig.savefig(paths[0], dpi=DPI)
        fig.savefig(paths[1])
    return paths


def _figure(width: float, height: float) -> Figure:
    with mpl.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def _weights(preferences: pd.DataFrame, pref_set: str, tasks: Sequence[str]) -> pd.DataFrame:
    """Weights of ``tasks`` for the preferences of ``pref_set``, indexed by pref_id."""
    _require(preferences, ("pref_set", "pref_id", *tasks), "preferences")
    w = preferences[preferences.pref_set == pref_set]
    if w.empty:
        raise ValueError(
            f"preferences has no rows for pref_set {pref_set!r}; sets present: {sorted(preferences.pref_set.unique())}"
        )
    if w.pref_id.duplicated().any():
        raise ValueError(f"preferences has duplicate pref_id values in set {pref_set!r}")
    return w.set_index("pref_id")[list(tasks)].astype(float)


def _wide(results: pd.DataFrame, method: str, pref_set: str, metric: str) -> pd.DataFrame:
    """pref_id x task table of ``metric`` for one method and preference set."""
    sub = results[(results.method == method) & (results.pref_set == pref_set)]
    if sub.duplicated(["pref_id", "task"]).any():
        raise ValueError(
            f"results has duplicate (pref_id, task) rows for method {method!r}, set {pref_set!r}"
        )
    return sub.pivot(index="pref_id", columns="task", values=metric)


# ----------------------------------------------------------------------------- pairwise fronts
def _resolve_pairs(
    results: pd.DataFrame, tasks: Sequence[str], pairs
) -> list[tuple[str, str, str]]:
    """[(a, b, set name)]; the set may be stored as a|b or b|a."""
    sets = set(results.pref_set.unique())
    unknown = [t for pair in (pairs or []) for t in pair if t not in tasks]
    if unknown:
        raise ValueError(f"pairs name unknown task(s) {unknown}; tasks are {list(tasks)}")
    candidates = pairs if pairs is not None else list(combinations(tasks, 2))
    out = []
    for pair in candidates:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"each pair must name two different tasks, got {pair!r}")
        a, b = pair
        for name in (pairwise_set_name(a, b), pairwise_set_name(b, a)):
            if name in sets:
                out.append((a, b, name))
                break
        else:
            if pairs is not None:
                raise ValueError(
                    f"results has no pairwise sweep for ({a}, {b}): expected pref_set {pairwise_set_name(a, b)!r}"
                )
    if not out:
        raise ValueError(
            f"results has no pairwise sweeps (pref_set named 'pairwise:<a>|<b>') for tasks {list(tasks)}; "
            f"sets present: {sorted(sets)}"
        )
    return out


def pairwise_fronts_figure(
    results: pd.DataFrame,
    preferences: pd.DataFrame,
    reference: pd.DataFrame | None,
    tasks: Sequence[str],
    pairs: Sequence[tuple[str, str]] | None = None,
    metric: str = "accuracy",
) -> Figure:
    """Grid of panels, one per task pair (a, b): x = metric on a (%), y = metric on b (%).

    Per method, the curve traced by the sweep p = (w, 1 - w) on (a, b) in order of w
    (line + markers; a square marks w = 1, all weight on the x-axis task). Reference
    models (merged, pretrained, ...) are single points; the expert point is
    (expert a on a, expert b on b), with dotted guides at its coordinates.
    """
    _require(results, RESULTS_COLUMNS, "results")
    name = _check_metric(metric)
    if metric == "accuracy":
        _check_fractions(results.accuracy, "results.accuracy")
    triples = _resolve_pairs(results, tasks, pairs)
    methods = list(dict.fromkeys(results.method))
    colours = _colours(methods)
    if reference is not None and not (isinstance(reference, pd.DataFrame) and reference.empty):
        _require(reference, REFERENCE_COLUMNS, "reference")
        ref = reference.pivot_table(index="label", columns="task", values=metric, aggfunc="first")
        ref_labels = [lab for lab in dict.fromkeys(reference.label) if lab != "expert"]
    else:
        ref, ref_labels = None, []

    ncols = min(4, len(triples))
    nrows = math.ceil(len(triples) / ncols)
    narrow = ncols < 3  # legend to the right of few panels, below many
    fig = _figure(3.7 * ncols + (3.2 if narrow else 0.0), 3.5 * nrows + (0.4 if narrow else 0.9))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, object] = {}
    with mpl.rc_context(STYLE):
        for ax, (a, b, set_name) in zip(axes, triples, strict=False):
            w = _weights(preferences, set_name, [a])[a]
            for method in methods:
                wide = _wide(results, method, set_name, metric)
                if wide.empty:
                    continue
                missing = [t for t in (a, b) if t not in wide.columns]
                if missing:
                    raise ValueError(
                        f"results for {method!r} in {set_name!r} lack task(s) {missing}"
                    )
                if not set(wide.index) <= set(w.index):
                    raise ValueError(
                        f"results for {method!r} in {set_name!r} use pref_ids missing from preferences"
                    )
                order = w.loc[wide.index].sort_values(kind="stable").index
                x, y = 100 * wide.loc[order, a].to_numpy(), 100 * wide.loc[order, b].to_numpy()
                (line,) = ax.plot(
                    x, y, "-o", color=colours[method], ms=3.5, lw=1.4, label=display_name(method)
                )
                ax.plot(x[-1], y[-1], "s", color=colours[method], ms=7, mec="black", mew=0.8)
                handles.setdefault(method, line)
            if ref is not None:
                for i, label in enumerate(ref_labels):
                    if (
                        a in ref.columns
                        and b in ref.columns
                        and not np.isnan(ref.loc[label, [a, b]].to_numpy(float)).any()
                    ):
                        h = ax.plot(
                            100 * ref.loc[label, a],
                            100 * ref.loc[label, b],
                            _REF_MARKERS[i % len(_REF_MARKERS)],
                            color=_REF_COLOURS[i % len(_REF_COLOURS)],
                            ms=8,
                            mec="black",
                            mew=0.6,
                            ls="none",
                            label=label,
                        )[0]
                        handles.setdefault(label, h)
                if (
                    "expert" in ref.index
                    and not np.isnan(ref.loc["expert", [a, b]].to_numpy(float)).any()
                ):
                    ex, ey = 100 * ref.loc["expert", a], 100 * ref.loc["expert", b]
                    ax.axvline(ex, color="0.4", ls=":", lw=1)
                    ax.axhline(ey, color="0.4", ls=":", lw=1)
                    h = ax.plot(
                        ex,
                        ey,
                        "*",
                        color="gold",
                        ms=14,
                        mec="black",
                        mew=0.8,
                        ls="none",
                        label="experts",
                    )[0]
                    handles.setdefault("experts", h)
            ax.set_xlabel(f"{a} {name} (%)")
            ax.set_ylabel(f"{b} {name} (%)")
            ax.set_title(f"{a} vs {b}")
        for ax in axes[len(triples) :]:
            ax.set_visible(False)
        handles["end"] = Line2D(
            [],
            [],
            marker="s",
            color="white",
            mfc="0.8",
            mec="black",
            ms=7,
            ls="none",
            label="sweep end: all weight on the x-axis task",
        )
        fig.legend(
            list(handles.values()),
            [h.get_label() for h in handles.values()],
            loc="outside right center" if narrow else "outside lower center",
            ncols=1 if narrow else min(4, len(handles)),
            frameon=False,
        )
        fig.suptitle(f"Pairwise preference sweeps p = (w, 1 - w): {name} (%)")
    return fig


def plot_pairwise_fronts(
    results: pd.DataFrame,
    preferences: pd.DataFrame,
    reference: pd.DataFrame | None,
    tasks: Sequence[str],
    out_dir,
    pairs: Sequence[tuple[str, str]] | None = None,
    metric: str = "accuracy",
) -> list[Path]:
    """Write ``pairwise_fronts_<metric>.png/.pdf`` (see ``pairwise_fronts_figure``)."""
    fig = pairwise_fronts_figure(results, preferences, reference, tasks, pairs=pairs, metric=metric)
    return save_figure(fig, out_dir, f"pairwise_fronts_{metric}")


# ----------------------------------------------------------------------------- simplex maps
def _ternary_xy(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric (w1, w2, w3) -> plane: task 1 at (0, 0), task 2 at (1, 0), task 3 on top."""
    return w[:, 1] + 0.5 * w[:, 2], (math.sqrt(3) / 2) * w[:, 2]


def simplex_maps_figure(
    results: pd.DataFrame,
    preferences: pd.DataFrame,
    tasks3: Sequence[str],
    method: str | None = None,
    pref_set: str = "simplex3",
    metric: str = "accuracy",
    limits: dict[str, tuple[float, float]] | None = None,
) -> Figure:
    """Ternary maps over a 3-task preference simplex: one panel per task of ``tasks3`` with
    that task's metric (%) as colour (filled contours of the triangulated grid, grid points
    as dots), plus a panel with the mean over the three tasks. Each vertex is labelled by
    its task (the preference e_t). ``method`` may be omitted when results hold one method.
    ``limits``: colour range (%) per panel (task name, or "mean"), e.g. ``simplex_limits``
    over every method, so that maps of different methods share one scale per task; by
    default each panel spans its own data.
    """
    _require(results, RESULTS_COLUMNS, "results")
    name = _check_metric(metric)
    tasks3 = list(tasks3)
    if len(tasks3) != 3 or len(set(tasks3)) != 3:
        raise ValueError(f"tasks3 must name 3 different tasks, got {tasks3}")
    methods = list(dict.fromkeys(results.method))
    if method is None:
        if len(methods) != 1:
            raise ValueError(f"results hold several methods {methods}; pass method=...")
        method = methods[0]
    if method not in methods:
        raise ValueError(f"method {method!r} not in results (methods: {methods})")
    wide = _wide(results, method, pref_set, metric)
    if wide.empty:
        raise ValueError(f"results have no rows for method {method!r} and pref_set {pref_set!r}")
    missing = [t for t in tasks3 if t not in wide.columns]
    if missing:
        raise ValueError(f"results for {method!r} in {pref_set!r} lack task(s) {missing}")
    if metric == "accuracy":
        _check_fractions(wide[tasks3].to_numpy(), "results.accuracy")
    w = _weights(preferences, pref_set, tasks3)
    if not set(wide.index) <= set(w.index):
        raise ValueError(
            f"results for {method!r} in {pref_set!r} use pref_ids missing from preferences"
        )
    w = w.loc[wide.index].to_numpy()
    if len(w) < 3:
        raise ValueError(f"a simplex map needs at least 3 preferences, {pref_set!r} has {len(w)}")
    total = w.sum(axis=1)
    if np.any(total <= 0):
        raise ValueError(f"some preferences of {pref_set!r} put no weight on {tasks3}")
    x, y = _ternary_xy(w / total[:, None])
    tri = Triangulation(x, y)
    values = 100 * wide[tasks3].to_numpy(float)
    panels = [(t, f"{t} {name}", values[:, i]) for i, t in enumerate(tasks3)]
    panels.append(("mean", f"mean {name} of the 3 tasks", values.mean(axis=1)))

    fig = _figure(3.9 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    with mpl.rc_context(STYLE):
        for ax, (panel, title, z) in zip(axes, panels, strict=True):
            lo, hi = (limits or {}).get(panel, (z.min(), z.max()))
            if z.min() < lo - 1e-9 or z.max() > hi + 1e-9:
                raise ValueError(f"limits for {panel!r} ({lo}, {hi}) do not cover its data")
            if hi - lo > 1e-9:
                mappable = ax.tricontourf(tri, z, levels=np.linspace(lo, hi, 13), cmap="viridis")
            else:  # constant colour: contour levels would be degenerate
                mappable = ax.tripcolor(tri, z, cmap="viridis", shading="gouraud")
            ax.plot(x, y, ".", color="black", ms=2.5, alpha=0.6)
            ax.plot(*np.vstack([corners, corners[:1]]).T, color="black", lw=1)
            offsets = [
                (-0.04, -0.06, "right", "top"),
                (1.04, -0.06, "left", "top"),
                (0.5, 0.9, "center", "bottom"),
            ]
            for t, (tx, ty, ha, va) in zip(tasks3, offsets, strict=True):
                ax.text(
                    tx,
                    ty,
                    f"{t}\n(p = 1)" if va == "top" else f"{t} (p = 1)",
                    ha=ha,
                    va=va,
                    fontsize=9.5,
                )
            ax.set_title(title)
            ax.set_aspect("equal")
            ax.set_xlim(-0.22, 1.22)
            ax.set_ylim(-0.2, 1.0)
            ax.axis("off")
            cb = fig.colorbar(mappable, ax=ax, orientation="horizontal", shrink=0.85, pad=0.02)
            cb.set_ticks(MaxNLocator(5).tick_values(lo, hi))
            cb.ax.xaxis.set_major_formatter(FormatStrFormatter("%.1f"))
            cb.ax.set_xlim(lo, hi) if hi - lo > 1e-9 else None
            cb.set_label(f"{name} (%)")
        fig.suptitle(
            f"{display_name(method)}: {name} (%) over the preference simplex of {', '.join(tasks3)}"
            + (
                "\ncolour scale per task shared by every method's map"
                if limits
                else "\ncolour scale per panel: this map's own range"
            )
        )
    return fig


def simplex_limits(
    results: pd.DataFrame,
    tasks3: Sequence[str],
    pref_set: str = "simplex3",
    metric: str = "accuracy",
) -> dict[str, tuple[float, float]]:
    """Colour range (%) per panel of ``simplex_maps_figure`` over every method in
    ``results`` that has ``pref_set``: one scale per task shared by all methods' maps."""
    _require(results, RESULTS_COLUMNS, "results")
    tasks3 = list(tasks3)
    sub = results[(results.pref_set == pref_set) & results.task.isin(tasks3)]
    if sub.empty:
        raise ValueError(f"results have no rows for pref_set {pref_set!r} and tasks {tasks3}")
    wide = 100 * sub.pivot_table(index=["method", "pref_id"], columns="task", values=metric)
    out = {t: (float(wide[t].min()), float(wide[t].max())) for t in tasks3}
    mean = wide[tasks3].mean(axis=1)
    out["mean"] = (float(mean.min()), float(mean.max()))
    return out


def plot_simplex_maps(
    results: pd.DataFrame,
    preferences: pd.DataFrame,
    tasks3: Sequence[str],
    out_dir,
    method: str | None = None,
    pref_set: str = "simplex3",
    metric: str = "accuracy",
) -> list[Path]:
    """Write ``simplex_<method>_<pref_set>_<metric>.png/.pdf`` (see ``simplex_maps_figure``);
    the colour scale of each task is shared by every method in ``results``."""
    limits = simplex_limits(results, tasks3, pref_set=pref_set, metric=metric)
    fig = simplex_maps_figure(
        results, preferences, tasks3, method=method, pref_set=pref_set, metric=metric, limits=limits
    )
    method = method if method is not None else results.method.iloc[0]
    return save_figure(fig, out_dir, f"simplex_{_slug(method)}_{_slug(pref_set)}_{metric}")


# ----------------------------------------------------------------------------- scenario bars
def scenario_bars_figure(
    table: pd.DataFrame,
    value: str = "average_accuracy",
    reference: dict[str, float] | None = None,
) -> Figure:
    """Grouped bars: one group per scenario (equal, priority, one-hot, then any other),
    one bar per method, height ``value`` in % (annotated). ``table`` has one row per
    (method, scenario). ``reference`` maps labels (e.g. "merged model", "experts") to
    values drawn as horizontal dashed lines. The value axis starts near the lowest bar or
    line (not at 0, said on the axis) so that differences of a point are visible."""
    _require(table, ("method", "scenario", value), "table")
    if table.duplicated(["method", "scenario"]).any():
        raise ValueError(
            "table must have one row per (method, scenario); filter it first (e.g. task == 'average')"
        )
    is_norm = "normalized" in value or "normalised" in value
    if not is_norm:
        _check_fractions(table[value], f"table.{value}")
    scenarios = [s for s in SCENARIO_ORDER if s in set(table.scenario)]
    scenarios += [s for s in dict.fromkeys(table.scenario) if s not in scenarios]
    methods = list(dict.fromkeys(table.method))
    colours = _colours(methods)
    grid = table.pivot(index="scenario", columns="method", values=value).reindex(
        index=scenarios, columns=methods
    )

    fig = _figure(max(6.0, 1.1 + 0.55 * len(scenarios) * (len(methods) + 1)), 4.6)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    xs = np.arange(len(scenarios))
    top = 100 * np.nanmax(grid.to_numpy(float))
    low = 100 * np.nanmin(grid.to_numpy(float))
    with mpl.rc_context(STYLE):
        for k, m in enumerate(methods):
            heights = 100 * grid[m].to_numpy(float)
            bars = ax.bar(
                xs + (k - (len(methods) - 1) / 2) * width,
                heights,
                width * 0.95,
                color=colours[m],
                label=display_name(m),
            )
            texts = ax.bar_label(
                bars,
                labels=["" if np.isnan(h) else f"{h:.1f}" for h in heights],
                padding=2,
                fontsize=8 if len(methods) <= 4 else 7,
                rotation=0 if len(methods) <= 4 else 90,
            )
            for t in texts:  # stay readable over the reference lines
                t.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
        for i, (label, v) in enumerate((reference or {}).items()):
            ax.axhline(
                100 * v,
                color=_REF_COLOURS[i % len(_REF_COLOURS)],
                ls="--",
                lw=1.2,
                label=f"{label} ({100 * v:.1f})",
            )
            top, low = max(top, 100 * v), min(low, 100 * v)
        ax.set_xticks(xs, [SCENARIO_NAMES.get(s, s) for s in scenarios])
        ax.set_xlabel("preference scenario")
        metric_name = "normalised accuracy" if is_norm else "accuracy"
        span = max(top - low, 1.0)
        step = 5 if span > 10 else 2 if span > 4 else 1
        bottom = max(0.0, step * math.floor((low - 0.4 * span) / step))
        ax.set_ylim(bottom, top + 0.25 * span)
        ax.set_ylabel(
            f"average {metric_name} (%)" + (f", axis from {bottom:g}" if bottom > 0 else "")
        )
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title(f"Average {metric_name} per preference scenario (%)")
    return fig


def plot_scenario_bars(
    table: pd.DataFrame,
    out_dir,
    value: str = "average_accuracy",
    reference: dict[str, float] | None = None,
) -> list[Path]:
    """Write ``scenario_bars_<value>.png/.pdf`` (see ``scenario_bars_figure``)."""
    fig = scenario_bars_figure(table, value=value, reference=reference)
    return save_figure(fig, out_dir, f"scenario_bars_{_slug(value)}")


# ----------------------------------------------------------------------------- cost
def cost_figure(cost_df: pd.DataFrame) -> Figure:
    """Cost (seconds) against the number of tasks T: one colour per method (display names),
    one line style per ``phase`` (optional column, default "offline"), and the spread over
    repeats as a band where ``seconds_min`` / ``seconds_max`` are given. The y axis is
    logarithmic when the costs span more than a factor of 30; the legend sits outside the
    axes, so it never hides a line."""
    _require(cost_df, ("method", "n_tasks", "seconds"), "cost_df")
    cols = [c for c in ("seconds", "seconds_min", "seconds_max") if c in cost_df.columns]
    secs = cost_df[cols].to_numpy(float)
    if not np.all(np.isfinite(secs)) or np.any(secs < 0):
        raise ValueError(f"cost_df {cols} must be finite and >= 0")
    df = cost_df if "phase" in cost_df.columns else cost_df.assign(phase="offline")
    methods, phases = list(dict.fromkeys(df.method)), list(dict.fromkeys(df.phase))
    colours = _colours(methods)
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    band = {"seconds_min", "seconds_max"} <= set(df.columns)
    fig = _figure(8.4, 4.4)
    ax = fig.subplots()
    with mpl.rc_context(STYLE):
        for m in methods:
            for k, phase in enumerate(phases):
                d = df[(df.method == m) & (df.phase == phase)].sort_values("n_tasks")
                if d.empty:
                    continue
                ax.plot(
                    d.n_tasks,
                    d.seconds,
                    ls=styles[k % len(styles)],
                    marker=markers[k % len(markers)],
                    color=colours[m],
                    ms=5,
                    label=f"{display_name(m)}: {phase}" if len(phases) > 1 else display_name(m),
                )
                if band:
                    ax.fill_between(
                        d.n_tasks, d.seconds_min, d.seconds_max, color=colours[m], alpha=0.18, lw=0
                    )
        positive = secs[secs > 0]
        if len(positive) and positive.max() / positive.min() > 30:
            ax.set_yscale("log")
        ax.set_xticks(sorted(df.n_tasks.unique()))
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel("offline cost (s)" if phases == ["offline"] else "seconds")
        ax.set_title(
            "Offline (preference-independent) cost vs number of tasks"
            if phases == ["offline"]
            else "Cost vs number of tasks"
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_cost(cost_df: pd.DataFrame, out_dir) -> list[Path]:
    """Write ``cost.png/.pdf`` (see ``cost_figure``)."""
    return save_figure(cost_figure(cost_df), out_dir, "cost")


# ----------------------------------------------------------------------------- sweeps
def _sweep_positions(values: Sequence[str]) -> tuple[np.ndarray, list[str], str]:
    """x positions of the swept values, their labels in order, and the axis scale: numbers
    in numeric order on a log axis (all positive, spanning 20x or more) or a linear one;
    values with inf, or not numbers, evenly spaced (scale "even")."""
    labels = list(dict.fromkeys(values))
    try:
        nums = np.array([float(v) for v in labels])
    except ValueError:
        return np.arange(len(labels), dtype=float), labels, "even"
    order = np.argsort(nums, kind="stable")
    labels, nums = [labels[i] for i in order], nums[order]
    if not np.all(np.isfinite(nums)):
        return np.arange(len(labels), dtype=float), labels, "even"
    if nums.min() > 0 and nums.max() / nums.min() >= 20:
        return nums, labels, "log"
    return nums, labels, "linear"


def sweep_figure(table: pd.DataFrame, key: str) -> Figure:
    """Headline numbers against one swept setting (an ablation): left, average accuracy
    (%) at the equal / priority / one-hot preferences; right, HV@3 and HV@all. One colour
    per method, one line style per scenario or subset. ``table``: the ``sweep`` table of
    ``pipeline.collect`` (column ``key`` with the swept values, ``method``, ``equal``,
    ``priority``, ``one-hot``, optionally ``merged`` (drawn as a reference line) and, for
    controllable methods, ``HV@3``, ``HV@all``; percent)."""
    _require(table, (key, "method"), "table")
    acc_cols = [c for c in ("equal", "priority", "one-hot") if c in table.columns]
    hv_cols = [c for c in ("HV@3", "HV@all") if c in table.columns and table[c].notna().any()]
    if not acc_cols:
        raise ValueError(
            f"table has none of the columns equal, priority, one-hot: {list(table.columns)}"
        )
    x, labels, scale = _sweep_positions(table[key].astype(str).tolist())
    pos = dict(zip(labels, x, strict=True))
    methods = list(dict.fromkeys(table.method))
    colours = _colours(methods)
    styles = ("-o", "--s", ":^")
    panels = [("average accuracy (%)", acc_cols)] + (
        [("hypervolume (x100)", hv_cols)] if hv_cols else []
    )
    fig = _figure(4.6 * len(panels) + 2.2, 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    with mpl.rc_context(STYLE):
        for ax, (ylabel, cols) in zip(axes, panels, strict=True):
            for m in methods:
                d = table[table.method == m].assign(_x=lambda f: f[key].astype(str).map(pos))
                d = d.sort_values("_x")
                for col, style in zip(cols, styles, strict=False):
                    ax.plot(
                        d._x,
                        d[col],
                        style,
                        color=colours[m],
                        ms=5,
                        lw=1.4,
                        label=f"{display_name(m)}, {col}",
                    )
            if cols is acc_cols and "merged" in table.columns:  # the merge alone, for reference
                d = table.drop_duplicates(key).assign(_x=lambda f: f[key].astype(str).map(pos))
                d = d.sort_values("_x")
                ax.plot(d._x, d.merged, ":", color="0.4", lw=1.2, label="merged model alone")
            if scale == "log":
                ax.set_xscale("log")
            ax.set_xticks(x, labels)
            ax.set_xlabel(
                key + (" (evenly spaced, not to scale)" if scale == "even" and len(x) > 2 else "")
            )
            ax.set_ylabel(ylabel)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        fig.suptitle(f"Sweep over {key}")
    return fig


def plot_sweep(table: pd.DataFrame, key: str, out_dir) -> list[Path]:
    """Write ``sweep_<key>.png/.pdf`` (see ``sweep_figure``)."""
    return save_figure(sweep_figure(table, key), out_dir, f"sweep_{_slug(key)}")
