"""MAP: Model merging with Amortized Pareto fronts (Li et al., arXiv 2406.07529).

1. Sample (K+1)(K+2) scaling vectors c in [0, 1]^K (``sample_scalings``, seeded) and score
   each Task Arithmetic merge theta_0 + sum_k c_k tau_k on labeled validation data.
2. Per task k, fit a sigmoid-wrapped full quadratic f_k(c) = sigmoid(q_k(c)),
   q_k(c) = sum_i a_i c_i^2 + sum_{i<j} b_ij c_i c_j + sum_i d_i c_i + e (``fit_quadratic``).
   The authors' code (luli-git/MAP) fits the sigmoid model to the accuracies with
   scipy's ``curve_fit`` from an all-ones start; we fit ordinary least squares on the
   logit of the clipped accuracies (``how="logit"``) and, by default (``how="nls"``), refine
   that by nonlinear least squares on the accuracies themselves (``scipy.optimize.least_squares``).
3. Search the K surrogates with NSGA-III (pymoo, population 100, seeded): ``pareto_front``.
4. A preference p picks the front point with the largest predicted sum_k p_k f_k(c)
   (``select``); that merge is then evaluated for real.
"""

from __future__ import annotations

import numpy as np


def sample_scalings(
    n_tasks: int, n: int | None = None, *, seed: int = 0, low: float = 0.0, high: float = 1.0
) -> np.ndarray:
    """(n, K) uniform scaling vectors in [low, high]^K; n defaults to (K+1)(K+2)."""
    n = (n_tasks + 1) * (n_tasks + 2) if n is None else int(n)
    return np.random.default_rng(seed).uniform(low, high, size=(n, n_tasks))


def quadratic_terms(c: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, (K+1)(K+2)/2): [c_i^2 (i), c_i c_j (i<j), c_i (i), 1]."""
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    K = c.shape[1]
    iu = np.triu_indices(K, k=1)
    return np.concatenate([c**2, c[:, iu[0]] * c[:, iu[1]], c, np.ones((len(c), 1))], axis=1)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def predict(coef: np.ndarray, c: np.ndarray) -> np.ndarray:
    """sigmoid(q(c)) for one (M,) or K stacked (K, M) coefficient vectors: (N,) or (N, K)."""
    return _sigmoid(quadratic_terms(c) @ np.asarray(coef, dtype=np.float64).T)


def fit_quadratic(
    c: np.ndarray, y: np.ndarray, *, how: str = "nls", eps: float = 1e-3
) -> np.ndarray:
    """Coefficients (M,) of sigmoid(q(c)) fitted to scores y in [0, 1] at points c (N, K).

    ``logit``: least squares of q(c) on logit(clip(y, eps, 1 - eps)) (exact for noiseless
    data strictly inside the clip range). ``nls``: the logit fit refined by least squares
    on y itself (what the authors' curve_fit minimises).
    """
    if how not in ("logit", "nls"):
        raise ValueError(f"fit must be 'logit' or 'nls', got {how!r}")
    A = quadratic_terms(c)
    y = np.asarray(y, dtype=np.float64)
    if len(y) != len(A):
        raise ValueError(f"{len(A)} points but {len(y)} scores")
    yc = np.clip(y, eps, 1 - eps)
    coef = np.linalg.lstsq(A, np.log(yc) - np.log1p(-yc), rcond=None)[0]
    if how == "nls":
        from scipy.optimize import least_squares

        coef = least_squares(
            lambda w: _sigmoid(A @ w) - y, coef, method="lm" if len(y) >= len(coef) else "trf"
        ).x
    return coef


def das_dennis_partitions(n_obj: int, pop_size: int) -> int:
    """Largest number of Das-Dennis partitions whose reference directions fit in ``pop_size``."""
    from math import comb

    h = 1
    while comb(h + 1 + n_obj - 1, n_obj - 1) <= pop_size:
        h += 1
    return h


def pareto_front(
    coefs: np.ndarray,
    *,
    pop_size: int = 100,
    n_gen: int = 200,
    seed: int = 0,
    low: float = 0.0,
    high: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-III over c in [low, high]^K maximising every surrogate f_k = predict(coefs[k], c).

    Returns the non-dominated scaling vectors X (M, K) of the final population and their
    predicted scores F (M, K).
    """
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    coefs = np.asarray(coefs, dtype=np.float64)
    K = coefs.shape[0]

    class Surrogates(Problem):
        def __init__(self):
            super().__init__(n_var=K, n_obj=K, xl=low, xu=high)

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = -predict(coefs, x)

    ref_dirs = get_reference_directions(
        "das-dennis", K, n_partitions=das_dennis_partitions(K, pop_size)
    )
    res = minimize(
        Surrogates(),
        NSGA3(ref_dirs=ref_dirs, pop_size=pop_size),
        ("n_gen", int(n_gen)),
        seed=int(seed),
        verbose=False,
    )
    X = np.atleast_2d(res.X)
    X = np.unique(X, axis=0)  # sorted, duplicates dropped: deterministic order
    return X, predict(coefs, X)


def select(scores: np.ndarray, prefs: np.ndarray) -> np.ndarray:
    """Per preference row, the index of the front point with the largest sum_k p_k scores_k."""
    return np.argmax(
        np.asarray(prefs, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T, axis=1
    )
