"""scripts/linear_bounds.py in a subprocess on the tiny suite, against second computations:
ReACT's whole-test equal-preference map written out in numpy (Grams, cross terms, Procrustes
by numpy's SVD, the closed form by numpy's solve), and the labelled maps scoring at least
the identity's (merged) cross entropy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["suite=offline_tiny", "logger=disabled", "progress=false", "num_threads=1"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_cache):
    tmp = tmp_path_factory.mktemp("bounds")
    tiny_cache(tmp / "cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "linear_bounds.py"),
        *TINY,
        f"paths.output_dir={tmp}",
        f"paths.cache_dir={tmp / 'cache'}",
        "--steps",
        "20",
        "--out",
        str(tmp / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc, pd.read_csv(tmp / "out" / "bounds.csv")


def test_react_whole_test_rows_match_a_numpy_closed_form(run):
    import torch

    from pipeline.cache import Cache
    from pipeline.main import compose_config, prepare_context

    tmp, proc, df = run
    cfg = compose_config([*TINY, f"paths.cache_dir={tmp / 'cache'}"])
    ctx = prepare_context(cfg, Cache(cfg.paths.cache_dir), torch.device("cpu"))
    beta = float(cfg.correction.beta)
    A, C = [], []
    feats = {}
    for t in ctx.tasks:
        m = ctx.features(ctx.merged, t, "test").double().numpy()
        e = ctx.features(ctx.expert_ref(t), t, "test").double().numpy()
        feats[t] = m
        n, D = m.shape
        G, S = m.T @ m / n, e.T @ m / n
        U, _, Vt = np.linalg.svd(S)
        A.append(S + beta * (U @ Vt))
        C.append(G + beta * np.eye(D))
    W = np.linalg.solve(np.mean(C, 0).T, np.mean(A, 0).T).T  # mean(A) mean(C)^-1
    got = df[df.row == "ReACT on the whole test set, equal"].set_index("task").accuracy
    for t in ctx.tasks:
        z = torch.from_numpy(feats[t] @ W.T).float()
        assert got[t] == pytest.approx(100 * ctx.accuracy(z, t), abs=1e-6), t
    merged = df[df.row == "merged"].set_index("task").accuracy
    for t in ctx.tasks:
        assert merged[t] == pytest.approx(
            100 * ctx.accuracy(ctx.features(ctx.merged, t, "test"), t), abs=1e-6
        )


def test_table_has_every_reference_row_and_the_markdown(run):
    tmp, proc, df = run
    rows = set(df.row)
    assert {
        "merged",
        "expert",
        "ReACT on the whole test set, equal",
        "ReACT on the whole test set, one-hot",
        "best single linear map with labels (all tasks)",
        "best linear map with labels, per task (one-hot bound)",
    } == rows
    md = (tmp / "out" / "bounds.md").read_text()
    assert "Oracle references" in md and md in proc.stdout
    assert df.accuracy.between(0, 100).all()
