"""Metrics: hypervolume against hand values and brute force, uniformity and alignment against
hand-computed numbers and element-by-element loops, accuracy and normalised accuracy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import evaluation
from evaluation import metrics


# ----------------------------------------------------------------------------- brute forces
def hv_inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """HV = sum over non-empty subsets S of (-1)^(|S|+1) prod_k (min_{i in S} x_ik - r_k)_+."""
    total = 0.0
    n = len(points)
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            corner = points[list(subset)].min(axis=0)
            total += (-1) ** (size + 1) * np.prod(np.clip(corner - ref, 0, None))
    return total


def hv_grid(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact HV by coordinate compression: the cells between consecutive distinct coordinates
    are either fully dominated or not; add the volumes of dominated cells."""
    dims = points.shape[1]
    axes = [
        np.unique(np.concatenate([[ref[k]], points[:, k][points[:, k] > ref[k]]]))
        for k in range(dims)
    ]
    lows = np.meshgrid(*[a[:-1] for a in axes], indexing="ij")
    widths = np.meshgrid(*[np.diff(a) for a in axes], indexing="ij")
    lo = np.stack([g.ravel() for g in lows], axis=1)  # lower corners of cells
    vol = np.prod(np.stack([g.ravel() for g in widths], axis=1), axis=1)
    # a cell [lo, hi] is dominated iff some point p has p >= hi, i.e. p > lo on every axis
    dominated = np.zeros(len(lo), dtype=bool)
    for p in points:
        dominated |= np.all(p > lo, axis=1)
    return float(vol[dominated].sum())


# ----------------------------------------------------------------------------- hypervolume
def test_hv_hand_values_2d():
    r = evaluation.hypervolume(np.array([[1.0, 0.5], [0.5, 1.0]]))
    assert r.value == pytest.approx(0.75, abs=1e-15) and r.exact and r.dim == 2 and r.n_front == 2
    assert float(r) == pytest.approx(0.75)
    # dominated point, point below the reference, point on the reference boundary: no change
    pts = np.array([[1.0, 0.5], [0.5, 1.0], [0.4, 0.4], [-1.0, 2.0], [0.0, 3.0], [1.0, 0.5]])
    r = evaluation.hypervolume(pts)
    assert r.value == pytest.approx(0.75, abs=1e-15)
    assert (r.n_points, r.n_front) == (6, 2)
    # non-zero reference: box [1, 2] x [1, 3]
    assert evaluation.hypervolume([[2.0, 3.0]], reference=[1.0, 1.0]).value == pytest.approx(2.0)
    assert evaluation.hypervolume([[2.0, 3.0]], reference=1.0).value == pytest.approx(2.0)


def test_hv_hand_values_3d():
    assert evaluation.hypervolume([[1.0, 1.0, 1.0]]).value == pytest.approx(1.0)
    # three boxes of volume 0.25, pairwise and triple intersections 0.125: 0.75 - 0.375 + 0.125
    pts = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    assert evaluation.hypervolume(pts).value == pytest.approx(0.5, abs=1e-15)
    nothing = evaluation.hypervolume([[-0.1, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert nothing.value == 0.0 and nothing.n_front == 0 and nothing.exact


@pytest.mark.parametrize("dim,n,seed", [(2, 9, 0), (3, 9, 1), (3, 11, 2), (4, 8, 3), (5, 7, 4)])
def test_hv_matches_brute_force_random(dim, n, seed):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-0.2, 1.0, size=(n, dim))  # some points fall below the reference
    ref = np.full(dim, 0.0) if seed % 2 == 0 else rng.uniform(-0.3, 0.1, size=dim)
    expected = hv_grid(pts, ref)
    got = evaluation.hypervolume(pts, reference=ref)
    assert got.exact
    assert got.value == pytest.approx(expected, rel=1e-12, abs=1e-14)
    if n <= 9:  # second, unrelated brute force
        assert hv_inclusion_exclusion(pts, ref) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hv_accepts_torch():
    t = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float32, requires_grad=True)
    assert evaluation.hypervolume(t).value == pytest.approx(0.75)


def _front(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.ones(dim), n)
    return 0.6 + 0.4 * x / np.linalg.norm(x, axis=1, keepdims=True)  # non-dominated, in [0.6, 1]


def test_hv_approximation_path():
    pts = _front(60, 6, seed=0)
    exact = evaluation.hypervolume(pts, exact_max_points=1000)
    assert exact.exact and exact.method == "moocore.hypervolume exact" and exact.n_front == 60
    approx = evaluation.hypervolume(pts, exact_max_points=10, approx_samples=2**16)
    assert not approx.exact
    assert "Rphi-FWE+" in approx.method and "65536 samples" in approx.method
    assert approx.value == pytest.approx(exact.value, rel=2e-3)
    assert approx.value != exact.value
    again = evaluation.hypervolume(pts, exact_max_points=10, approx_samples=2**16)
    assert again.value == approx.value  # deterministic
    mc = [
        evaluation.hypervolume(
            pts, exact_max_points=10, approx_samples=2**15, approx_method="DZ2019-MC", seed=s
        )
        for s in (3, 3, 4)
    ]
    assert not mc[0].exact and "Monte-Carlo" in mc[0].method and "seed 3" in mc[0].method
    assert mc[0].value == mc[1].value and mc[0].value != mc[2].value
    assert mc[0].value == pytest.approx(exact.value, rel=1e-2)


def test_hv_low_dimensions_always_exact():
    pts = _front(300, 4, seed=1)
    r = evaluation.hypervolume(pts, exact_max_points=5)
    assert r.exact and r.n_front == 300


def test_hv_bad_input():
    with pytest.raises(ValueError, match="non-finite value nan at row 1, column 0"):
        evaluation.hypervolume([[1.0, 1.0], [np.nan, 0.5]])
    with pytest.raises(ValueError, match=r"must be a \(P, T\) array"):
        evaluation.hypervolume(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"one entry per objective \(3\)"):
        evaluation.hypervolume(np.ones((4, 3)), reference=[0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        evaluation.hypervolume(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="approx_method"):
        evaluation.hypervolume(np.ones((2, 3)), approx_method="magic")


# ----------------------------------------------------------------------------- uniformity
def uniformity_loop(p: np.ndarray, a: np.ndarray) -> list[float]:
    """Element-by-element PHN uniformity; NaN where sum(r*l) = 0."""
    out = []
    for r, acc in zip(p, a, strict=True):
        T = len(r)
        losses = [max(1.0 - x, 0.0) for x in acc]
        s = sum(ri * li for ri, li in zip(r, losses, strict=True))
        if s == 0:
            out.append(math.nan)
            continue
        kl = 0.0
        for ri, li in zip(r, losses, strict=True):
            q = ri * li / s
            if q > 0:
                kl += q * math.log(T * q)
        out.append(1.0 - kl)
    return out


def test_uniformity_hand_values():
    # r = (1/2, 1/2), a = (0.8, 0.6): l = (0.2, 0.4), lhat = (1/3, 2/3)
    u = evaluation.uniformity([[0.5, 0.5]], [[0.8, 0.6]])
    expected = 1 - (1 / 3 * math.log(2 / 3) + 2 / 3 * math.log(4 / 3))
    assert u.value == pytest.approx(expected, abs=1e-15) and expected == pytest.approx(
        0.943367, abs=1e-6
    )
    # r_j l_j constant -> lhat uniform -> U = 1
    assert float(evaluation.uniformity([[0.25, 0.75]], [[0.4, 0.8]])) == pytest.approx(
        1.0, abs=1e-15
    )
    # one-hot preference -> lhat one-hot -> U = 1 - log T (T = 3)
    assert float(evaluation.uniformity([[0, 1, 0]], [[0.5, 0.9, 0.7]])) == pytest.approx(
        1 - math.log(3)
    )
    # better than the expert on task 0: loss clipped to 0, lhat = (0, 1)
    assert float(evaluation.uniformity([[0.5, 0.5]], [[1.2, 0.6]])) == pytest.approx(
        1 - math.log(2)
    )
    # mean over preferences
    m = evaluation.uniformity([[0.5, 0.5], [0.25, 0.75]], [[0.8, 0.6], [0.4, 0.8]])
    assert m.value == pytest.approx((expected + 1.0) / 2) and (m.n_used, m.n_excluded) == (2, 0)
    # scale of r does not matter
    assert float(evaluation.uniformity([[2.0, 2.0]], [[0.8, 0.6]])) == pytest.approx(expected)


def test_uniformity_excludes_zero_weighted_loss():
    # row 1: the only preferred task is at the expert's level -> sum(r*l) = 0 -> excluded
    u = evaluation.uniformity([[0.5, 0.5], [1.0, 0.0]], [[0.8, 0.6], [1.0, 0.3]])
    assert (u.n_used, u.n_excluded) == (1, 1)
    assert u.value == pytest.approx(0.9433669877348675)
    assert math.isnan(u.per_preference[1])
    none = evaluation.uniformity([[1.0, 0.0]], [[1.0, 0.3]])
    assert math.isnan(none.value) and none.n_used == 0


def test_uniformity_matches_loop_random():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), 40)
    p[:5] = np.eye(5)
    a = rng.uniform(0.3, 1.1, size=(40, 5))
    got = evaluation.uniformity(p, a)
    ref = uniformity_loop(p, a)
    np.testing.assert_allclose(got.per_preference, ref, rtol=1e-12)
    assert got.value == pytest.approx(np.nanmean(ref), rel=1e-12)


def test_uniformity_bad_input():
    with pytest.raises(
        ValueError, match=r"shape \(1, 2\) but normalized_accuracy has shape \(1, 3\)"
    ):
        evaluation.uniformity([[0.5, 0.5]], [[0.8, 0.6, 0.7]])
    with pytest.raises(ValueError, match="row 0 has a negative weight"):
        evaluation.uniformity([[-0.5, 1.5]], [[0.8, 0.6]])
    with pytest.raises(ValueError, match="row 0 sums to 0"):
        evaluation.uniformity([[0.0, 0.0]], [[0.8, 0.6]])
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.uniformity([[0.5, 0.5]], [[np.nan, 0.6]])


# ----------------------------------------------------------------------------- alignment
def test_alignment_hand_values():
    assert float(evaluation.preference_alignment([[0.7, 0.3]], [[0.9, 0.8]])) == pytest.approx(1.0)
    assert float(evaluation.preference_alignment([[0.7, 0.3]], [[0.8, 0.9]])) == pytest.approx(-1.0)
    # p - mean = (-2/15, -1/30, 1/6), a - mean = (0.1, -0.1, 0): cov = -0.01
    expected = -0.01 / math.sqrt((4 / 225 + 1 / 900 + 1 / 36) * 0.02)
    r = evaluation.preference_alignment([[0.2, 0.3, 0.5]], [[0.9, 0.7, 0.8]])
    assert r.value == pytest.approx(expected, abs=1e-12) and expected == pytest.approx(
        -0.327327, abs=1e-6
    )


def test_alignment_excludes_constant_vectors():
    p = [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.0, 1.0, 0.0]]
    a = [[0.9, 0.7, 0.8], [0.9, 0.7, 0.8], [0.8, 0.8, 0.8], [0.5, 0.9, 0.6]]
    r = evaluation.preference_alignment(p, a)
    assert (r.n_used, r.n_excluded) == (2, 2)
    assert math.isnan(r.per_preference[0]) and math.isnan(r.per_preference[2])
    rho3 = np.corrcoef([0.0, 1.0, 0.0], [0.5, 0.9, 0.6])[0, 1]
    assert r.value == pytest.approx((-0.3273268353539885 + rho3) / 2, abs=1e-12)


def test_alignment_matches_corrcoef_random():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(8), 30)
    a = rng.uniform(0.4, 1.0, size=(30, 8))
    ref = [np.corrcoef(pi, ai)[0, 1] for pi, ai in zip(p, a, strict=True)]
    got = evaluation.preference_alignment(p, a)
    np.testing.assert_allclose(got.per_preference, ref, rtol=1e-10)
    assert got.value == pytest.approx(np.mean(ref), rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        evaluation.preference_alignment([[1.0]], [[0.5]])


# ----------------------------------------------------------------------------- accuracy
def test_accuracy_and_normalized_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    assert evaluation.accuracy(logits, np.array([0, 0, 0])) == pytest.approx(2 / 3)
    assert evaluation.accuracy(torch.tensor(logits), torch.tensor([0, 1, 0])) == 1.0
    np.testing.assert_allclose(evaluation.normalized_accuracy([0.6, 0.9], [0.8, 0.9]), [0.75, 1.0])
    assert evaluation.normalized_accuracy(0.5, 0.8) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="> 0"):
        evaluation.normalized_accuracy([0.6, 0.9], [0.8, 0.0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        evaluation.accuracy(logits, np.array([0, 2, 0]))
    with pytest.raises(ValueError, match=r"labels must be \(N,\) with N = 3"):
        evaluation.accuracy(logits, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer class ids"):
        evaluation.accuracy(logits, np.array([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="empty batch"):
        evaluation.accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert metrics.accuracy is evaluation.accuracy
