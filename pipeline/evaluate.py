"""Preference sets of a run, and the evaluate stage: scenario tables, HV, uniformity.

Pure table-in/table-out code around the ``evaluation`` package (which holds the formulas).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

import evaluation
from evaluation import preferences as prefs_lib

SCENARIOS = ("equal", "priority", "one_hot")


@dataclasses.dataclass
class Evaluation:
    """The evaluate stage's tables: what the report writes and W&B logs."""

    results: pd.DataFrame  # method, pref_set, pref_id, task, accuracy, normalized_accuracy
    preferences: pd.DataFrame
    reference: pd.DataFrame  # pretrained / merged / expert accuracies
    scenarios: pd.DataFrame  # equal / priority / one-hot per method
    fronts: pd.DataFrame  # HV, uniformity, alignment at @3 / @all per controllable method
    cost: pd.DataFrame  # per method: offline / query seconds, forward passes, device

    def tables(self) -> dict[str, pd.DataFrame]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def evaluate(
    frames: list[pd.DataFrame],
    sets: dict[str, np.ndarray],
    reference: pd.DataFrame,
    cost_rows: list[dict],
    tasks: list[str],
    tasks3: list[str],
    controllable: list[str],
) -> Evaluation:
    """The evaluate stage: the swept accuracies (``frames``) -> scenario table and front metrics
    (HV, uniformity and alignment only for the ``controllable`` methods)."""
    results = pd.concat(frames, ignore_index=True)
    scenarios = scenario_table(results, tasks) if set(SCENARIOS) & set(sets) else pd.DataFrame()
    fronts = front_metrics(results[results.method.isin(controllable)], sets, tasks, tasks3)
    return Evaluation(
        results=results,
        preferences=preferences_frame(sets, tasks),
        reference=reference,
        scenarios=scenarios,
        fronts=fronts,
        cost=pd.DataFrame(cost_rows),
    )


def scenario_sets(sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The equal / priority / one-hot sets among ``sets`` (what fixed methods are scored on)."""
    return {name: p for name, p in sets.items() if name in SCENARIOS}


def resolve_tasks3(tasks: list[str], tasks3) -> list[str]:
    if tasks3 is None:
        if len(tasks) < 3:
            raise ValueError(f"the @3 subspace needs at least 3 tasks; this suite has {tasks}")
        return list(tasks[:3])
    tasks3 = list(tasks3)
    unknown = [t for t in tasks3 if t not in tasks]
    if len(tasks3) != 3 or unknown or len(set(tasks3)) != 3:
        raise ValueError(f"tasks3 must name 3 distinct tasks of {tasks}; got {tasks3}")
    return tasks3


def priority_weight(cfg, T: int) -> float:
    """The measured task's weight in the priority scenario under ``preferences.priority_rule``."""
    rule = cfg.get("priority_rule", "ratio")
    if rule not in ("ratio", "fixed"):
        raise ValueError(f"preferences.priority_rule must be ratio or fixed, got {rule!r}")
    if rule == "fixed" and not 0 <= cfg.priority_main <= 1:
        raise ValueError(f"preferences.priority_main must be in [0, 1], got {cfg.priority_main}")
    if rule == "ratio" and not float(cfg.get("priority_ratio", 3.0)) >= 1:
        raise ValueError(
            f"preferences.priority_ratio must be >= 1, got {cfg.get('priority_ratio')}"
        )
    return prefs_lib.priority_main(
        T, rule, float(cfg.get("priority_ratio", 3.0)), float(cfg.priority_main)
    )


def priority_rule_text(cfg, T: int) -> str:
    """One line for reports: which priority rule and the weights it gives at T tasks."""
    w = priority_weight(cfg, T)
    rest = (1 - w) / (T - 1)
    if cfg.get("priority_rule", "ratio") == "ratio":
        how = f"ratio rule: {float(cfg.get('priority_ratio', 3.0)):g}x each other task"
    else:
        how = "fixed rule"
    return f"priority scenario ({how}): measured task {w:.3f}, each other {rest:.3f} at T = {T}"


def pairwise_pairs(cfg, tasks: list[str]) -> list[tuple[str, str]]:
    """The task pairs of the pairwise set. ``preferences.pairs``: "figure" (the default) = the
    suite's figure panels (``suite.figure_pairs``) whose two tasks are both in this run, or
    every pair when none are (a suite without panels, or a run on a subset of its tasks);
    null = every pair; a list = exactly those pairs."""
    every = list(itertools.combinations(tasks, 2))
    if cfg.pairs == "figure":
        panels = [(a, b) for a, b in (cfg.get("figure_pairs") or []) if {a, b} <= set(tasks)]
        return panels or every
    return [(a, b) for a, b in cfg.pairs] if cfg.pairs else every


def preference_sets(cfg, tasks: list[str], tasks3: list[str]) -> dict[str, np.ndarray]:
    """Named (P, T) preference arrays for the sets listed in ``cfg.sets``."""
    T = len(tasks)
    known = {"equal", "priority", "one_hot", "pairwise", "simplex3", "grid"}
    unknown = [s for s in cfg.sets if s not in known]
    if unknown:
        hint = (
            "; custom rows are not a set name: give them as preferences.custom=[[w_1,...,w_T]] "
            "(swept beside the named sets)"
            if "custom" in unknown
            else ""
        )
        raise ValueError(
            f"preferences.sets: unknown set(s) {unknown}; choose from {sorted(known)}{hint}"
        )
    out: dict[str, np.ndarray] = {}
    for name in cfg.sets:
        if name == "equal":
            out["equal"] = prefs_lib.equal(T)
        elif name == "priority":
            out["priority"] = prefs_lib.priority(T, main=priority_weight(cfg, T))
        elif name == "one_hot":
            out["one_hot"] = prefs_lib.one_hot(T)
        elif name == "pairwise":
            for a, b in pairwise_pairs(cfg, tasks):
                if a not in tasks or b not in tasks:
                    raise ValueError(
                        f"preferences.pairs: unknown task in ({a}, {b}); tasks are {tasks}"
                    )
                out[f"pairwise:{a}|{b}"] = prefs_lib.pairwise(
                    T, tasks.index(a), tasks.index(b), steps=cfg.pairwise_steps
                )
        elif name == "simplex3":
            grid3 = prefs_lib.simplex_grid(3, step=cfg.simplex_step)
            full = np.zeros((len(grid3), T))
            full[:, [tasks.index(t) for t in tasks3]] = grid3
            out["simplex3"] = full
        elif name == "grid":
            if cfg.grid == "lattice":
                out["grid"] = prefs_lib.simplex_grid(T, h=cfg.grid_h)
            elif cfg.grid == "dirichlet":
                out["grid"] = prefs_lib.dirichlet(T, cfg.dirichlet_n, seed=cfg.dirichlet_seed)
            else:
                raise ValueError(
                    f"preferences.grid must be 'lattice' or 'dirichlet', got {cfg.grid!r}"
                )
    if cfg.get("custom") is not None:
        custom = np.asarray(
            OmegaConf.to_container(cfg.custom) if OmegaConf.is_config(cfg.custom) else cfg.custom,
            dtype=np.float64,
        )
        if custom.ndim == 1:
            custom = custom[None]
        try:
            prefs_lib.validate_preferences(custom, T)
        except ValueError as e:
            msg = str(e).replace("pass normalize=True to rescale rows", "divide it by its sum")
            raise ValueError(f"preferences.custom (tasks in order {tasks}): {msg}") from None
        out["custom"] = custom
    for p in out.values():
        prefs_lib.validate_preferences(p, T)
    return out


def scored_tasks(cfg, set_name: str, tasks: list[str], tasks3: list[str]) -> list[str]:
    """The tasks whose accuracy a preference set is scored on. A set defined on a subset of
    the tasks (``pairwise:a|b``: a and b; ``simplex3``: ``tasks3``) is scored on that subset
    only: its preferences put no weight elsewhere and its fronts, metrics and plots read
    nothing else, so a model-producing baseline evaluates only those test sets. Every other
    set, and every set under ``preferences.score_all_tasks=true``, is scored on all tasks."""
    if cfg.get("score_all_tasks", False):
        return list(tasks)
    if set_name.startswith("pairwise:"):
        return list(set_name.split(":", 1)[1].split("|"))
    if set_name == "simplex3":
        return list(tasks3)
    return list(tasks)


def preferences_frame(sets: dict[str, np.ndarray], tasks: list[str]) -> pd.DataFrame:
    frames = []
    for name, p in sets.items():
        df = pd.DataFrame(p, columns=tasks)
        df.insert(0, "pref_id", np.arange(len(p)))
        df.insert(0, "pref_set", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def scenario_table(results: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Per method and scenario, the accuracy of each task under its scenario preference.

    equal: every task at p = 1/T; priority / one_hot: task t at the preference that
    favours t (row t of the set). Adds an ``average`` row per (method, scenario).
    """
    rows = []
    for (method, scenario), df in results[results.pref_set.isin(SCENARIOS)].groupby(
        ["method", "pref_set"], sort=False
    ):
        for t_i, task in enumerate(tasks):
            pid = 0 if scenario == "equal" else t_i
            r = df[(df.pref_id == pid) & (df.task == task)].iloc[0]
            rows.append((method, scenario, task, r.accuracy, r.normalized_accuracy))
    tab = pd.DataFrame(
        rows, columns=["method", "scenario", "task", "accuracy", "normalized_accuracy"]
    )
    avg = (
        tab.groupby(["method", "scenario"], sort=False)[["accuracy", "normalized_accuracy"]]
        .mean()
        .reset_index()
    )
    avg.insert(2, "task", "average")
    return pd.concat([tab, avg], ignore_index=True)


def front_metrics(
    results: pd.DataFrame,
    sets: dict[str, np.ndarray],
    tasks: list[str],
    tasks3: list[str],
    hv_cfg=None,
) -> pd.DataFrame:
    """HV (x100), uniformity and preference alignment at @3 (simplex3) and @all (grid)."""
    rows = []
    hv_kw = dict(hv_cfg or {})
    for method, df in results.groupby("method", sort=False):
        for subset, set_name, cols in (("@3", "simplex3", tasks3), ("@all", "grid", tasks)):
            if set_name not in sets:
                continue
            sub = df[df.pref_set == set_name]
            if sub.empty:
                continue
            pts = sub.pivot(index="pref_id", columns="task", values="normalized_accuracy")[
                cols
            ].to_numpy()
            p = sets[set_name][:, [tasks.index(c) for c in cols]]
            hv = evaluation.hypervolume(pts, **hv_kw)
            u = evaluation.uniformity(p, pts)
            a = evaluation.preference_alignment(p, pts)
            rows += [
                (method, subset, "hypervolume", 100 * float(hv.value), hv.method, len(pts)),
                (method, subset, "uniformity", float(u), "PHN-style (method.md 5a)", int(u.n_used)),
                (
                    method,
                    subset,
                    "preference_alignment",
                    float(a),
                    "mean Pearson(p, norm. acc) (method.md 5b)",
                    int(a.n_used),
                ),
            ]
    return pd.DataFrame(rows, columns=["method", "subset", "metric", "value", "how", "n_points"])
