"""The pipeline end to end on the tiny offline suite, through the real Hydra entry point.

Values, not shapes: metrics are recomputed independently from the result tables, the
correction is checked against the calibration objective it minimises, a one-hot
preference must recover an expert whose features are an exact linear map of the merged
model's, and a changed config must invalidate exactly the downstream cache units.
(Kill/resume, corruption, concurrency and bad input in depth: tests/test_reliability.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAST

import evaluation
from correction import react
from pipeline import main as pm
from pipeline.cache import Cache
from pipeline.stages import calibration_split

ROOT = Path(__file__).resolve().parent.parent


_compose = pm.compose_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_cache) -> Path:
    return tiny_cache(tmp_path_factory.mktemp("cache"))  # the suite built once per session


@pytest.fixture(scope="module")
def entry_run(tmp_path_factory, cache_dir) -> Path:
    """One run through ``python -m pipeline.main`` (the command users type)."""
    out = tmp_path_factory.mktemp("entry")
    run_dir = out / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.main",
        *FAST,
        f"paths.output_dir={out}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ReACT pipeline finished" in proc.stdout
    return run_dir


def test_entry_point_writes_every_artifact(entry_run):
    for name in ("results", "preferences", "reference", "scenarios", "fronts", "cost"):
        assert (entry_run / f"{name}.csv").is_file() and (entry_run / f"{name}.parquet").is_file()
    for plot in (
        "pairwise_fronts_accuracy",
        "scenario_bars_average_accuracy",
        "simplex_react_simplex3_accuracy",
    ):
        assert (entry_run / "plots" / f"{plot}.png").stat().st_size > 10_000
        assert (entry_run / "plots" / f"{plot}.pdf").is_file()
    summary = json.loads((entry_run / "summary.json").read_text())
    assert summary["schema"] == "react-merging/summary/v1"
    assert summary["seed"] == 0 and summary["calibration"]["source"] == "test"
    assert summary["calibration"]["overlaps_evaluation"] is True
    report = (entry_run / "report.md").read_text()
    assert "transductive" in report and "python -m pipeline.main" in report
    timings = json.loads((entry_run / "timings.json").read_text())
    assert set(timings["stages"]) >= {
        "prepare",
        "merge",
        "features",
        "fit",
        "sweep",
        "evaluate",
        "report",
    }


def test_summary_and_fronts_recomputed_from_tables(entry_run):
    """HV / uniformity / alignment and the scenario averages, recomputed from results.csv."""
    results = pd.read_parquet(
        entry_run / "results.parquet"
    )  # full precision (CSV keeps 6 decimals)
    prefs = pd.read_parquet(entry_run / "preferences.parquet")
    fronts = pd.read_parquet(entry_run / "fronts.parquet")
    reference = pd.read_parquet(entry_run / "reference.parquet")
    summary = json.loads((entry_run / "summary.json").read_text())
    tasks = summary["tasks"]
    expert = reference[reference.label == "expert"].set_index("task").accuracy
    # normalised accuracy = accuracy / expert accuracy, row by row
    np.testing.assert_allclose(
        results.normalized_accuracy, results.accuracy / results.task.map(expert), atol=2e-6
    )
    assert results.accuracy.between(0, 1).all()
    for subset, set_name, cols in (("@3", "simplex3", summary["tasks3"]), ("@all", "grid", tasks)):
        sub = results[(results.pref_set == set_name) & (results.method == "react")]
        pts = sub.pivot(index="pref_id", columns="task", values="normalized_accuracy")[
            cols
        ].to_numpy()
        p = prefs[prefs.pref_set == set_name].sort_values("pref_id")[cols].to_numpy()
        got = fronts[(fronts.subset == subset)].set_index("metric").value
        # brute-force HV in low dimension would be slow at 4-D; the library is tested against
        # brute force in test_evaluation.py, here the table must equal a fresh computation
        assert got["hypervolume"] == pytest.approx(
            100 * evaluation.hypervolume(pts).value, abs=1e-5
        )
        assert got["uniformity"] == pytest.approx(float(evaluation.uniformity(p, pts)), abs=1e-5)
        assert got["preference_alignment"] == pytest.approx(
            float(evaluation.preference_alignment(p, pts)), abs=1e-5
        )
    eq = results[(results.pref_set == "equal")]
    assert summary["scenarios"]["react"]["equal"]["average"] == pytest.approx(
        eq.accuracy.mean(), abs=1e-6
    )
    oh = results[results.pref_set == "one_hot"]
    diag = [oh[(oh.pref_id == i) & (oh.task == t)].accuracy.item() for i, t in enumerate(tasks)]
    assert summary["scenarios"]["react"]["one_hot"]["average"] == pytest.approx(
        np.mean(diag), abs=1e-6
    )


def _context(overrides, cache_dir):
    cfg = _compose([*FAST, f"paths.cache_dir={cache_dir}", *overrides])
    pm.validate_config(cfg)
    return cfg, pm.prepare_context(cfg, Cache(cache_dir), torch.device("cpu"))


def _objective(W, z_m, z_e, omega, beta):
    """method.md section 1, written out directly: mean_i ||W m_i - e_i||^2 + beta ||W - Omega||_F^2."""
    return ((z_m @ W.T - z_e) ** 2).sum(1).mean() + beta * ((W - omega) ** 2).sum()


def test_correction_lowers_calibration_objective(entry_run, cache_dir):
    # all calibration images (n > D), so the Procrustes rotation is unique and the plain
    # SVD below is an independent computation of it
    cfg, ctx = _context(["calibration.size=1.0"], cache_dir)
    method = pm.build_method("react", cfg.correction)
    method.fit(ctx)
    split = calibration_split(cfg.calibration.source)
    beta = float(cfg.correction.beta)
    for t, task in enumerate(ctx.tasks):
        idx = ctx.calibration[task]
        z_m = ctx.features(ctx.merged, task, split, idx).double()
        z_e = ctx.features(ctx.expert_ref(task), task, split, idx).double()
        u, _, vh = torch.linalg.svd(z_e.T @ z_m)
        omega = u @ vh
        W = react.task_map(method.stats[t]).double()
        eye = torch.eye(W.shape[0], dtype=torch.float64)
        assert _objective(W, z_m, z_e, omega, beta) < _objective(eye, z_m, z_e, omega, beta)
        # and W is the minimiser: the gradient vanishes there (to the float32 rounding of W)
        W_var = W.clone().requires_grad_(True)
        _objective(W_var, z_m, z_e, omega, beta).backward()
        assert W_var.grad.abs().max() < 1e-5 * max(1.0, float(z_e.abs().max() ** 2))


def test_one_hot_recovers_expert_under_exact_linear_distortion(tmp_path, cache_dir, monkeypatch):
    """Experts = pretrained with the projection multiplied by a random orthogonal Q_t.

    Task Arithmetic then changes only the projection, so every expert's embedding is an
    exact linear map of the merged one; with enough calibration images (rank D) and
    beta -> 0, ReACT at a one-hot preference must reproduce the expert's features and
    therefore its accuracy.
    """
    build = pm.build_suite

    def linear_suite(*args, **kwargs):
        suite = build(*args, **kwargs)
        pre = suite.pretrained_state()
        paths = {}
        for t, task in enumerate(suite.tasks):
            q, _ = torch.linalg.qr(
                torch.randn(
                    pre["proj"].shape[1],
                    pre["proj"].shape[1],
                    generator=torch.Generator().manual_seed(t),
                    dtype=torch.float64,
                )
            )
            state = {k: v.clone() for k, v in pre.items()}
            state["proj"] = (pre["proj"].double() @ q).float()
            paths[task] = tmp_path / f"{task}.safetensors"
            save_file(state, str(paths[task]))
        return dataclasses.replace(suite, expert_paths=paths, key=suite.key + "-linear-experts")

    monkeypatch.setattr(pm, "build_suite", linear_suite)
    cfg = _compose(
        [
            *FAST,
            f"paths.cache_dir={cache_dir}",
            "correction.beta=1e-9",
            "calibration.size=1.0",
            "preferences.sets=[one_hot]",
            f"paths.output_dir={tmp_path}",
        ]
    )
    summary = pm.run(cfg, tmp_path / "run")
    expert = summary["reference"]["expert"]
    one_hot = summary["scenarios"]["react"]["one_hot"]
    for task in summary["tasks"]:
        assert one_hot[task] == pytest.approx(expert[task], abs=1e-9)
    # and the corrected features themselves equal the expert's
    ctx = pm.prepare_context(cfg, Cache(cache_dir), torch.device("cpu"))
    method = pm.build_method("react", cfg.correction)
    method.fit(ctx)
    for t, task in enumerate(ctx.tasks):
        z_m = ctx.features(ctx.merged, task, "test").double()
        z_e = ctx.features(ctx.expert_ref(task), task, "test").double()
        assert (z_m - z_e).norm() > 0.1 * z_e.norm()  # the distortion matters
        W = react.task_map(method.stats[t]).double()
        # float32 features through a near-unregularised solve (beta 1e-9): exact up to the
        # features' conditioning (the tiny mini-CLIP's calibration Gram is ill-conditioned)
        torch.testing.assert_close(
            react.apply(W, z_m), z_e, atol=2e-3 * float(z_e.abs().max()), rtol=0
        )


def _events(cache: Cache) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for stage, _, event in cache.events:
        out.setdefault(event, set()).add(stage)
    return out


def test_changed_config_invalidates_exactly_downstream(tmp_path, cache_dir, entry_run):
    """A warm run hits every unit; a new beta recomputes statistics and sweeps only; a new
    merge scale recomputes the merge and everything after it, never the suite."""
    base = [*FAST, f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path}"]

    def run(extra, name):
        cfg = _compose(base + extra)
        pm.validate_config(cfg)
        cache = Cache(cache_dir)
        pm._run(
            cfg,
            cache,
            torch.device("cpu"),
            _mkdir(tmp_path / name),
            pm.Tracker.for_job(cfg, tmp_path),
        )
        return _events(cache)

    warm = run([], "warm")
    assert warm.get("computed", set()) == set()
    beta = run(["correction.beta=0.37"], "beta")
    assert beta["computed"] == {"statistics", "sweep"}
    assert {"features", "merge"} <= beta["hit"]
    scale = run(["merge.scale=0.21"], "scale")
    assert scale["computed"] == {"merge", "features", "statistics", "sweep"}
    assert (
        not {"offline_dataset", "offline_images", "offline_pretrained", "offline_expert"}
        & scale["computed"]
    )
    calib = run(["calibration.size=0.5"], "calib")
    assert "merge" not in calib["computed"] and {"statistics", "sweep"} <= calib["computed"]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.parametrize(
    "override, message",
    [
        (["preferences.custom=[[0.5,0.5,0.5]]"], "preferences.custom"),
        (["preferences.custom=[[1.2,-0.2,0,0]]"], "negative"),
        (["preferences.custom=[[0.5,0.4,0,0]]"], "sum"),
        (["calibration.size=1.5"], "outside (0, 1]"),
        (["calibration.size=0"], "at least 1"),
        (["correction.beta=-1"], "beta"),
        (["tasks3=[mnist,animals,cars]"], "cars"),
        (["merge.scale=-0.3"], "merge.scale"),
        (["methods=[react,nope]"], "nope"),
    ],
)
def test_bad_config_fails_before_any_stage(tmp_path, override, message):
    cfg = _compose([*FAST, f"paths.cache_dir={tmp_path / 'cache'}", *override])
    with pytest.raises(ValueError, match=None) as err:
        pm.run(cfg, tmp_path / "run")
    assert message in str(err.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unknown_task_and_backbone_are_named(tmp_path):
    with pytest.raises(ValueError) as err:
        pm.validate_config(_compose([*FAST, "suite.tasks=[mnist,cifar]"]))
    assert "cifar" in str(err.value)
    with pytest.raises(Exception) as err:
        _compose([*FAST, "backbone=vit_h99"])
    assert "vit_h99" in str(err.value)


def test_missing_checkpoint_names_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere" / "{task}.safetensors"
    cfg = _compose(
        [
            "suite=paper8",
            "backbone=vit_b32",
            "logger=disabled",
            "backbone.experts.source=state_dict",
            f"backbone.experts.state_dict.template='{missing}'",
            "backbone.experts.pretrained=open_clip",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    with pytest.raises(Exception) as err:
        pm.run(cfg, tmp_path / "run")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert not (tmp_path / "cache" / "features").exists()


def test_statistics_file_answers_preferences_without_models(entry_run, cache_dir):
    """The saved statistics alone (no model, no image) give the same maps as the fitted method."""
    cfg, ctx = _context([], cache_dir)
    method = pm.build_method("react", cfg.correction)
    method.fit(ctx)
    stats = react.load_statistics(method.stats_path)
    stats = stats[0] if isinstance(stats, tuple) else stats
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(
        react.preference_map(stats, p, dtype=torch.float32), method.maps(p.numpy())
    )
    assert set(load_file(str(method.stats_path))) and method.stats_path.suffix == ".safetensors"


def test_submitit_local_multirun_shares_the_cache(tmp_path, cache_dir, entry_run):
    """The SLURM launcher's code path (submitit's local executor): two jobs, one shared cache,
    each job reuses the suite, merge and features of the entry-point run and computes only its
    own statistics and sweeps; the multirun ends with its collected table."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.main",
        "--multirun",
        *FAST,
        "launcher=slurm_local",
        f"paths.output_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "correction.beta=0.1,0.5",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*/summary.json"))
    assert [json.loads(j.read_text())["correction"]["beta"] for j in jobs] == [0.1, 0.5]
    for job in jobs:
        events = json.loads((job.parent / "timings.json").read_text())["cache_events"]
        computed = {stage for stage, _, e in events if e == "computed"}
        assert not computed & {
            "merge",
            "features",
            "offline_images",
            "offline_pretrained",
            "offline_expert",
        }
    collected = pd.read_csv(tmp_path / "sweep" / "collected.csv")
    assert sorted(collected.overrides.unique()) == ["correction.beta=0.1", "correction.beta=0.5"]
