"""The regime diagnostics: the math against a second computation, and the command end to end.

Math (evaluation.diagnostics): spectra against numpy's covariance eigenvalues, the energy
dimension against a brute-force scan, overlaps against scipy's principal angles and a Monte
Carlo estimate of the chance level, gain shares against the formula written out.
Command (scripts/suite_diagnostics.py on the tiny suite, in a subprocess): the printed and
written numbers against accuracies and feature geometry recomputed here from the suite's
files, the TA lambda against a re-run of the validation search, and a rerun served by the
cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from evaluation import diagnostics as dg


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- effective dimension
def test_spectrum_matches_numpy_covariance():
    x = _rng().normal(size=(50, 6)) @ _rng(1).normal(size=(6, 6)) + 3.0
    lam = dg.covariance_spectrum(x)
    want = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(lam, want, rtol=1e-10, atol=1e-12)
    # uncentred: the second moment, where the mean (3, ..., 3) adds a large direction
    lam_u = dg.covariance_spectrum(x, centered=False)
    np.testing.assert_allclose(
        lam_u, np.sort(np.linalg.eigvalsh(x.T @ x / len(x)))[::-1], rtol=1e-10
    )
    assert lam_u[0] > 5 * lam[0]
    # weighted (task-balanced pooling): numpy's weighted covariance
    w = _rng(2).uniform(0.1, 3.0, size=len(x))
    want_w = np.linalg.eigvalsh(np.cov(x, rowvar=False, aweights=w, bias=True))
    np.testing.assert_allclose(dg.covariance_spectrum(x, weights=w), want_w[::-1], rtol=1e-10)
    # integer weights = repeated rows
    reps = np.array([1, 2, 3] * 16 + [1, 1])
    np.testing.assert_allclose(
        dg.covariance_spectrum(x, weights=reps), dg.covariance_spectrum(np.repeat(x, reps, 0))
    )
    with pytest.raises(ValueError, match="non-negative"):
        dg.covariance_spectrum(x, weights=-w)


def test_participation_ratio_known_values_and_formula():
    # exact spectrum: zero-mean orthogonal +-1 columns of a Hadamard matrix (unit variance)
    # scaled by sqrt(l): the covariance is diag(l)
    lam = np.array([4.0, 2.0, 1.0, 1.0, 0.0])
    x = scipy.linalg.hadamard(8)[:, 1:6] * np.sqrt(lam) + 7.0
    np.testing.assert_allclose(np.cov(x, rowvar=False, bias=True), np.diag(lam), atol=1e-12)
    ed = dg.effective_dimension(x)
    assert ed.participation_ratio == pytest.approx(8.0**2 / (16 + 4 + 1 + 1))
    # 90% of 8 = 7.2: 4 + 2 + 1 = 7 is not enough, four dimensions are
    assert ed.energy_dim == 4 and ed.centered and (ed.n, ed.D) == (8, 5)
    assert dg.effective_dimension(x, energy=0.75).energy_dim == 2  # 6/8 exactly
    # isotropic: PR close to D; rank one: PR 1, one dimension
    iso = _rng().normal(size=(20000, 8))
    assert dg.effective_dimension(iso).participation_ratio == pytest.approx(8, rel=0.01)
    line = np.outer(_rng().normal(size=30), [1.0, 2.0, -1.0])
    one = dg.effective_dimension(line)
    assert one.participation_ratio == pytest.approx(1.0) and one.energy_dim == 1


def test_energy_dimension_against_brute_force():
    rng = _rng(3)
    for _ in range(50):
        lam = rng.exponential(size=rng.integers(1, 12)) ** 3
        for energy in (0.5, 0.9, 0.99, 1.0):
            total = lam.sum()
            want = min(
                k
                for k in range(1, len(lam) + 1)
                if np.sort(lam)[::-1][:k].sum() >= energy * total * (1 - 1e-12)
            )
            assert dg.energy_dimension(lam, energy) == want


def test_effective_dimension_rejects_bad_input():
    with pytest.raises(ValueError, match="zero variance"):
        dg.effective_dimension(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        dg.effective_dimension(np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        dg.effective_dimension(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="energy"):
        dg.energy_dimension([1.0, 2.0], 0.0)


# ---------------------------------------------------------------------- subspace overlaps
def test_overlap_matches_scipy_principal_angles():
    rng = _rng(4)
    for ka, kb in ((1, 1), (2, 5), (4, 3), (6, 6)):
        a = scipy.linalg.orth(rng.normal(size=(9, ka)))
        b = scipy.linalg.orth(rng.normal(size=(9, kb)))
        want = np.mean(np.cos(scipy.linalg.subspace_angles(a, b)) ** 2)
        assert dg.subspace_overlap(a, b) == pytest.approx(want, abs=1e-12)
    e = np.eye(6)
    assert dg.subspace_overlap(e[:, :2], e[:, 2:4]) == pytest.approx(0.0)
    assert dg.subspace_overlap(e[:, :2], e[:, :5]) == pytest.approx(1.0)  # contained
    assert dg.subspace_overlap(e[:, [0]], (e[:, [0]] + e[:, [1]]) / np.sqrt(2)) == pytest.approx(
        0.5
    )  # 45 degrees


def test_chance_overlap_matches_monte_carlo():
    rng = _rng(5)
    D, ka, kb = 12, 3, 5
    a = np.linalg.qr(rng.normal(size=(4000, D, ka)))[0]  # uniformly random orthonormal bases
    b = np.linalg.qr(rng.normal(size=(4000, D, kb)))[0]
    draws = np.sum((a.transpose(0, 2, 1) @ b) ** 2, axis=(1, 2)) / min(ka, kb)
    assert draws.mean() == pytest.approx(dg.chance_overlap(ka, kb, D), abs=0.01)
    assert dg.subspace_overlap(a[0], b[0]) == pytest.approx(draws[0])


def test_pairwise_overlaps_of_planted_subspaces():
    # task 0 and 1 live in the same 2-D plane, task 2 in an orthogonal 3-D one
    rng = _rng(6)
    e = np.eye(8)
    f0 = rng.normal(size=(200, 2)) * [3, 2] @ e[:2]
    f1 = rng.normal(size=(150, 2)) * [2, 3] @ e[:2] + 5.0 * e[7]  # a shared offset: centred away
    f2 = rng.normal(size=(100, 3)) * [3, 2.5, 2] @ e[2:5]
    res = dg.pairwise_overlaps([f0, f1, f2])
    assert res.dims == [2, 2, 3]
    np.testing.assert_allclose(np.diag(res.overlap), 1.0)
    assert res.overlap[0, 1] == pytest.approx(1.0) and res.overlap[1, 0] == pytest.approx(1.0)
    assert res.overlap[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert res.chance[0, 2] == pytest.approx(3 / 8)
    # the subspace is the span of the top principal directions, checked against numpy's eigh
    w, v = np.linalg.eigh(np.cov(f2, rowvar=False))
    top = v[:, np.argsort(w)[::-1][:3]]
    assert dg.subspace_overlap(dg.principal_subspace(f2, 3), top) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in D"):
        dg.pairwise_overlaps([f0, f0[:, :4]])


# ---------------------------------------------------------------------- gain share
def test_gain_share_formula():
    z, e, m = np.array([0.5, 0.2, 0.9]), np.array([0.9, 0.8, 0.9]), np.array([0.7, 0.35, 0.85])
    g = dg.gain_share(m, z, e)
    np.testing.assert_allclose(g.per_task[:2], [0.5, 0.25])
    assert np.isnan(g.per_task[2])  # no gain to keep
    assert g.average == pytest.approx((m.mean() - z.mean()) / (e.mean() - z.mean()))
    # the paper's numbers: TA 69.1, zero-shot 48.0, experts 90.5 -> about one half
    assert dg.gain_share([0.691], [0.48], [0.905]).average == pytest.approx(0.4965, abs=1e-4)
    with pytest.raises(ValueError, match="equal-length"):
        dg.gain_share([0.1, 0.2], [0.1], [0.3])
