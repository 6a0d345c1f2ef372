"""Benchmark: hypervolume in 8-D (exact vs approximation) and the wrapper's overhead.

Baseline: a plain ``moocore.hypervolume(points, ref=0, maximise=True)`` call on the same
points, in the same process. Points: non-dominated fronts in [0.6, 1]^8 (normalised
accuracies of a good merge), built from Dirichlet directions with a fixed seed.

    .venv/bin/python bench/bench_evaluation.py [--sizes 50 100 150 200 250]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import moocore
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluation  # noqa: E402


def front(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).dirichlet(np.ones(dim), n)
    return 0.6 + 0.4 * x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, min_time: float = 0.5) -> tuple[float, object]:
    """Best wall time over repeats (at least one run, repeats until min_time is spent)."""
    best, out, spent = float("inf"), None, 0.0
    while spent < min_time or best == float("inf"):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 150, 200, 250])
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2**20)
    args = ap.parse_args()

    print(
        f"machine: {platform.machine()}, 2-core CPU; moocore {moocore.__version__}; dim {args.dim}; "
        f"approximation samples {args.samples}\n"
    )
    print(
        "| points | moocore exact (s) | wrapper exact (s) | wrapper / moocore | Rphi-FWE+ approx (s) | "
        "exact / approx time | Rphi rel. error | DZ2019-MC seed 0 rel. error |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        pts = front(n, args.dim)
        t_raw, raw = timed(lambda pts=pts: moocore.hypervolume(pts, ref=0, maximise=True))
        t_wrap, res = timed(lambda pts=pts: evaluation.hypervolume(pts, exact_max_points=10**9))
        assert res.exact and abs(res.value - raw) <= 1e-12 * raw
        t_apx, apx = timed(
            lambda pts=pts: evaluation.hypervolume(
                pts, exact_max_points=0, approx_samples=args.samples
            )
        )
        mc = evaluation.hypervolume(
            pts, exact_max_points=0, approx_samples=args.samples, approx_method="DZ2019-MC", seed=0
        )
        assert not apx.exact and not mc.exact
        print(
            f"| {n} | {t_raw:.3f} | {t_wrap:.3f} | {t_wrap / t_raw:.2f} | {t_apx:.3f} | {t_raw / t_apx:.1f} | "
            f"{(apx.value - raw) / raw:+.1e} | {(mc.value - raw) / raw:+.1e} |"
        )


if __name__ == "__main__":
    main()
