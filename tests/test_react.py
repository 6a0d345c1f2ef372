"""ReACT closed forms checked against independent computations written here.

Independent references: autograd of the scalarised objective built from raw features,
torch.linalg.lstsq of the stacked weighted least-squares system, torch.linalg.pinv, SVDs and
per-task loops written out in the tests.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from correction import react

F64 = torch.float64


def make_tasks(T=3, n=30, D=6, seed=0, dtype=F64, noise=0.5):
    """T tasks of (n, D) merged/expert features with task-specific linear relations."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        nt = n + 3 * t  # different n_t per task
        M = torch.randn(nt, D, generator=g, dtype=F64) * (1 + t)
        R = torch.eye(D, dtype=F64) + 0.5 * torch.randn(D, D, generator=g, dtype=F64)
        E = M @ R.T + noise * torch.randn(nt, D, generator=g, dtype=F64)
        tasks.append((M.to(dtype), E.to(dtype)))
    return tasks


def stats_of(tasks, **kw):
    return [react.task_statistics(M, E, task=f"t{i}", **kw) for i, (M, E) in enumerate(tasks)]


def procrustes_ref(M, E):
    """Omega = U V^T of svd(E^T-layout cross-covariance), rows-are-samples features."""
    U, _, Vh = torch.linalg.svd(E.T.to(F64) @ M.to(F64))
    return U @ Vh


def objective(W, tasks, p, beta, omegas, reduction="mean"):
    """sum_t p_t [ (1/n_t) ||W M_t - E_t||^2 + beta ||W - Omega_t||^2 ] from raw features."""
    total = 0.0
    for (M, E), pt, Om in zip(tasks, p, omegas, strict=True):
        M, E = M.to(F64), E.to(F64)
        fit = ((M @ W.T - E) ** 2).sum()
        if reduction == "mean":
            fit = fit / M.shape[0]
        total = total + pt * (fit + beta * ((W - Om) ** 2).sum())
    return total


def lstsq_ref(tasks, p, beta, omegas):
    """W_p by lstsq of the stacked system: rows sqrt(p_t/n_t) M_t (samples) and sqrt(p_t beta) I."""
    rows, targets = [], []
    D = tasks[0][0].shape[1]
    for (M, E), pt, Om in zip(tasks, p, omegas, strict=True):
        w = math.sqrt(pt / M.shape[0])
        rows.append(w * M.to(F64))
        targets.append(w * E.to(F64))
        rows.append(math.sqrt(pt * beta) * torch.eye(D, dtype=F64))
        targets.append(math.sqrt(pt * beta) * Om.T)
    X = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution  # W^T
    return X.T


P3 = torch.tensor([0.2, 0.3, 0.5], dtype=F64)


# --------------------------------------------------------------------------- closed form


def test_one_hot_preference_returns_task_map_exactly():
    tasks = make_tasks()
    stats = stats_of(tasks)
    for t in range(3):
        e = torch.zeros(3, dtype=F64)
        e[t] = 1.0
        assert torch.equal(react.preference_map(stats, e), react.task_map(stats[t]))


def test_task_map_formula_and_minimiser():
    ((M, E),) = make_tasks(T=1, n=25, D=5)
    beta = 0.3
    s = react.task_statistics(M, E, beta=beta)
    n = M.shape[0]
    G, S = M.T @ M / n, E.T @ M / n
    Om = procrustes_ref(M, E)
    expect = torch.linalg.solve((G + beta * torch.eye(5, dtype=F64)).T, (S + beta * Om).T).T
    torch.testing.assert_close(react.task_map(s), expect, rtol=1e-12, atol=1e-12)
    W = react.task_map(s).clone().requires_grad_(True)
    objective(W, [(M, E)], [1.0], beta, [Om]).backward()
    assert W.grad.abs().max() < 1e-10


def test_gradient_of_scalarised_objective_vanishes_at_preference_map():
    tasks = make_tasks(T=3, n=30, D=6)
    beta = 0.1
    stats = stats_of(tasks, beta=beta)
    omegas = [procrustes_ref(M, E) for M, E in tasks]
    W = react.preference_map(stats, P3).clone().requires_grad_(True)
    objective(W, tasks, P3.tolist(), beta, omegas).backward()
    # scale: the gradient at a perturbed point
    W2 = (W.detach() + 0.1).requires_grad_(True)
    objective(W2, tasks, P3.tolist(), beta, omegas).backward()
    assert W2.grad.abs().max() > 1e-2
    assert W.grad.abs().max() < 1e-10 * W2.grad.abs().max() * 1e3


def test_preference_map_equals_lstsq_of_stacked_weighted_system():
    tasks = make_tasks(T=3, n=30, D=6)
    for beta in (0.01, 0.1, 2.0):
        stats = stats_of(tasks, beta=beta)
        omegas = [procrustes_ref(M, E) for M, E in tasks]
        torch.testing.assert_close(
            react.preference_map(stats, P3),
            lstsq_ref(tasks, P3.tolist(), beta, omegas),
            rtol=1e-9,
            atol=1e-10,
        )


def test_preference_map_is_C_weighted_average_of_task_maps():
    tasks = make_tasks()
    beta = 0.1
    stats = stats_of(tasks, beta=beta)
    D = 6
    Ws = [react.task_map(s) for s in stats]
    Cs = [s.gram + beta * torch.eye(D, dtype=F64) for s in stats]
    num = sum(p * W @ C for p, W, C in zip(P3, Ws, Cs, strict=True))
    den = sum(p * C for p, C in zip(P3, Cs, strict=True))
    expect = torch.linalg.solve(den.T, num.T).T
    Wp = react.preference_map(stats, P3)
    torch.testing.assert_close(Wp, expect, rtol=1e-10, atol=1e-12)
    naive = sum(p * W for p, W in zip(P3, Ws, strict=True))
    assert (Wp - naive).abs().max() > 1e-3  # not the plain average


def test_omega_is_orthogonal_procrustes_solution():
    tasks = make_tasks(T=2, n=30, D=7)
    for s, (M, E) in zip(stats_of(tasks), tasks, strict=True):
        eye = torch.eye(7, dtype=F64)
        torch.testing.assert_close(s.omega @ s.omega.T, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.omega, procrustes_ref(M, E), rtol=0, atol=1e-10)
        # maximiser of tr(Omega^T S): the nuclear norm
        torch.testing.assert_close(
            torch.trace(s.omega.T @ s.cross),
            torch.linalg.matrix_norm(s.cross, "nuc"),
            rtol=1e-12,
            atol=0,
        )


def test_omega_rank_deficient_is_a_maximiser_and_orthogonal():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(3, 8, generator=g, dtype=F64)
    E = torch.randn(3, 8, generator=g, dtype=F64)
    s = react.task_statistics(M, E)
    torch.testing.assert_close(s.omega @ s.omega.T, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.trace(s.omega.T @ s.cross),
        torch.linalg.matrix_norm(s.cross, "nuc"),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("n", [4, 40])  # fewer and more samples than dimensions
def test_identical_features_give_identity(n):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(n, 10, generator=g, dtype=F64)
    s = react.task_statistics(M, M.clone(), beta=0.1)
    eye = torch.eye(10, dtype=F64)
    torch.testing.assert_close(s.omega, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(react.task_map(s), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        react.preference_map([s, s], torch.tensor([0.4, 0.6])), eye, rtol=0, atol=1e-12
    )


# --------------------------------------------------------------------------- beta limits


def test_large_beta_approaches_rotation_average_and_inf_gives_it():
    tasks = make_tasks()
    expect = sum(p * procrustes_ref(M, E) for p, (M, E) in zip(P3, tasks, strict=True))
    big = react.preference_map(stats_of(tasks, beta=1e8), P3)
    torch.testing.assert_close(big, expect, rtol=0, atol=1e-6)
    assert (big - expect).abs().max() > 0  # approaches, not equal
    inf_stats = stats_of(tasks, beta=float("inf"))
    exact = react.preference_map(inf_stats, P3)
    torch.testing.assert_close(exact, expect, rtol=0, atol=1e-14)
    assert torch.equal(react.task_map(inf_stats[1]), inf_stats[1].omega)
    # override on finite-beta statistics gives the same
    torch.testing.assert_close(
        react.preference_map(stats_of(tasks), P3, beta=float("inf")), expect, rtol=0, atol=1e-14
    )


def test_beta_zero_singular_uses_pseudo_inverse_with_warning():
    g = torch.Generator().manual_seed(2)
    D = 8
    tasks = [
        (torch.randn(n, D, generator=g, dtype=F64), torch.randn(n, D, generator=g, dtype=F64))
        for n in (3, 4)
    ]
    stats = stats_of(tasks, beta=0.0)
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        W = react.task_map(stats[0])
    torch.testing.assert_close(
        W, stats[0].cross @ torch.linalg.pinv(stats[0].gram), rtol=1e-8, atol=1e-10
    )
    M, E = tasks[0]
    torch.testing.assert_close(W, (E.T @ M) @ torch.linalg.pinv(M.T @ M), rtol=1e-8, atol=1e-10)
    # preference: (sum p S)(sum p G)^+ (rank 7 < 8: still singular)
    p = torch.tensor([0.25, 0.75], dtype=F64)
    S = 0.25 * stats[0].cross + 0.75 * stats[1].cross
    G = 0.25 * stats[0].gram + 0.75 * stats[1].gram
    with pytest.warns(RuntimeWarning, match="singular"):
        Wp = react.preference_map(stats, p)
    torch.testing.assert_close(Wp, S @ torch.linalg.pinv(G), rtol=1e-8, atol=1e-10)


def test_beta_zero_nonsingular_uses_cholesky_silently():
    tasks = make_tasks(T=2, n=40, D=5)
    stats = stats_of(tasks, beta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W = react.preference_map(stats, torch.tensor([0.5, 0.5]))
    S = 0.5 * (stats[0].cross + stats[1].cross)
    G = 0.5 * (stats[0].gram + stats[1].gram)
    torch.testing.assert_close(W, torch.linalg.solve(G.T, S.T).T, rtol=1e-10, atol=1e-12)


def test_beta_override_equals_recomputed_statistics():
    tasks = make_tasks()
    a = react.preference_map(stats_of(tasks, beta=0.1), P3, beta=0.7)
    b = react.preference_map(stats_of(tasks, beta=0.7), P3)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    st = react.stack_statistics(stats_of(tasks, beta=0.1))
    torch.testing.assert_close(react.preference_map(st, P3, beta=0.7), b, rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------- aggregations


def test_naive_and_polar_aggregations():
    tasks = make_tasks()
    stats = stats_of(tasks)
    naive_ref = sum(p * react.task_map(s) for p, s in zip(P3, stats, strict=True))
    naive = react.preference_map(stats, P3, aggregation="naive")
    torch.testing.assert_close(naive, naive_ref, rtol=1e-13, atol=1e-14)
    polar = react.preference_map(stats, P3, aggregation="polar")
    # polar factor by an independent formula: N (N^T N)^{-1/2}
    evals, evecs = torch.linalg.eigh(naive_ref.T @ naive_ref)
    ref = naive_ref @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    torch.testing.assert_close(polar, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(polar @ polar.T, torch.eye(6, dtype=F64), rtol=0, atol=1e-12)
    # batched aggregation equals single
    Pb = torch.stack([P3, torch.tensor([0.6, 0.2, 0.2], dtype=F64)])
    torch.testing.assert_close(react.preference_map(stats, Pb, aggregation="polar")[0], polar)


def test_closed_form_differs_from_ablations():
    stats = stats_of(make_tasks())
    cf = react.preference_map(stats, P3)
    for agg in ("naive", "polar"):
        assert (cf - react.preference_map(stats, P3, aggregation=agg)).abs().max() > 1e-3


# --------------------------------------------------------------------------- statistics options


def test_streaming_equals_one_shot():
    ((M, E),) = make_tasks(T=1, n=101, D=9, dtype=torch.float32)
    for normalize in (False, True):
        one = react.task_statistics(M, E, beta=0.2, normalize_features=normalize)
        acc = react.StatisticsAccumulator(9, beta=0.2, normalize_features=normalize)
        for s in range(0, 101, 17):
            acc.update(M[s : s + 17], E[s : s + 17])
        st = acc.finalize()
        assert st.n == one.n == 101 and st.dtype == one.dtype == torch.float32
        for what in ("gram", "cross", "omega"):
            torch.testing.assert_close(
                getattr(st, what), getattr(one, what), rtol=1e-13, atol=1e-14
            )
        torch.testing.assert_close(react.task_map(st), react.task_map(one), rtol=1e-12, atol=1e-13)


def test_statistics_values():
    ((M, E),) = make_tasks(T=1, n=12, D=4)
    s = react.task_statistics(M, E)
    torch.testing.assert_close(s.gram, M.T @ M / 12, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(s.cross, E.T @ M / 12, rtol=1e-14, atol=1e-14)
    assert s.n == 12 and s.dim == s.D == 4 and s.beta == 0.1 and s.reduction == "mean"


def test_reduction_sum_vs_mean():
    ((M, E),) = make_tasks(T=1, n=20, D=5)
    n, beta = 20, 0.4
    mean = react.task_statistics(M, E, beta=beta, reduction="mean")
    summ = react.task_statistics(M, E, beta=beta, reduction="sum")
    torch.testing.assert_close(summ.gram, n * mean.gram, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(summ.cross, n * mean.cross, rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(summ.omega, mean.omega, rtol=0, atol=1e-12)
    # (n S + b Om)(n G + b I)^-1 == (S + (b/n) Om)(G + (b/n) I)^-1
    torch.testing.assert_close(
        react.task_map(summ), react.task_map(mean, beta=beta / n), rtol=1e-11, atol=1e-12
    )
    # and it minimises the un-averaged objective
    W = react.task_map(summ).clone().requires_grad_(True)
    objective(W, [(M, E)], [1.0], beta, [mean.omega], reduction="sum").backward()
    assert W.grad.abs().max() < 1e-9


def test_normalize_features_equals_fitting_normalised_rows():
    ((M, E),) = make_tasks(T=1, n=25, D=6)
    a = react.task_statistics(M, E, normalize_features=True)
    b = react.task_statistics(M / M.norm(dim=1, keepdim=True), E / E.norm(dim=1, keepdim=True))
    assert a.normalize_features and not b.normalize_features
    for what in ("gram", "cross", "omega"):
        torch.testing.assert_close(getattr(a, what), getattr(b, what), rtol=1e-13, atol=1e-14)
    assert abs(float(torch.trace(a.gram)) - 1.0) < 1e-12  # unit rows: tr G = mean ||m||^2 = 1


# --------------------------------------------------------------------------- batching, dtype, io


def test_batched_equals_loop_and_chunking():
    stats = stats_of(make_tasks())
    P = torch.distributions.Dirichlet(torch.ones(3)).sample((9,)).to(F64)
    batched = react.preference_map(stats, P)
    loop = torch.stack([react.preference_map(stats, p) for p in P])
    torch.testing.assert_close(batched, loop, rtol=1e-13, atol=1e-14)
    st = react.stack_statistics(stats)
    torch.testing.assert_close(
        react.preference_map(st, P, chunk_size=2), batched, rtol=1e-13, atol=1e-14
    )


def test_float32_solve_close_to_float64():
    stats = stats_of(make_tasks())
    a = react.preference_map(stats, P3, solve_dtype=torch.float32)
    b = react.preference_map(stats, P3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_dtype_follows_features_unless_asked():
    tasks32 = make_tasks(dtype=torch.float32)
    stats = stats_of(tasks32)
    assert all(s.dtype == torch.float32 and s.gram.dtype == F64 for s in stats)
    assert react.preference_map(stats, P3).dtype == torch.float32
    assert react.task_map(stats[0]).dtype == torch.float32
    assert react.preference_map(stats, P3, dtype=F64).dtype == F64
    assert react.task_statistics(*tasks32[0], dtype=F64).dtype == F64
    torch.testing.assert_close(
        react.preference_map(stats, P3), react.preference_map(stats, P3, dtype=F64).float()
    )


def test_apply_values():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 5, 5, generator=g)
    z = torch.randn(7, 5, generator=g)
    out = react.apply(W, z)
    for i in range(3):
        for j in range(7):
            torch.testing.assert_close(out[i, j], W[i] @ z[j])
    torch.testing.assert_close(react.apply(W[1], z), out[1])
    torch.testing.assert_close(react.apply(W, z.expand(3, 7, 5)), out)


def test_save_load_roundtrip_exact(tmp_path):
    stats = stats_of(make_tasks(dtype=torch.float32), beta=0.25, normalize_features=True)
    path = tmp_path / "stats.safetensors"
    react.save_statistics(stats, path, task_names=["a", "b", "c"])
    loaded = react.load_statistics(path)
    assert [s.name for s in loaded] == ["a", "b", "c"]
    for s, back in zip(stats, loaded, strict=True):
        for what in ("gram", "cross", "omega"):
            assert torch.equal(getattr(s, what), getattr(back, what))
        assert (back.n, back.beta, back.reduction, back.normalize_features, back.dtype) == (
            s.n,
            0.25,
            "mean",
            True,
            torch.float32,
        )
    assert torch.equal(react.preference_map(stats, P3), react.preference_map(loaded, P3))
    # inf beta and default names survive
    inf = stats_of(make_tasks(T=1), beta=float("inf"))
    react.save_statistics(inf, path)
    (back,) = react.load_statistics(path)
    assert back.beta == float("inf") and back.name == "t0"


# --------------------------------------------------------------------------- bad input


def test_bad_features_raise():
    M = torch.randn(10, 4)
    with pytest.raises(ValueError, match="samples"):
        react.task_statistics(M, torch.randn(9, 4))
    with pytest.raises(ValueError, match="D=4.*D=5"):
        react.task_statistics(M, torch.randn(10, 5))
    bad = M.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="task 'cars'.*z_merged.*non-finite"):
        react.task_statistics(bad, M, task="cars")
    with pytest.raises(ValueError, match="z_expert.*non-finite"):
        react.task_statistics(M, bad.clone().fill_(float("inf")))
    with pytest.raises(ValueError, match="2-D"):
        react.task_statistics(M[0], M[0])
    with pytest.raises(ValueError, match="no samples"):
        react.task_statistics(M[:0], M[:0])
    with pytest.raises(ValueError, match="beta"):
        react.task_statistics(M, M, beta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        react.task_statistics(M, M, beta=float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        react.task_statistics(M, M, reduction="median")
    acc = react.StatisticsAccumulator(4)
    with pytest.raises(ValueError, match="no samples"):
        acc.finalize()
    with pytest.raises(ValueError, match="dim=4"):
        acc.update(torch.randn(3, 5), torch.randn(3, 5))


def test_bad_preferences_raise():
    stats = stats_of(make_tasks())
    with pytest.raises(ValueError, match="2 entries.*3 tasks"):
        react.preference_map(stats, [0.5, 0.5])
    with pytest.raises(ValueError, match="negative"):
        react.preference_map(stats, [1.2, -0.1, -0.1])
    with pytest.raises(ValueError, match="sum to 1.*normalize=True"):
        react.preference_map(stats, [1.0, 1.0, 1.0])
    torch.testing.assert_close(
        react.preference_map(stats, [1.0, 1.0, 1.0], normalize=True),
        react.preference_map(stats, [1 / 3, 1 / 3, 1 / 3]),
    )
    with pytest.raises(ValueError, match="all weights are zero"):
        react.preference_map(stats, [0.0, 0.0, 0.0], normalize=True)
    with pytest.raises(ValueError, match="NaN"):
        react.preference_map(stats, [float("nan"), 0.5, 0.5])
    with pytest.raises(ValueError, match=r"shape \(T,\) or \(P, T\)"):
        react.preference_map(stats, torch.ones(2, 2, 3) / 3)
    with pytest.raises(ValueError, match="aggregation"):
        react.preference_map(stats, P3, aggregation="mean")
    with pytest.raises(ValueError, match="beta"):
        react.preference_map(stats, P3, beta=-1)
    with pytest.raises(ValueError, match="empty statistics"):
        react.preference_map([], P3)


def test_inconsistent_statistics_raise():
    tasks = make_tasks()
    a = react.task_statistics(*tasks[0], beta=0.1, task="a")
    b = react.task_statistics(*tasks[1], beta=0.2, task="b")
    with pytest.raises(ValueError, match="disagree on beta.*'a'.*'b'"):
        react.preference_map([a, b], [0.5, 0.5])
    c = react.task_statistics(*tasks[1], reduction="sum")
    with pytest.raises(ValueError, match="disagree on reduction"):
        react.stack_statistics([a, c])
    d = react.task_statistics(*tasks[1], normalize_features=True)
    with pytest.raises(ValueError, match="disagree on normalize_features"):
        react.stack_statistics([a, d])
    e = react.task_statistics(torch.randn(10, 5), torch.randn(10, 5))
    with pytest.raises(ValueError, match="D=5"):
        react.stack_statistics([a, e])
    broken = react.task_statistics(*tasks[1], task="broken")
    broken.gram[0, 0] = float("nan")
    with pytest.raises(ValueError, match="task 1 .'broken'.*gram.*non-finite"):
        react.preference_map([a, broken], [0.5, 0.5])
    with pytest.raises(TypeError, match="TaskStatistics"):
        react.stack_statistics([a, "b"])


def test_bad_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        react.load_statistics(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        react.load_statistics(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a ReACT statistics file"):
        react.load_statistics(other)
    stats = stats_of(make_tasks(T=2))
    with pytest.raises(ValueError, match="unique"):
        react.save_statistics(stats, tmp_path / "s.safetensors", task_names=["a", "a"])
    with pytest.raises(ValueError, match="3 task names for 2 tasks"):
        react.save_statistics(stats, tmp_path / "s.safetensors", task_names=["a", "b", "c"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    tasks = make_tasks(dtype=torch.float32)
    cpu = stats_of(tasks)
    gpu = [react.task_statistics(M.cuda(), E.cuda()) for M, E in tasks]
    Wg = react.preference_map(gpu, P3.cuda())
    assert Wg.device.type == "cuda"
    torch.testing.assert_close(Wg.cpu(), react.preference_map(cpu, P3), rtol=1e-5, atol=1e-6)
