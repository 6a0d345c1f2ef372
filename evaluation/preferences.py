"""Preference sets on the probability simplex (method.md section 5).

Every generator returns a float64 numpy array of shape (P, T): one preference per row,
p_t >= 0, sum_t p_t = 1. Grid points are exact rationals k/h rounded to float; one entry
per row (the largest) is then adjusted by a few ulps so that ``row.sum() == 1.0`` holds
exactly in floating point (``_fix_sums``), so no drift accumulates in sums.

Sets: ``equal``, ``one_hot``, ``priority`` (Table 1 scenarios), ``simplex_grid`` (lattice
with h divisions: C(h + T - 1, T - 1) points, e.g. 66 for T = 3, step 0.1 and 120 for
T = 8, h = 3), ``dirichlet`` (+ vertices and centroid), ``pairwise`` (p = (a, 1 - a) on two
tasks), ``embed`` / ``subspace_grid`` (a grid over a task subset, zeros elsewhere: "@3").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

__all__ = [
    "SUM_TOLERANCE",
    "dirichlet",
    "embed",
    "equal",
    "one_hot",
    "pairwise",
    "preference_labels",
    "priority",
    "simplex_grid",
    "subspace_grid",
    "validate_preferences",
]

SUM_TOLERANCE = 1e-6


def _check_T(T: int, minimum: int = 1) -> None:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < minimum:
        raise ValueError(f"number of tasks T must be an int >= {minimum}, got {T!r}")


def _ulp_neighbours(x: float, k: int = 8) -> list[float]:
    """x, then its neighbours 1, 2, ..., k ulps away (alternating up and down), all >= 0."""
    out, up, down = [x], x, x
    for _ in range(k):
        up, down = np.nextafter(up, np.inf), np.nextafter(down, -np.inf)
        out += [up] + ([down] if down >= 0 else [])
    return out


def _fix_sums(p: np.ndarray) -> np.ndarray:
    """Nudge each row by a few ulps so that it sums to exactly 1.0 in floating point.

    Target: numpy's ``row.sum() == 1.0`` and the correctly rounded sum
    ``math.fsum(row) == 1.0``. First the rounding error ``1 - sum`` is added to the
    largest entry (vectorised); rows still off are repaired by moving one, then two,
    positive entries by up to 8 ulps each (smallest entries, whose ulps are finest, first).
    Entries change by ~1e-15 at most and stay >= 0.
    """
    p = np.array(p, dtype=np.float64)
    if p.size == 0:
        return p
    rows = np.arange(len(p))
    p[rows, p.argmax(axis=1)] += 1.0 - p.sum(axis=1)
    for r in np.flatnonzero(p.sum(axis=1) != 1.0).tolist() + [
        r for r in range(len(p)) if math.fsum(p[r].tolist()) != 1.0
    ]:
        row = p[r]
        if _row_sums_to_one(row):
            continue
        order = [c for c in np.argsort(row, kind="stable") if row[c] > 0]  # finest ulps first
        if not _repair(row, order):
            raise ArithmeticError(
                f"could not make preference row {r} sum to exactly 1: {row.tolist()}"
            )
    return p


def _row_sums_to_one(row: np.ndarray) -> bool:
    return bool(row.sum() == 1.0) and math.fsum(row.tolist()) == 1.0


def _repair(row: np.ndarray, order: list[int]) -> bool:
    """Try ulp moves of one entry, then of pairs of entries, of ``order``; in place."""
    for c in order:
        original = row[c]
        for v in _ulp_neighbours(original):
            row[c] = v
            if _row_sums_to_one(row):
                return True
        row[c] = original
    for a, b in combinations(order, 2):
        oa, ob = row[a], row[b]
        for va in _ulp_neighbours(oa):
            row[a] = va
            for vb in _ulp_neighbours(ob):
                row[b] = vb
                if _row_sums_to_one(row):
                    return True
        row[a], row[b] = oa, ob
    return False


def equal(T: int) -> np.ndarray:
    """The equal preference, shape (1, T): p_t = 1/T."""
    _check_T(T)
    return _fix_sums(np.full((1, T), 1.0 / T))


def one_hot(T: int) -> np.ndarray:
    """The T vertices of the simplex, shape (T, T): row t is e_t (the identity matrix)."""
    _check_T(T)
    return np.eye(T)


def priority_main(T: int, rule: str = "ratio", ratio: float = 3.0, main: float = 0.3) -> float:
    """The measured task's weight in the priority scenario.

    ``rule="ratio"`` (default): the measured task gets ``ratio`` times each other task's weight,
    ratio / (T - 1 + ratio) (3 / (T + 2) at ratio 3: the paper's 0.3 at T = 8, 0.5 at T = 4),
    so it stays a priority at any number of tasks. ``rule="fixed"``: ``main`` whatever T.
    """
    _check_T(T, minimum=2)
    if rule == "ratio":
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
            raise ValueError(f"priority: ratio must be a number >= 1, got {ratio!r}")
        return float(ratio) / (T - 1 + float(ratio))
    if rule == "fixed":
        return main
    raise ValueError(f"priority: rule must be 'ratio' or 'fixed', got {rule!r}")


def priority(T: int, main: float = 0.3) -> np.ndarray:
    """Priority preferences, shape (T, T): row t gives ``main`` to task t, (1 - main)/(T - 1)
    to each other task. With T = 8, main = 0.3: 0.3 and 0.1 each (see :func:`priority_main`
    for the ratio rule that picks ``main`` from T)."""
    _check_T(T, minimum=2)
    if not (isinstance(main, (int, float)) and math.isfinite(main) and 0.0 <= main <= 1.0):
        raise ValueError(f"priority: main must be a number in [0, 1], got {main!r}")
    p = np.full((T, T), (1.0 - main) / (T - 1))
    np.fill_diagonal(p, float(main))
    return _fix_sums(p)


def _compositions(h: int, T: int) -> np.ndarray:
    """All (k_1..k_T) of non-negative ints summing to h, lexicographically decreasing in k_1.

    Stars and bars: choose T - 1 bar positions among h + T - 1 slots.
    """
    out = []
    for bars in combinations(range(h + T - 1), T - 1):
        edges = (-1, *bars, h + T - 1)
        out.append([edges[i + 1] - edges[i] - 1 for i in range(T)])
    return np.array(out, dtype=np.int64)[::-1]


def simplex_grid(T: int, step: float | None = None, *, h: int | None = None) -> np.ndarray:
    """Regular simplex lattice {k / h : k in N^T, sum k = h}, shape (C(h + T - 1, T - 1), T).

    Give either ``step`` (must be 1/h for an integer h, e.g. 0.1 -> h = 10) or ``h``.
    T = 3, step 0.1 -> 66 points; T = 8, h = 3 -> C(10, 3) = 120 points. Rows are ordered
    lexicographically decreasing (the first row is e_1, the last e_T).
    """
    _check_T(T)
    if (step is None) == (h is None):
        raise ValueError(
            "simplex_grid: give exactly one of step (e.g. 0.1) or h (number of divisions)"
        )
    if step is not None:
        if not (isinstance(step, (int, float)) and 0 < step <= 1):
            raise ValueError(f"simplex_grid: step must be in (0, 1], got {step!r}")
        h_float = 1.0 / step
        h = round(h_float)
        if abs(h_float - h) > 1e-9 * h_float:
            raise ValueError(
                f"simplex_grid: step {step} is not 1/h for an integer h (1/step = {h_float}); use e.g. 0.1, 0.2, 0.25"
            )
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
        raise ValueError(f"simplex_grid: h must be an int >= 1, got {h!r}")
    n = math.comb(h + T - 1, T - 1)
    if n > 2_000_000:
        raise ValueError(
            f"simplex_grid: T={T}, h={h} gives {n} points; use a coarser grid or dirichlet()"
        )
    k = _compositions(int(h), T)
    return _fix_sums(k / h)


def dirichlet(
    T: int,
    n: int,
    seed: int = 0,
    alpha: float = 1.0,
    include_vertices: bool = True,
    include_centroid: bool = True,
) -> np.ndarray:
    """``n`` Dirichlet(alpha, ..., alpha) samples (numpy default_rng(seed)), preceded by the
    T vertices e_t (if ``include_vertices``) and the centroid 1/T (if ``include_centroid``),
    in that order: shape (T * include_vertices + include_centroid + n, T).
    alpha = 1 is uniform on the simplex."""
    _check_T(T, minimum=2)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"dirichlet: n must be an int >= 0, got {n!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet: alpha must be a positive number, got {alpha!r}")
    parts = []
    if include_vertices:
        parts.append(one_hot(T))
    if include_centroid:
        parts.append(equal(T))
    parts.append(
        np.random.default_rng(seed)
        .dirichlet(np.full(T, float(alpha)), size=int(n))
        .reshape(int(n), T)
    )
    p = np.concatenate(parts, axis=0)
    if len(p) == 0:
        raise ValueError("dirichlet: empty set (n = 0 without vertices or centroid)")
    return _fix_sums(p)


def pairwise(T: int, i: int, j: int, steps: int = 11) -> np.ndarray:
    """Sweep between tasks i and j, shape (steps, T): row k has p_i = a_k, p_j = 1 - a_k,
    zeros elsewhere, a_k = k / (steps - 1) (0, 0.1, ..., 1 for steps = 11). Row 0 is e_j,
    the last row e_i."""
    _check_T(T, minimum=2)
    for name, x in (("i", i), ("j", j)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < T:
            raise ValueError(f"pairwise: {name} must be a task index in [0, {T}), got {x!r}")
    if i == j:
        raise ValueError(f"pairwise: i and j must differ, got {i} twice")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"pairwise: steps must be an int >= 2, got {steps!r}")
    k = np.arange(steps)
    p = np.zeros((steps, T))
    p[:, i] = k / (steps - 1)
    p[:, j] = (steps - 1 - k) / (steps - 1)
    return _fix_sums(p)


def embed(p_sub, T: int, indices: Sequence[int]) -> np.ndarray:
    """Place (P, k) preferences over tasks ``indices`` into (P, T), zeros elsewhere."""
    _check_T(T)
    idx = [int(x) for x in indices]
    if len(set(idx)) != len(idx) or any(not 0 <= x < T for x in idx):
        raise ValueError(
            f"embed: indices must be distinct task indices in [0, {T}), got {list(indices)}"
        )
    sub = validate_preferences(p_sub, len(idx))
    out = np.zeros((len(sub), T))
    out[:, idx] = sub
    return out


def subspace_grid(
    T: int, indices: Sequence[int], step: float | None = 0.1, *, h: int | None = None
) -> np.ndarray:
    """Simplex grid over the tasks ``indices`` of a T-task problem, zeros elsewhere (the
    "@3" evaluation: e.g. T = 8, indices of Cars, RESISC45, DTD, step 0.1 -> (66, 8))."""
    if h is not None:
        step = None
    return embed(simplex_grid(len(indices), step, h=h), T, indices)


def validate_preferences(p, T: int, normalize: bool = False) -> np.ndarray:
    """Check preferences and return them as a float64 (P, T) array (1-D input -> one row).

    Raises ValueError naming the offending row / entry when: the shape is not (P, T), an
    entry is NaN/inf or negative, or a row does not sum to 1 within ``SUM_TOLERANCE``
    (1e-6). With ``normalize=True`` rows are divided by their sums instead of raising on
    the sum (a zero row still raises). Returns a new array; the input is not modified.
    """
    _check_T(T)
    if hasattr(p, "detach") and hasattr(p, "cpu"):
        p = p.detach().cpu().numpy()
    try:
        arr = np.array(p, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"preferences must be a numeric (P, {T}) array: {e}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"preferences must be a (P, T) array, got {arr.ndim} dimensions (shape {arr.shape})"
        )
    if arr.shape[0] == 0:
        raise ValueError("preferences are empty (0 rows)")
    if arr.shape[1] != T:
        raise ValueError(
            f"preference row 0 has length {arr.shape[1]}, expected one weight per task (T = {T})"
        )
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"preference row {r}, entry {c} is {arr[r, c]} (NaN/inf not allowed)")
    neg = np.argwhere(arr < 0)
    if len(neg):
        r, c = neg[0]
        raise ValueError(
            f"preference row {r}, entry {c} is negative ({arr[r, c]}); weights must be >= 0"
        )
    sums = arr.sum(axis=1)
    if normalize:
        zero = np.flatnonzero(sums <= 0)
        if len(zero):
            raise ValueError(f"preference row {zero[0]} sums to 0 and cannot be normalised")
        return _fix_sums(arr / sums[:, None])
    off = np.flatnonzero(np.abs(sums - 1.0) > SUM_TOLERANCE)
    if len(off):
        r = off[0]
        raise ValueError(
            f"preference row {r} sums to {sums[r]:.9g}, not 1 (tolerance {SUM_TOLERANCE:g}); "
            "pass normalize=True to rescale rows"
        )
    return arr


def preference_labels(p, tasks: Sequence[str], digits: int = 2) -> list[str]:
    """Short human-readable names, e.g. ``"Cars=0.7, DTD=0.3"`` (zero weights omitted)."""
    arr = validate_preferences(p, len(tasks))
    return [
        ", ".join(f"{t}={w:.{digits}g}" for t, w in zip(tasks, row, strict=True) if w > 0)
        for row in arr
    ]
