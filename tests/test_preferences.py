"""Preference sets: exact counts and values against brute-force enumeration, exact row sums,
validation errors that name the offending row and entry."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from evaluation import preferences as prefs


def lattice_brute_force(T: int, h: int) -> set[tuple[int, ...]]:
    """Every integer vector in {0..h}^T with sum h (independent of stars and bars)."""
    return {k for k in itertools.product(range(h + 1), repeat=T) if sum(k) == h}


def assert_on_simplex_exactly(p: np.ndarray) -> None:
    assert p.dtype == np.float64 and p.ndim == 2
    assert np.all(p >= 0)
    assert np.all(p.sum(axis=1) == 1.0)  # exact, numpy's summation
    assert all(math.fsum(row) == 1.0 for row in p.tolist())  # exact, correctly rounded
    assert len(np.unique(p, axis=0)) == len(p)


@pytest.mark.parametrize(
    "T,kwargs,count",
    [
        (3, {"step": 0.1}, 66),
        (8, {"h": 3}, 120),
        (3, {"h": 10}, 66),
        (4, {"step": 0.25}, 35),
        (5, {"h": 6}, 210),
    ],
)
def test_simplex_grid_counts_and_values(T, kwargs, count):
    g = prefs.simplex_grid(T, **kwargs)
    assert g.shape == (count, T) and count == math.comb(
        (kwargs.get("h") or round(1 / kwargs["step"])) + T - 1, T - 1
    )
    assert_on_simplex_exactly(g)
    h = kwargs.get("h") or round(1 / kwargs["step"])
    ints = np.rint(g * h).astype(int)
    assert {tuple(k) for k in ints.tolist()} == lattice_brute_force(T, h)
    # each entry is k/h up to the few-ulp sum repair
    np.testing.assert_allclose(g, ints / h, rtol=0, atol=4e-16)
    exact = np.array([[float(Fraction(int(k), h)) for k in row] for row in ints])
    assert np.mean(g == exact) > 0.8  # most entries untouched by the repair


def test_simplex_grid_step_and_h_agree_and_order():
    np.testing.assert_array_equal(prefs.simplex_grid(3, 0.1), prefs.simplex_grid(3, h=10))
    g = prefs.simplex_grid(3, h=2)
    np.testing.assert_array_equal(
        g, [[1, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]]
    )


def test_simplex_grid_bad_arguments():
    with pytest.raises(ValueError, match="not 1/h"):
        prefs.simplex_grid(3, 0.3)
    with pytest.raises(ValueError, match="exactly one of step"):
        prefs.simplex_grid(3, 0.1, h=10)
    with pytest.raises(ValueError, match="exactly one of step"):
        prefs.simplex_grid(3)
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        prefs.simplex_grid(0, h=2)


def test_scenarios():
    np.testing.assert_array_equal(prefs.equal(4), [[0.25] * 4])
    e8 = prefs.equal(8)
    assert_on_simplex_exactly(e8)
    np.testing.assert_allclose(e8, 1 / 8, rtol=0, atol=0)
    e7 = prefs.equal(7)
    assert_on_simplex_exactly(e7)
    np.testing.assert_allclose(e7, 1 / 7, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(prefs.one_hot(3), np.eye(3))
    np.testing.assert_array_equal(
        prefs.priority(3, main=0.5), [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]
    )
    p8 = prefs.priority(8)
    assert_on_simplex_exactly(p8)
    for t in range(8):
        assert p8[t, t] == pytest.approx(0.3, abs=1e-15)
        others = np.delete(p8[t], t)
        np.testing.assert_allclose(others, 0.1, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"main must be a number in \[0, 1\]"):
        prefs.priority(4, main=1.5)
    with pytest.raises(ValueError, match="T must be an int >= 2"):
        prefs.priority(1)


def test_dirichlet():
    d = prefs.dirichlet(8, 100, seed=0)
    assert d.shape == (109, 8)
    assert_on_simplex_exactly(d)
    np.testing.assert_array_equal(d[:8], np.eye(8))
    np.testing.assert_array_equal(d[8], np.full(8, 1 / 8))
    raw = np.random.default_rng(0).dirichlet(np.ones(8), size=100)
    np.testing.assert_allclose(d[9:], raw, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(d, prefs.dirichlet(8, 100, seed=0))
    assert not np.allclose(d[9:], prefs.dirichlet(8, 100, seed=1)[9:])
    bare = prefs.dirichlet(3, 4000, seed=2, include_vertices=False, include_centroid=False)
    assert bare.shape == (4000, 3)
    # Dirichlet(1,1,1): each coordinate has mean 1/3 and variance 1/18
    np.testing.assert_allclose(bare.mean(axis=0), 1 / 3, atol=0.02)
    np.testing.assert_allclose(bare.var(axis=0), 1 / 18, atol=0.006)
    concentrated = prefs.dirichlet(
        3, 2000, seed=2, alpha=50.0, include_vertices=False, include_centroid=False
    )
    assert concentrated.std(axis=0).max() < 0.06
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        prefs.dirichlet(3, 5, alpha=0.0)


def test_pairwise_and_subspace():
    p = prefs.pairwise(5, 1, 3)
    assert p.shape == (11, 5)
    assert_on_simplex_exactly(p)
    a = np.arange(11) / 10
    np.testing.assert_allclose(p[:, 1], a, rtol=0, atol=2e-16)
    np.testing.assert_allclose(p[:, 3], 1 - a, rtol=0, atol=2e-16)
    np.testing.assert_array_equal(p[:, [0, 2, 4]], 0)
    np.testing.assert_array_equal(p[0], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(p[-1], [0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="i and j must differ"):
        prefs.pairwise(5, 2, 2)
    with pytest.raises(ValueError, match=r"j must be a task index in \[0, 5\)"):
        prefs.pairwise(5, 0, 5)

    s = prefs.subspace_grid(8, [1, 2, 7], step=0.1)
    assert s.shape == (66, 8)
    assert_on_simplex_exactly(s)
    np.testing.assert_array_equal(s[:, [1, 2, 7]], prefs.simplex_grid(3, 0.1))
    np.testing.assert_array_equal(s[:, [0, 3, 4, 5, 6]], 0)
    np.testing.assert_array_equal(prefs.embed([[0.5, 0.5]], 3, [2, 0]), [[0.5, 0, 0.5]])
    with pytest.raises(ValueError, match="distinct task indices"):
        prefs.embed([[0.5, 0.5]], 3, [1, 1])


def test_validate_preferences_errors():
    ok = prefs.validate_preferences([0.2, 0.8], 2)
    np.testing.assert_array_equal(ok, [[0.2, 0.8]])
    with pytest.raises(ValueError, match=r"length 3, expected one weight per task \(T = 4\)"):
        prefs.validate_preferences([[0.2, 0.3, 0.5]], 4)
    with pytest.raises(ValueError, match="row 1, entry 2 is negative"):
        prefs.validate_preferences([[0.5, 0.5, 0.0], [0.6, 0.6, -0.2]], 3)
    with pytest.raises(ValueError, match="row 0, entry 1 is nan"):
        prefs.validate_preferences([[0.5, np.nan, 0.5]], 3)
    with pytest.raises(ValueError, match="row 2 sums to 0.9, not 1"):
        prefs.validate_preferences([[1, 0], [0, 1], [0.4, 0.5]], 2)
    with pytest.raises(ValueError, match="0 rows"):
        prefs.validate_preferences(np.zeros((0, 3)), 3)
    with pytest.raises(ValueError, match="3 dimensions"):
        prefs.validate_preferences(np.zeros((1, 1, 3)), 3)
    # within tolerance passes, just outside does not
    prefs.validate_preferences([[0.5, 0.5 + 5e-7]], 2)
    with pytest.raises(ValueError, match="row 0 sums to"):
        prefs.validate_preferences([[0.5, 0.5 + 2e-6]], 2)
    n = prefs.validate_preferences([[1.0, 3.0], [2.0, 2.0]], 2, normalize=True)
    np.testing.assert_array_equal(n, [[0.25, 0.75], [0.5, 0.5]])
    with pytest.raises(ValueError, match="row 1 sums to 0 and cannot be normalised"):
        prefs.validate_preferences([[1.0, 3.0], [0.0, 0.0]], 2, normalize=True)


def test_preference_labels():
    assert prefs.preference_labels([[0.7, 0.0, 0.3]], ["Cars", "SUN", "DTD"]) == [
        "Cars=0.7, DTD=0.3"
    ]
