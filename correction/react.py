"""ReACT: closed-form, preference-aware linear correction of merged-model features.

Notation (method.md section 1). For task t, ``z_merged`` and ``z_expert`` are (n_t, D)
feature matrices whose rows are samples; M_t = z_merged^T and E_t = z_expert^T are D x n_t.
The per-task objective is

    L_t(W) = (1/n_t) ||W M_t - E_t||_F^2 + beta ||W - Omega_t||_F^2          (reduction="mean")
    L_t(W) =         ||W M_t - E_t||_F^2 + beta ||W - Omega_t||_F^2          (reduction="sum")

with Omega_t = U V^T, U Sigma V^T = svd(E_t M_t^T), the orthogonal Procrustes rotation from
merged to expert features. Its sufficient statistics are

    G_t = M_t M_t^T / n_t,   S_t = E_t M_t^T / n_t     ("sum": without the 1/n_t)

and, writing A_t = S_t + beta Omega_t and C_t = G_t + beta I,

    W_t = A_t C_t^-1                                   (task_map)
    W_p = (sum_t p_t A_t)(sum_t p_t C_t)^-1            (preference_map, closed form)
        = (sum_t p_t W_t C_t)(sum_t p_t C_t)^-1

the unique minimiser of sum_t p_t L_t(W) for beta > 0 (sum_t p_t C_t = sum_t p_t G_t + beta I
since p is on the simplex). W = A C^-1 is computed as the solution of C W^T = A^T with a
Cholesky factorisation of the symmetric positive definite C (never an explicit inverse).

Limits of beta: beta = 0 is plain least squares W = S G^+ (pseudo-inverse, with a warning,
when G is singular, e.g. fewer samples than dimensions); beta = inf is the pure rotation
W_t = Omega_t, W_p = sum_t p_t Omega_t.

Ablation aggregations of the per-task maps: "naive" W_p = sum_t p_t W_t; "polar" the
orthogonal polar factor U V^T of sum_t p_t W_t.

Statistics are accumulated and solved in float64; maps are returned in the dtype asked for
(default: the dtype of the features the statistics were computed from). All functions keep
tensors on the device they were given.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "AGGREGATIONS",
    "REDUCTIONS",
    "StackedStatistics",
    "StatisticsAccumulator",
    "TaskStatistics",
    "apply",
    "load_statistics",
    "preference_map",
    "procrustes",
    "save_statistics",
    "stack_statistics",
    "task_map",
    "task_statistics",
]

AGGREGATIONS = ("closed_form", "naive", "polar")
REDUCTIONS = ("mean", "sum")
P_SUM_ATOL = 1e-5  # tolerance on sum(p) == 1 before the preference is rejected
# Working-memory budget of one chunk of preference_map (bytes), per device type.
CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
_FORMAT = "react-statistics"
_VERSION = 1
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation


def _check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a number >= 0 (or float('inf')), got {beta!r}") from None
    if math.isnan(b) or b < 0:
        raise ValueError(f"beta must be >= 0 (0: least squares, inf: pure rotation), got {beta!r}")
    return b


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    return reduction


def _check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; use one of {AGGREGATIONS}")
    return aggregation


def _label(task) -> str:
    if task is None:
        return ""
    if isinstance(task, int):
        return f"task {task}: "
    return f"task {task!r}: "


def _check_features(z: torch.Tensor, what: str, task) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{_label(task)}{what} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(
            f"{_label(task)}{what} must be 2-D (n samples, D features), got shape {tuple(z.shape)}"
        )
    if not z.is_floating_point():
        raise ValueError(f"{_label(task)}{what} must be a floating tensor, got {z.dtype}")
    bad = int((~torch.isfinite(z)).sum())
    if bad:
        raise ValueError(
            f"{_label(task)}{what} contains {bad} non-finite value(s) (NaN or inf); "
            "check the feature extraction for this task"
        )


def _check_pair(z_merged: torch.Tensor, z_expert: torch.Tensor, task) -> None:
    for z, what in ((z_merged, "z_merged"), (z_expert, "z_expert")):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{_label(task)}{what} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(
                f"{_label(task)}{what} must be 2-D (n samples, D features), got shape {tuple(z.shape)}"
            )
    if z_merged.shape[0] != z_expert.shape[0]:
        raise ValueError(
            f"{_label(task)}z_merged has {z_merged.shape[0]} samples but z_expert has "
            f"{z_expert.shape[0]}; rows must be the same images in the same order"
        )
    if z_merged.shape[1] != z_expert.shape[1]:
        raise ValueError(
            f"{_label(task)}z_merged has D={z_merged.shape[1]} features but z_expert has "
            f"D={z_expert.shape[1]}; both must be embeddings of the same dimension"
        )
    _check_features(z_merged, "z_merged", task)
    _check_features(z_expert, "z_expert", task)


# --------------------------------------------------------------------------- statistics


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes rotation Omega = U V^T for U Sigma V^T = svd(cross).

    ``cross`` is S = E M^T (up to a positive scale, which does not change Omega); Omega
    maximises tr(Omega^T S) over orthogonal matrices, i.e. minimises ||Omega M - E||_F.

    When S is rank-deficient (a task with fewer calibration images than D dimensions, say)
    the maximiser is not unique: the singular vectors of the zero singular values are
    arbitrary. We take, among all maximisers, the one closest to the identity: on the null
    spaces, Omega = U0 Q V0^T with Q = polar(U0^T V0). This is still U V^T for a valid SVD of
    S, is basis independent, and gives Omega = I when merged and expert features coincide.
    The choice matters in practice: on the first offline suite (a 4-image calibration task)
    it moved ReACT's equal-preference accuracy by 0.2 points against a plain SVD's choice.
    """
    U, sv, Vh = torch.linalg.svd(cross)
    D = cross.shape[-1]
    tol = sv[0] * D * torch.finfo(cross.dtype).eps if D else 0.0
    r = int((sv > tol).sum()) if D else 0
    omega = U[:, :r] @ Vh[:r]
    if r < D:
        U0, V0 = U[:, r:], Vh[r:].mT
        Uq, _, Vqh = torch.linalg.svd(U0.mT @ V0)
        omega = omega + U0 @ (Uq @ Vqh) @ V0.mT
    return omega


@dataclass
class TaskStatistics:
    """Sufficient statistics of one task (all (D, D) tensors are float64).

    gram:  G = M M^T / n (reduction "mean") or M M^T ("sum"); symmetric
    cross: S = E M^T / n or E M^T
    omega: the Procrustes rotation of ``cross`` (see :func:`procrustes`)
    n: number of calibration samples; beta, reduction, normalize_features: the fitting
    options; dtype: the dtype maps are returned in by default; name: optional task name.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    omega: torch.Tensor
    n: int
    beta: float = 0.1
    reduction: str = "mean"
    normalize_features: bool = False
    dtype: torch.dtype = torch.float32
    name: str | None = None

    def __post_init__(self):
        lab = _label(self.name)
        for what in ("gram", "cross", "omega"):
            t = getattr(self, what)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != t.shape[1]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{lab}{what} must be a square (D, D) tensor, got {shape}")
            if t.dtype != torch.float64:
                raise ValueError(f"{lab}{what} must be float64, got {t.dtype}")
        if not (self.gram.shape == self.cross.shape == self.omega.shape):
            raise ValueError(
                f"{lab}gram, cross and omega shapes differ: {tuple(self.gram.shape)}, "
                f"{tuple(self.cross.shape)}, {tuple(self.omega.shape)}"
            )
        if int(self.n) < 1:
            raise ValueError(f"{lab}n must be >= 1 sample, got {self.n}")
        self.n = int(self.n)
        self.beta = _check_beta(self.beta)
        _check_reduction(self.reduction)
        self.normalize_features = bool(self.normalize_features)
        if self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{lab}dtype must be a floating dtype, got {self.dtype}")

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    D = dim

    @property
    def device(self) -> torch.device:
        return self.gram.device


class StatisticsAccumulator:
    """Streaming form of :func:`task_statistics`: O(D^2) memory, no features kept.

    >>> acc = StatisticsAccumulator(512, beta=0.1)
    >>> for z_m, z_e in batches: acc.update(z_m, z_e)
    >>> stats = acc.finalize()

    Sums M M^T and E M^T in float64 on ``device`` (default: the first batch's device);
    ``finalize`` divides by n for reduction "mean" and computes Omega from the accumulated
    cross-covariance. Batches are moved to the accumulator's device.
    """

    def __init__(
        self,
        dim: int,
        *,
        beta: float = 0.1,
        reduction: str = "mean",
        normalize_features: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        task: str | int | None = None,
    ):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.beta = _check_beta(beta)
        self.reduction = _check_reduction(reduction)
        self.normalize_features = bool(normalize_features)
        self.task = task
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self._gram: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None
        if self.device is not None:
            self._allocate()

    def _allocate(self) -> None:
        self._gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self._cross = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def update(self, z_merged: torch.Tensor, z_expert: torch.Tensor) -> None:
        """Add a batch of (b, D) merged and expert features (same images, same order)."""
        _check_pair(z_merged, z_expert, self.task)
        if z_merged.shape[1] != self.dim:
            raise ValueError(
                f"{_label(self.task)}features have D={z_merged.shape[1]} but the accumulator "
                f"was built for dim={self.dim}"
            )
        if self.device is None:
            self.device = z_merged.device
            self._allocate()
        if self.dtype is None:
            self.dtype = z_merged.dtype
        m = z_merged.to(device=self.device, dtype=torch.float64)
        e = z_expert.to(device=self.device, dtype=torch.float64)
        if self.normalize_features:
            m = torch.nn.functional.normalize(m, dim=1)
            e = torch.nn.functional.normalize(e, dim=1)
        self._gram.addmm_(m.mT, m)
        self._cross.addmm_(e.mT, m)
        self.n += m.shape[0]

    def finalize(self) -> TaskStatistics:
        """The statistics of every batch seen so far (the accumulator stays usable)."""
        if self.n == 0:
            raise ValueError(f"{_label(self.task)}no samples were accumulated; call update() first")
        scale = 1.0 / self.n if self.reduction == "mean" else 1.0
        gram = (self._gram + self._gram.mT) * (0.5 * scale)
        cross = self._cross * scale
        return TaskStatistics(
            gram=gram,
            cross=cross,
            omega=procrustes(cross),
            n=self.n,
            beta=self.beta,
            reduction=self.reduction,
            normalize_features=self.normalize_features,
            dtype=self.dtype,
            name=self.task if isinstance(self.task, str) else None,
        )


def task_statistics(
    z_merged: torch.Tensor,
    z_expert: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    normalize_features: bool = False,
    task: str | int | None = None,
    dtype: torch.dtype | None = None,
) -> TaskStatistics:
    """Statistics (G, S, Omega) of one task from (n, D) merged and expert features.

    Rows are samples. ``task`` names the task in error messages (and is stored when a
    string). ``dtype`` is the default dtype of maps built from these statistics (default:
    the features' dtype). Computed in float64 on the features' device.
    """
    _check_pair(z_merged, z_expert, task)
    if z_merged.shape[0] < 1:
        raise ValueError(f"{_label(task)}no samples: z_merged and z_expert have 0 rows")
    acc = StatisticsAccumulator(
        z_merged.shape[1],
        beta=beta,
        reduction=reduction,
        normalize_features=normalize_features,
        device=z_merged.device,
        dtype=dtype if dtype is not None else z_merged.dtype,
        task=task,
    )
    acc.update(z_merged, z_expert)
    return acc.finalize()


@dataclass
class StackedStatistics:
    """T tasks' statistics stacked as (T, D, D) float64 tensors, for fast preference sweeps.

    ``numerator`` holds A_t = S_t + beta Omega_t and ``system`` C_t = G_t + beta I, each
    contiguous, so that combining P preferences is one (P, T) x (T, D^2) product per matrix.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    omega: torch.Tensor
    n: tuple[int, ...]
    beta: float
    reduction: str
    normalize_features: bool
    dtype: torch.dtype
    names: tuple[str | None, ...]
    numerator: torch.Tensor = field(repr=False)
    system: torch.Tensor = field(repr=False)
    _task_maps: dict = field(default_factory=dict, repr=False)

    @property
    def num_tasks(self) -> int:
        return self.gram.shape[0]

    @property
    def dim(self) -> int:
        return self.gram.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def label(self, t: int) -> str:
        return repr(self.names[t]) if self.names[t] is not None else str(t)

    def terms(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_t, C_t) for ``beta`` as two (T, D, D) tensors (cached for the stored beta)."""
        if beta == self.beta:
            return self.numerator, self.system
        return _build_terms(self.gram, self.cross, self.omega, beta)

    def task_maps(self, beta: float, solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """W_t for every task as (T, D, D) float64 (cached per beta)."""
        key = (beta, solve_dtype)
        if key not in self._task_maps:
            if math.isinf(beta):
                maps = self.omega
            else:
                A, C = self.terms(beta)
                maps = _solve_right(
                    A,
                    C,
                    beta=beta,
                    solve_dtype=solve_dtype,
                    what=lambda i: f"task {self.label(i)}",
                ).to(torch.float64)
            self._task_maps[key] = maps
        return self._task_maps[key]


def _build_terms(gram, cross, omega, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = S + beta Omega and C = G + beta I (beta=inf: Omega and I, unused by the solver)."""
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    if math.isinf(beta):
        return omega.clone(), eye.expand_as(gram).clone()
    return cross + beta * omega, gram + beta * eye


def stack_statistics(stats: Sequence[TaskStatistics]) -> StackedStatistics:
    """Stack a list of task statistics (validated: same D, options, device; finite values)."""
    if isinstance(stats, StackedStatistics):
        return stats
    if isinstance(stats, TaskStatistics):
        stats = [stats]
    stats = list(stats)
    if not stats:
        raise ValueError("empty statistics list: give one TaskStatistics per task")
    for i, s in enumerate(stats):
        if not isinstance(s, TaskStatistics):
            raise TypeError(f"statistics[{i}] is a {type(s).__name__}, not a TaskStatistics")

    def lab(i):
        return f"task {i}" + (f" ({stats[i].name!r})" if stats[i].name else "")

    first = stats[0]
    for i, s in enumerate(stats[1:], start=1):
        if s.dim != first.dim:
            raise ValueError(f"{lab(i)} has D={s.dim} but {lab(0)} has D={first.dim}")
        for opt in ("beta", "reduction", "normalize_features"):
            if getattr(s, opt) != getattr(first, opt):
                raise ValueError(
                    f"statistics disagree on {opt}: {lab(0)} has {getattr(first, opt)!r}, "
                    f"{lab(i)} has {getattr(s, opt)!r}; recompute them with the same options"
                )
        if s.device != first.device:
            raise ValueError(f"{lab(i)} is on {s.device} but {lab(0)} is on {first.device}")
    for i, s in enumerate(stats):
        for what in ("gram", "cross", "omega"):
            if not bool(torch.isfinite(getattr(s, what)).all()):
                raise ValueError(f"{lab(i)}: {what} contains non-finite values (NaN or inf)")
    gram = torch.stack([s.gram for s in stats])
    gram = 0.5 * (gram + gram.mT)  # exactly symmetric: the solver reads one triangle
    cross = torch.stack([s.cross for s in stats])
    omega = torch.stack([s.omega for s in stats])
    dtype = first.dtype
    for s in stats[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    numerator, system = _build_terms(gram, cross, omega, first.beta)
    return StackedStatistics(
        gram=gram,
        cross=cross,
        omega=omega,
        n=tuple(s.n for s in stats),
        beta=first.beta,
        reduction=first.reduction,
        normalize_features=first.normalize_features,
        dtype=dtype,
        names=tuple(s.name for s in stats),
        numerator=numerator,
        system=system,
    )


# --------------------------------------------------------------------------- solving


def _solve_right(
    A: torch.Tensor,
    C: torch.Tensor,
    *,
    beta: float,
    solve_dtype: torch.dtype = torch.float64,
    what=lambda i: f"preference {i}",
) -> torch.Tensor:
    """W = A C^-1 for contiguous (B, D, D) A and exactly symmetric PSD C, in solve_dtype.

    Solves C W^T = A^T with a batched Cholesky factorisation; C is passed transposed (equal,
    since symmetric) so LAPACK's column-major layout needs no extra copy, and A^T is A's
    column-major view. Matrices whose Cholesky fails, or (beta == 0) whose pivots show
    numerical singularity, fall back to the pseudo-inverse A C^+ in float64 with a warning.
    Returns a row-major (B, D, D) tensor (float64 where a fallback was used).
    """
    D = C.shape[-1]
    Cs = C if C.dtype == solve_dtype else C.to(solve_dtype)
    As = A if A.dtype == solve_dtype else A.to(solve_dtype)
    L, info = torch.linalg.cholesky_ex(Cs.mT)
    W = torch.cholesky_solve(As.mT, L).mT  # column-major X = C^-1 A^T, so X^T is row-major
    bad = info != 0
    if beta == 0:
        piv = L.diagonal(dim1=-2, dim2=-1).square()
        tol = 1e3 * D * torch.finfo(solve_dtype).eps
        bad |= piv.amin(-1) <= tol * piv.amax(-1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        W = W.to(torch.float64) if W.dtype != torch.float64 else W
        Cb = C[idx].to(torch.float64)
        W[idx] = A[idx].to(torch.float64) @ torch.linalg.pinv(Cb, hermitian=True)
        names = ", ".join(what(int(i)) for i in idx[:5].tolist())
        more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
        reason = (
            "beta=0 and the Gram matrix is singular (or numerically so; fewer calibration "
            "samples than dimensions?)"
            if beta == 0
            else f"the Cholesky factorisation failed although beta={beta} > 0 (are the "
            "statistics corrupted?)"
        )
        warnings.warn(
            f"{reason} for {names}{more}: using the pseudo-inverse, i.e. the minimum-norm "
            "least-squares map S G^+",
            RuntimeWarning,
            stacklevel=3,
        )
    return W


def task_map(
    stats: TaskStatistics,
    *,
    beta: float | None = None,
    dtype: torch.dtype | None = None,
    solve_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """W_t = (S_t + beta Omega_t)(G_t + beta I)^-1 as a (D, D) tensor.

    beta=0: S_t G_t^+ (pseudo-inverse and a warning when G_t is singular); beta=inf: Omega_t.
    ``beta`` overrides the statistics' own; ``dtype`` defaults to ``stats.dtype``.
    """
    if not isinstance(stats, TaskStatistics):
        raise TypeError(f"task_map takes one TaskStatistics, got {type(stats).__name__}")
    b = stats.beta if beta is None else _check_beta(beta)
    out = dtype or stats.dtype
    if math.isinf(b):
        return stats.omega.to(out)
    gram = 0.5 * (stats.gram + stats.gram.mT)
    A, C = _build_terms(gram[None], stats.cross[None], stats.omega[None], b)
    name = stats.name
    W = _solve_right(
        A,
        C,
        beta=b,
        solve_dtype=solve_dtype,
        what=lambda i: f"task {name!r}" if name else "the task",
    )
    return W[0].to(out)


def _check_preferences(p, T: int, normalize: bool, device) -> tuple[torch.Tensor, bool]:
    """p as a float64 (P, T) tensor on ``device``, and whether p was a single vector."""
    try:
        pt = torch.as_tensor(p, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"preference p must be a (T,) or (P, T) array of numbers: {e}") from None
    single = pt.dim() == 1
    if pt.dim() not in (1, 2):
        raise ValueError(f"preference p must have shape (T,) or (P, T), got {tuple(pt.shape)}")
    if single:
        pt = pt[None]
    if pt.shape[-1] != T:
        raise ValueError(
            f"preference p has {pt.shape[-1]} entries per preference but there are {T} tasks "
            "(one weight per task, in the order of the statistics)"
        )
    if pt.shape[0] == 0:
        raise ValueError("no preferences given: p has shape (0, T)")
    if torch.isnan(pt).any():
        rows = torch.isnan(pt).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"preference p contains NaN (rows {rows})")
    if torch.isinf(pt).any():
        raise ValueError("preference p contains inf; weights must be finite")
    if (pt < 0).any():
        rows = (pt < 0).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"preference p has negative weights (rows {rows}); p must lie on the simplex"
        )
    sums = pt.sum(-1)
    if normalize:
        if (sums <= 0).any():
            rows = (sums <= 0).nonzero().flatten()[:5].tolist()
            raise ValueError(f"cannot normalise preference rows {rows}: all weights are zero")
    else:
        off = (sums - 1).abs() > P_SUM_ATOL
        if off.any():
            rows = off.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"preference weights must sum to 1 (rows {rows} sum to "
                f"{[round(float(sums[r]), 6) for r in rows]}); pass normalize=True to rescale"
            )
    pt = pt / sums[:, None]
    return pt.to(device), single


def _polar(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X)
    return U @ Vh


def _chunk_size(D: int, device: torch.device) -> int:
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    return max(1, budget // (8 * 6 * D * D))


def preference_map(
    stats: Sequence[TaskStatistics] | StackedStatistics,
    p,
    *,
    aggregation: str = "closed_form",
    beta: float | None = None,
    normalize: bool = False,
    dtype: torch.dtype | None = None,
    solve_dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The correction map W_p for a preference p (T,) -> (D, D), or for P at once (P, T) -> (P, D, D).

    closed_form: W_p = (sum_t p_t (S_t + beta Omega_t)) (sum_t p_t (G_t + beta I))^-1,
    the minimiser of sum_t p_t L_t(W); naive: sum_t p_t W_t; polar: U V^T of svd(sum_t p_t W_t).
    beta=inf: sum_t p_t Omega_t (polar: its polar factor); beta=0: least squares, with a
    pseudo-inverse (and a warning) where sum_t p_t G_t is singular.

    ``stats``: a list of TaskStatistics or :func:`stack_statistics` output (faster for
    repeated calls). ``p`` rows must be on the simplex (``normalize=True`` rescales them).
    ``beta`` overrides the statistics' beta. Batched: the P preferences are combined with one
    matrix product and solved with one batched Cholesky per chunk of ``chunk_size``
    preferences (default: sized to a fixed working-memory budget). ``solve_dtype`` float32
    trades accuracy for speed; the default float64 is recommended.
    """
    # validate everything cheap before stacking or solving
    _check_aggregation(aggregation)
    if beta is not None:
        _check_beta(beta)
    if solve_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(stats, StackedStatistics):
        T, device = stats.num_tasks, stats.device
    else:
        stats = [stats] if isinstance(stats, TaskStatistics) else list(stats)
        if not stats:
            raise ValueError("empty statistics list: give one TaskStatistics per task")
        T = len(stats)
        device = stats[0].device if isinstance(stats[0], TaskStatistics) else "cpu"
    P, single = _check_preferences(p, T, normalize, device)
    st = stack_statistics(stats)
    b = st.beta if beta is None else _check_beta(beta)
    out_dtype = dtype or st.dtype
    D = st.dim

    if aggregation != "closed_form" or math.isinf(b):
        maps = st.omega if math.isinf(b) else st.task_maps(b, solve_dtype)
        W = (P @ maps.reshape(T, D * D).to(torch.float64)).reshape(-1, D, D)
        if aggregation == "polar":
            W = _polar(W)
        W = W.to(out_dtype)
        return W[0] if single else W

    numerator, system = (x.reshape(T, D * D) for x in st.terms(b))
    n_pref = P.shape[0]
    chunk = min(n_pref, int(chunk_size) if chunk_size is not None else _chunk_size(D, st.device))
    out = torch.empty(n_pref, D, D, dtype=out_dtype, device=st.device)
    # workspaces reused by every chunk: A_p = sum_t p_t A_t and C_p = sum_t p_t C_t
    A_buf = torch.empty(chunk, D * D, dtype=torch.float64, device=st.device)
    C_buf = torch.empty(chunk, D * D, dtype=torch.float64, device=st.device)
    for s in range(0, n_pref, chunk):
        p = P[s : s + chunk]
        k = p.shape[0]
        A, C = torch.mm(p, numerator, out=A_buf[:k]), torch.mm(p, system, out=C_buf[:k])
        out[s : s + k] = _solve_right(
            A.view(k, D, D),
            C.view(k, D, D),
            beta=b,
            solve_dtype=solve_dtype,
            what=lambda i, s=s: f"preference {s + i}",
        )
    return out[0] if single else out


def apply(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Corrected features z W^T (rows are samples).

    W (D, D), z (n, D) -> (n, D); W (P, D, D), z (n, D) -> (P, n, D); W (P, D, D) with
    z (P, n, D) -> (P, n, D). The result has z's dtype (W is cast to it). No normalisation:
    if the statistics were fitted with normalize_features=True, L2-normalise z first.
    """
    if not isinstance(W, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise TypeError("apply takes tensors W and z")
    if W.dim() not in (2, 3) or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"W must be (D, D) or (P, D, D), got shape {tuple(W.shape)}")
    if z.dim() < 1 or z.shape[-1] != W.shape[-1]:
        raise ValueError(
            f"features have D={z.shape[-1] if z.dim() else None} but W is {W.shape[-1]} x {W.shape[-1]}"
        )
    if W.dim() == 3 and z.dim() == 3 and z.shape[0] != W.shape[0]:
        raise ValueError(
            f"batched z has {z.shape[0]} maps' worth of rows but W has {W.shape[0]} maps"
        )
    return torch.matmul(z, W.to(z.dtype).mT)


# --------------------------------------------------------------------------- save / load


def save_statistics(
    stats: Sequence[TaskStatistics] | TaskStatistics,
    path: str | os.PathLike,
    task_names: Sequence[str] | None = None,
) -> None:
    """Write statistics (and options, names, n) to a safetensors file, atomically.

    ``task_names`` (default: the statistics' own names) are stored and returned by
    :func:`load_statistics`, so that new preferences can be answered from this file alone.
    """
    from safetensors.torch import save_file

    st = stack_statistics(stats)
    T = st.num_tasks
    names = list(task_names) if task_names is not None else list(st.names)
    if len(names) != T:
        raise ValueError(f"{len(names)} task names for {T} tasks")
    if any(n is not None and not isinstance(n, str) for n in names):
        raise ValueError(f"task names must be strings, got {names}")
    given = [n for n in names if n is not None]
    if len(set(given)) != len(given):
        raise ValueError(f"task names must be unique, got {names}")
    tensors = {}
    for t in range(T):
        tensors[f"gram.{t}"] = st.gram[t].detach().cpu().contiguous()
        tensors[f"cross.{t}"] = st.cross[t].detach().cpu().contiguous()
        tensors[f"omega.{t}"] = st.omega[t].detach().cpu().contiguous()
    meta = {
        "format": _FORMAT,
        "version": str(_VERSION),
        "beta": repr(st.beta),
        "reduction": st.reduction,
        "normalize_features": json.dumps(st.normalize_features),
        "dtype": str(st.dtype).removeprefix("torch."),
        "tasks": json.dumps([{"name": names[t], "n": st.n[t]} for t in range(T)]),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_statistics(
    path: str | os.PathLike, *, device: torch.device | str | None = None
) -> list[TaskStatistics]:
    """Read a file written by :func:`save_statistics`: one TaskStatistics per task (named)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for unreadable headers
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        with handle as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a ReACT statistics file (metadata format={meta.get('format')!r})"
                )
            if int(meta.get("version", -1)) != _VERSION:
                raise ValueError(f"{path}: unsupported statistics version {meta.get('version')!r}")
            tasks = json.loads(meta["tasks"])
            dtype = getattr(torch, meta["dtype"], None)
            if dtype not in _FLOAT_DTYPES:
                raise ValueError(f"{path}: bad dtype {meta['dtype']!r} in metadata")
            opts = dict(
                beta=float(meta["beta"]),
                reduction=meta["reduction"],
                normalize_features=json.loads(meta["normalize_features"]),
                dtype=dtype,
            )
            out = []
            for t, task in enumerate(tasks):
                need = [f"{k}.{t}" for k in ("gram", "cross", "omega")]
                missing = [k for k in need if k not in keys]
                if missing:
                    raise ValueError(f"{path}: tensors {missing} are missing")
                g, c, o = (f.get_tensor(k) for k in need)
                if device is not None:
                    g, c, o = (x.to(device) for x in (g, c, o))
                out.append(
                    TaskStatistics(
                        gram=g, cross=c, omega=o, n=int(task["n"]), name=task["name"], **opts
                    )
                )
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: malformed statistics metadata ({e!r})") from None
    if not out:
        raise ValueError(f"{path} holds no tasks")
    return out
