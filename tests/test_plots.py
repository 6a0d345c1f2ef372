"""Figures: files written (PNG + PDF, non-trivial), labels name the tasks, bad input rejected."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from evaluation import plots
from evaluation import preferences as prefs

TASKS = ["Cars", "RESISC45", "DTD", "SVHN"]
EXPERT = {"Cars": 0.78, "RESISC45": 0.96, "DTD": 0.79, "SVHN": 0.97}
MERGED = {"Cars": 0.60, "RESISC45": 0.75, "DTD": 0.55, "SVHN": 0.80}


def _accuracy(method_gain: float, p: np.ndarray) -> np.ndarray:
    """Synthetic trade-off: accuracy moves from the merged value toward the expert with p."""
    m = np.array([MERGED[t] for t in TASKS])
    e = np.array([EXPERT[t] for t in TASKS])
    return m + method_gain * (e - m) * np.sqrt(p)


def _frames(methods=(("ReACT", 0.9), ("preference TA", 0.5))):
    sets = {"equal": prefs.equal(4), "priority": prefs.priority(4), "one_hot": prefs.one_hot(4)}
    for a, b in itertools.combinations(TASKS, 2):
        sets[plots.pairwise_set_name(a, b)] = prefs.pairwise(4, TASKS.index(a), TASKS.index(b))
    sets["simplex3"] = prefs.subspace_grid(4, [0, 1, 2], step=0.1)
    pref_rows, res_rows = [], []
    for name, p in sets.items():
        for i, row in enumerate(p):
            pref_rows.append({"pref_set": name, "pref_id": i, **dict(zip(TASKS, row, strict=True))})
    for method, gain in methods:
        for name, p in sets.items():
            acc = _accuracy(gain, p)
            for i in range(len(p)):
                for t_i, t in enumerate(TASKS):
                    res_rows.append((method, name, i, t, acc[i, t_i], acc[i, t_i] / EXPERT[t]))
    results = pd.DataFrame(res_rows, columns=list(plots.RESULTS_COLUMNS))
    preferences = pd.DataFrame(pref_rows)
    ref_rows = []
    for label, acc in (
        ("pretrained", {t: 0.5 for t in TASKS}),
        ("merged (task_arithmetic)", MERGED),
        ("expert", EXPERT),
    ):
        ref_rows += [(label, t, acc[t], acc[t] / EXPERT[t]) for t in TASKS]
    reference = pd.DataFrame(ref_rows, columns=list(plots.REFERENCE_COLUMNS))
    return results, preferences, reference


def _check_files(paths, min_kb: float = 15):
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for p in paths:
        assert p.exists() and p.stat().st_size > min_kb * 1024, (p, p.stat().st_size)
    with Image.open(paths[0]) as im:
        w, h = im.size
        assert w >= 600 and h >= 400
        # not blank: many distinct colours
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def _texts(fig: Figure) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_pairwise_fronts_files_and_labels(tmp_path):
    results, preferences, reference = _frames()
    paths = plots.plot_pairwise_fronts(results, preferences, reference, TASKS, tmp_path)
    _check_files(paths)
    fig = plots.pairwise_fronts_figure(results, preferences, reference, TASKS)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6  # all pairs of 4 tasks
    pairs = list(itertools.combinations(TASKS, 2))
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in visible] == [
        (f"{a} accuracy (%)", f"{b} accuracy (%)") for a, b in pairs
    ]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for label in ("ReACT", "preference TA", "pretrained", "merged (task_arithmetic)", "experts"):
        assert label in legend


def test_pairwise_fronts_curve_values_follow_preference_order():
    results, preferences, reference = _frames(methods=(("ReACT", 0.9),))
    fig = plots.pairwise_fronts_figure(
        results, preferences, reference, TASKS, pairs=[("DTD", "Cars")]
    )
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    x, y = line.get_xdata(), line.get_ydata()
    # set stored as Cars|DTD; the panel puts DTD on x. Order: weight on DTD from 0 to 1.
    w = np.linspace(0, 1, 11)
    exp_x = 100 * (MERGED["DTD"] + 0.9 * (EXPERT["DTD"] - MERGED["DTD"]) * np.sqrt(w))
    exp_y = 100 * (MERGED["Cars"] + 0.9 * (EXPERT["Cars"] - MERGED["Cars"]) * np.sqrt(1 - w))
    np.testing.assert_allclose(x, exp_x, rtol=1e-12)
    np.testing.assert_allclose(y, exp_y, rtol=1e-12)
    star = [ln for ln in ax.get_lines() if ln.get_marker() == "*"][0]
    np.testing.assert_allclose(
        [star.get_xdata()[0], star.get_ydata()[0]], [100 * EXPERT["DTD"], 100 * EXPERT["Cars"]]
    )
    assert ax.get_xlabel() == "DTD accuracy (%)"


def test_pairwise_normalized_metric_labels(tmp_path):
    results, preferences, reference = _frames()
    paths = plots.plot_pairwise_fronts(
        results,
        preferences,
        reference,
        TASKS,
        tmp_path,
        pairs=[("Cars", "DTD")],
        metric="normalized_accuracy",
    )
    assert paths[0].name == "pairwise_fronts_normalized_accuracy.png"
    fig = plots.pairwise_fronts_figure(
        results, preferences, None, TASKS, pairs=[("Cars", "DTD")], metric="normalized_accuracy"
    )
    assert fig.axes[0].get_xlabel() == "Cars normalised accuracy (%)"


def test_simplex_maps_files_and_labels(tmp_path):
    results, preferences, _ = _frames()
    tasks3 = TASKS[:3]
    paths = plots.plot_simplex_maps(results, preferences, tasks3, tmp_path, method="ReACT")
    _check_files(paths)
    assert paths[0].name == "simplex_ReACT_simplex3_accuracy.png"
    fig = plots.simplex_maps_figure(results, preferences, tasks3, method="ReACT")
    texts = _texts(fig)
    for t in tasks3:
        assert any(s.startswith(t) and "(p = 1)" in s for s in texts), t  # vertex label
        assert f"{t} accuracy" in texts  # panel title
    colourbar_labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert colourbar_labels == ["accuracy (%)"] * 4


def test_simplex_maps_colour_range_matches_data():
    results, preferences, _ = _frames()
    fig = plots.simplex_maps_figure(results, preferences, TASKS[:3], method="ReACT")
    sub = results[
        (results.method == "ReACT") & (results.pref_set == "simplex3") & (results.task == "Cars")
    ]
    contour = fig.axes[0].collections[0]
    lo, hi = contour.get_clim()
    assert lo == pytest.approx(100 * sub.accuracy.min()) and hi == pytest.approx(
        100 * sub.accuracy.max()
    )


def test_scenario_bars_values_and_labels(tmp_path):
    table = pd.DataFrame(
        {
            "method": ["ReACT", "ReACT", "ReACT", "PM", "PM", "PM"],
            "scenario": ["one_hot", "equal", "priority", "equal", "priority", "one_hot"],
            "average_accuracy": [0.889, 0.854, 0.873, 0.852, 0.859, 0.836],
        }
    )
    paths = plots.plot_scenario_bars(table, tmp_path, reference={"experts": 0.905})
    _check_files(paths, min_kb=10)
    fig = plots.scenario_bars_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["equal", "priority", "one-hot"]
    # the value axis starts near the data (said on the axis), so 1-point gaps are visible
    assert ax.get_ylabel() == "average accuracy (%), axis from 80"
    assert ax.get_ylim()[0] == 80 and ax.get_ylim()[1] > 88.9
    heights = [round(r.get_height(), 6) for r in ax.patches]
    assert heights == [
        85.4,
        87.3,
        88.9,
        85.2,
        85.9,
        83.6,
    ]  # ReACT bars then PM bars, scenario order
    annotations = {t.get_text() for t in ax.texts}
    assert {"85.4", "88.9", "83.6"} <= annotations


def test_simplex_maps_of_two_methods_share_one_scale_per_task():
    """Side-by-side maps must not look alike when the numbers differ: with
    ``simplex_limits`` each task's colour range spans both methods."""
    results, preferences, _ = _frames()
    limits = plots.simplex_limits(results, TASKS[:3])
    sub = results[(results.pref_set == "simplex3") & (results.task == "Cars")]
    assert limits["Cars"] == pytest.approx((100 * sub.accuracy.min(), 100 * sub.accuracy.max()))
    ranges = []
    for method in ("ReACT", "preference TA"):
        fig = plots.simplex_maps_figure(
            results, preferences, TASKS[:3], method=method, limits=limits
        )
        ranges.append([fig.axes[i].collections[0].get_clim() for i in range(4)])
        assert "shared by every method" in fig._suptitle.get_text()
    assert ranges[0] == ranges[1]
    assert ranges[0][0] == pytest.approx(limits["Cars"])
    # plot_simplex_maps shares the scale across the methods of its results by itself
    own = plots.simplex_maps_figure(results, preferences, TASKS[:3], method="preference TA")
    assert own.axes[0].collections[0].get_clim() != pytest.approx(limits["Cars"])


def test_display_names_in_legends():
    results, preferences, reference = _frames(methods=(("react", 0.9), ("pref_ta", 0.5)))
    fig = plots.pairwise_fronts_figure(results, preferences, reference, TASKS)
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"ReACT", "preference-weighted TA"} <= labels and "pref_ta" not in labels


def test_cost_figure_colour_per_method_style_per_phase_legend_outside(tmp_path):
    rows = []
    for m, base in (("react", 0.3), ("pareto_merging", 10.0)):
        for T in (2, 3, 4):
            for phase, k in (("offline", 1.0), ("offline + 100 preferences", 5.0)):
                s = base * k * T
                rows.append((m, T, phase, s, 0.8 * s, 1.3 * s))
    cost = pd.DataFrame(
        rows, columns=["method", "n_tasks", "phase", "seconds", "seconds_min", "seconds_max"]
    )
    fig = plots.cost_figure(cost)
    _check_files(plots.save_figure(fig, tmp_path, "cost"), min_kb=10)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {
        "ReACT: offline",
        "ReACT: offline + 100 preferences",
        "Pareto Merging: offline",
        "Pareto Merging: offline + 100 preferences",
    }
    assert (
        lines["ReACT: offline"].get_color() == lines["ReACT: offline + 100 preferences"].get_color()
    )
    assert lines["ReACT: offline"].get_color() != lines["Pareto Merging: offline"].get_color()
    assert (
        lines["ReACT: offline"].get_linestyle()
        != lines["ReACT: offline + 100 preferences"].get_linestyle()
    )
    assert len(ax.collections) == 4  # a min-max band per line
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # outside the data, right of the axes


def test_sweep_figure_orders_values_and_marks_uneven_axes(tmp_path):
    table = pd.DataFrame(
        {
            "correction.beta": ["inf", "0", "0.1", "10"],
            "method": ["react"] * 4,
            "merged": [79.2] * 4,
            "equal": [80.6, 76.4, 79.8, 81.5],
            "priority": [81.0, 77.0, 80.5, 82.0],
            "one-hot": [83.5, 85.4, 87.0, 85.1],
            "HV@3": [75.4, 68.3, 77.1, 77.5],
            "HV@all": [75.9, 67.5, 77.0, 78.7],
        }
    )
    paths = plots.plot_sweep(table, "correction.beta", tmp_path)
    _check_files(paths, min_kb=10)
    assert paths[0].name == "sweep_correction.beta.png"
    fig = plots.sweep_figure(table, "correction.beta")
    acc, hv = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["0", "0.1", "10", "inf"]
    assert "not to scale" in acc.get_xlabel()
    equal = next(ln for ln in acc.get_lines() if ln.get_label() == "ReACT, equal")
    assert list(equal.get_ydata()) == [76.4, 79.8, 81.5, 80.6]  # in numeric order of beta
    assert any(ln.get_label() == "merged model alone" for ln in acc.get_lines())
    assert {ln.get_label() for ln in hv.get_lines()} == {"ReACT, HV@3", "ReACT, HV@all"}
    sizes = table.assign(**{"calibration.size": ["0.01", "0.1", "0.5", "1.0"]})
    assert plots.sweep_figure(sizes, "calibration.size").axes[0].get_xscale() == "log"


def test_cost_plot(tmp_path):
    cost = pd.DataFrame(
        {
            "method": ["ReACT"] * 3 + ["Pareto Merging"] * 3,
            "n_tasks": [2, 4, 8] * 2,
            "seconds": [1.0, 2.1, 4.0, 300.0, 610.0, 1250.0],
        }
    )
    paths = plots.plot_cost(cost, tmp_path)
    _check_files(paths, min_kb=10)
    ax = plots.cost_figure(cost).axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "number of tasks T" and ax.get_ylabel() == "offline cost (s)"


def test_bad_inputs():
    results, preferences, reference = _frames()
    with pytest.raises(ValueError, match="missing column"):
        plots.pairwise_fronts_figure(
            results.drop(columns="accuracy"), preferences, reference, TASKS
        )
    with pytest.raises(ValueError, match="no pairwise sweep for \\(Cars, SUN\\)|unknown task"):
        plots.pairwise_fronts_figure(
            results, preferences, reference, TASKS, pairs=[("Cars", "SUN")]
        )
    pct = results.assign(accuracy=results.accuracy * 100)
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]"):
        plots.pairwise_fronts_figure(pct, preferences, reference, TASKS)
    with pytest.raises(ValueError, match="pass method="):
        plots.simplex_maps_figure(results, preferences, TASKS[:3])
    with pytest.raises(ValueError, match="3 different tasks"):
        plots.simplex_maps_figure(results, preferences, TASKS[:2], method="ReACT")
    no_pairs = results[~results.pref_set.str.startswith("pairwise:")]
    with pytest.raises(ValueError, match="no pairwise sweeps"):
        plots.pairwise_fronts_figure(no_pairs, preferences, reference, TASKS)
    dup = pd.DataFrame(
        {"method": ["A", "A"], "scenario": ["equal", "equal"], "average_accuracy": [0.5, 0.6]}
    )
    with pytest.raises(ValueError, match="one row per"):
        plots.scenario_bars_figure(dup)
    with pytest.raises(ValueError, match="metric must be"):
        plots.pairwise_fronts_figure(results, preferences, reference, TASKS, metric="loss")


def test_docs_figures_copies_from_the_newest_complete_run(tmp_path):
    """`make docs-figures` ends with scripts/docs_figures.py: each README figure from the
    newest complete full-settings run of its target; an incomplete newer run and a newer
    FAST=1 run (summary.json, or a script's config.yaml, says preset fast) are passed over,
    and a figure whose target never ran is named with its make target (exit code 1)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runs = tmp_path / "outputs" / "runs" / "compare"
    for name, content, complete, preset in (
        ("2026-01-01_00-00-00", b"old", True, "full"),
        ("2026-01-02_00-00-00", b"cut", False, "full"),
        ("2026-01-03_00-00-00", b"fast", True, "fast"),
    ):
        (runs / name / "plots").mkdir(parents=True)
        (runs / name / "plots" / "pairwise_fronts_accuracy.png").write_bytes(content)
        (runs / name / "summary.json").write_text(json.dumps({"preset": preset}))
        if complete:
            (runs / name / "run_complete.json").write_text("{}")
    for name, preset in (("2026-01-01_00-00-00", "full"), ("2026-01-02_00-00-00", "fast")):
        script_out = tmp_path / "outputs" / "tsne" / name
        script_out.mkdir(parents=True)
        (script_out / "tsne_by_task.png").write_bytes(preset.encode())
        (script_out / "config.yaml").write_text(f"preset: {preset}\n")
    dest = tmp_path / "figures"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/docs_figures.py",
            "--outputs",
            str(tmp_path / "outputs"),
            "--dest",
            str(dest),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert (dest / "pairwise_fronts.png").read_bytes() == b"old"
    assert (dest / "tsne_by_task.png").read_bytes() == b"full"
    assert "cost.png: run `make fig-cost`" in proc.stderr
    assert "sweep_beta.png: run `make ablation-beta`" in proc.stderr
