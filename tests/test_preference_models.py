"""The model-producing baselines answer preferences through ``models_accuracies``: the same
accuracies as the per-model feature path, no per-model cache unit, the passes counted, and
one progress bar per method over its preferences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import FAST

import merging
from evaluation import preferences as prefs_lib
from pipeline import main as pm
from pipeline.cache import Cache
from pipeline.methods import model_accuracies, models_accuracies
from pipeline.stages import ModelRef

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_models_accuracies_equal_the_feature_path_without_feature_units(tmp_path, tiny_cache):
    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
    ctx = pm.prepare_context(cfg, Cache(cfg.paths.cache_dir), torch.device("cpu"))
    prefs = prefs_lib.dirichlet(len(ctx.tasks), 3, seed=1)[:3]
    pre, experts = ctx.task_vector_inputs
    states = [merging.preference_task_arithmetic(pre, experts, p.tolist()) for p in prefs]
    before = len(ctx.cache.events)
    got = models_accuracies(ctx, iter(states), "x")
    assert len(ctx.cache.events) == before  # nothing written or read per model
    n_test = sum(ctx.suite.split_size(t, "test") for t in ctx.tasks)
    assert ctx.forward_passes["x"] == len(prefs) * n_test
    want = np.stack(
        [model_accuracies(ctx, ModelRef(f"m{i}", "m", lambda s=s: s)) for i, s in enumerate(states)]
    )
    np.testing.assert_array_equal(got, want)
    assert got.shape == (3, len(ctx.tasks)) and len(np.unique(got)) > 1


def test_one_preference_bar_per_method_with_its_total(tmp_path, capfd, tiny_cache):
    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config(
        [
            *(o for o in FAST if not o.startswith("progress=")),
            "progress=true",
            "methods=[react,pref_ta]",
            "preferences.sets=[equal,one_hot,grid]",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    pm.run(cfg, tmp_path / "run")
    err = capfd.readouterr().err
    total = 1 + len(cfg.suite.tasks) + (cfg.preferences.dirichlet_n + len(cfg.suite.tasks) + 1)
    for method in ("react", "pref_ta"):
        finished = [
            ln
            for ln in err.replace("\r", "\n").splitlines()
            if ln.startswith(f"{method}: preferences")
        ]
        assert finished and f"{total}/{total}" in finished[-1], finished[-1:]
    assert "pref_ta | " not in err  # no per-(model, task) feature bars for pref-TA
    # the fixed models' features: one bar over their 3T units, none per (model, task) unit
    lines = err.replace("\r", "\n").splitlines()
    T = len(cfg.suite.tasks)
    features = [ln for ln in lines if ln.startswith("features:")]
    assert features and f"{3 * T}/{3 * T}" in features[-1], features[-1:]
    assert not [ln for ln in lines if ln.startswith(("pretrained | ", "expert ", "merged ("))]
    fit = [ln for ln in lines if ln.startswith("react: fit")]
    assert fit and "feature units" in fit[-1], fit[-1:]


def test_a_preference_answered_twice_is_built_and_evaluated_once(tmp_path, tiny_cache):
    """The sets share points (one-hot = the grid's vertices, equal = its centroid): a
    model-producing method answers a repeated preference from its first answer."""
    from pipeline.methods import build_method

    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
    ctx = pm.prepare_context(cfg, Cache(cfg.paths.cache_dir), torch.device("cpu"))
    T = len(ctx.tasks)
    eye = np.eye(T)
    method = build_method("pref_ta", cfg.baselines.pref_ta)
    first = method.accuracies(ctx, eye[:2])
    again = method.accuracies(ctx, np.stack([eye[1], np.full(T, 1 / T), eye[0]]))
    n_test = sum(ctx.suite.split_size(t, "test") for t in ctx.tasks)
    assert ctx.forward_passes["pref_ta"] == 3 * n_test  # e_0, e_1 and the centroid, once each
    assert method.cost["queries"] == 5
    np.testing.assert_array_equal(again[[0, 2]], first[[1, 0]])
    pre, experts = ctx.task_vector_inputs
    scale = cfg.baselines.pref_ta.scale
    fresh = models_accuracies(
        ctx,
        [merging.preference_task_arithmetic(pre, experts, eye[1].tolist(), scale=scale)],
        "check",
    )
    np.testing.assert_array_equal(fresh[0], first[1])


def test_a_preference_is_evaluated_only_on_the_asked_tasks_then_completed(tmp_path, tiny_cache):
    """``tasks=`` (a set scored on a subset): only those test sets go through the model, the
    others are NaN; asking for every task later evaluates just the missing ones, and the
    completed row equals one full evaluation."""
    from pipeline.methods import build_method

    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
    ctx = pm.prepare_context(cfg, Cache(cfg.paths.cache_dir), torch.device("cpu"))
    T = len(ctx.tasks)
    size = [ctx.suite.split_size(t, "test") for t in ctx.tasks]
    p = np.zeros((1, T))
    p[0, :2] = 0.5
    method = build_method("pref_ta", cfg.baselines.pref_ta)
    part = method.accuracies(ctx, p, [0, 1])
    assert ctx.forward_passes["pref_ta"] == size[0] + size[1]
    assert np.isfinite(part[0, :2]).all() and np.isnan(part[0, 2:]).all()
    full = method.accuracies(ctx, p)
    assert ctx.forward_passes["pref_ta"] == sum(size)  # tasks 0 and 1 were not evaluated again
    pre, experts = ctx.task_vector_inputs
    state = merging.preference_task_arithmetic(
        pre, experts, p[0].tolist(), scale=cfg.baselines.pref_ta.scale
    )
    np.testing.assert_array_equal(full[0], models_accuracies(ctx, [state], "check")[0])
    np.testing.assert_array_equal(part[0, :2], full[0, :2])


def test_scoring_sets_on_their_own_tasks_keeps_every_front_metric(tmp_path, tiny_cache):
    """Pairwise and simplex3 sets scored on their own tasks (the default) give the same fronts,
    metrics and scenario tables as scoring every set on every task, at fewer forward passes;
    their results hold only their tasks' rows."""
    tiny_cache(tmp_path / "cache")
    common = [
        *FAST,
        "methods=[react,pref_ta]",
        "preferences.sets=[one_hot,pairwise,simplex3]",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    out = {}
    for flag in ("false", "true"):
        cfg = pm.compose_config([*common, f"preferences.score_all_tasks={flag}"])
        pm.run(cfg, tmp_path / f"run_{flag}")
        out[flag] = {
            name: pd.read_csv(tmp_path / f"run_{flag}" / f"{name}.csv")
            for name in ("results", "fronts", "scenarios", "cost")
        }
    part, full = out["false"], out["true"]
    pd.testing.assert_frame_equal(part["fronts"], full["fronts"])
    pd.testing.assert_frame_equal(part["scenarios"], full["scenarios"])
    r = part["results"]
    pair = r[r.pref_set == "pairwise:mnist|animals"]
    assert set(pair.task) == {"mnist", "animals"}
    assert set(r[r.pref_set == "simplex3"].task) == set(cfg.tasks3 or cfg.suite.tasks[:3])
    assert set(r[r.pref_set == "one_hot"].task) == set(cfg.suite.tasks)
    keys = ["method", "pref_set", "pref_id", "task"]
    merged = r.merge(full["results"], on=keys, suffixes=("", "_all"))
    assert len(merged) == len(r)
    np.testing.assert_array_equal(merged.accuracy, merged.accuracy_all)
    passes = {f: out[f]["cost"].set_index("method").forward_passes["pref_ta"] for f in out}
    assert passes["false"] < passes["true"]
