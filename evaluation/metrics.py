"""Evaluation metrics: accuracy, normalised accuracy, hypervolume, uniformity, alignment.

Every function takes numpy arrays or torch tensors and returns plain Python floats (or a
small result object that converts with ``float()``). Conventions (method.md section 5):

- accuracies are fractions in [0, 1];
- normalised accuracy of task t is ``acc_t / acc_t(expert t)``;
- a *front* is a (P, T) array of normalised accuracies, one row per preference, to be
  MAXIMISED; the hypervolume's reference point is the origin unless given. Tables
  report ``100 * hypervolume(...).value``; this module never multiplies by 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import moocore
import numpy as np

__all__ = [
    "HypervolumeResult",
    "MeanMetric",
    "accuracy",
    "hypervolume",
    "normalized_accuracy",
    "preference_alignment",
    "uniformity",
]

APPROX_METHODS = ("Rphi-FWE+", "DZ2019-MC", "DZ2019-HW")


# ----------------------------------------------------------------------------- helpers
def _as_float_array(x, what: str) -> np.ndarray:
    """numpy / torch / nested lists -> float64 numpy array (torch is detached, moved to CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} must be numeric (numpy array, torch tensor or list), got {type(x).__name__}: {e}"
        ) from None
    return arr


def _as_matrix(x, what: str) -> np.ndarray:
    arr = _as_float_array(x, what)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be a (P, T) array (one row per preference), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); need at least one row and one task")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"{what} has a non-finite value {arr[r, c]} at row {r}, column {c}")
    return arr


def _check_pair(preferences, values, what: str) -> tuple[np.ndarray, np.ndarray]:
    p = _as_matrix(preferences, "preferences")
    v = _as_matrix(values, what)
    if p.shape != v.shape:
        raise ValueError(
            f"preferences has shape {p.shape} but {what} has shape {v.shape}; "
            "they must match (one row per preference, one column per task)"
        )
    neg = np.argwhere(p < 0)
    if len(neg):
        r, c = neg[0]
        raise ValueError(f"preferences row {r} has a negative weight {p[r, c]} for task {c}")
    zero = np.flatnonzero(p.sum(axis=1) <= 0)
    if len(zero):
        raise ValueError(
            f"preferences row {zero[0]} sums to 0; every preference needs a positive weight"
        )
    return p, v


@dataclass(frozen=True)
class MeanMetric:
    """A mean over preferences, with how many preferences entered it.

    ``value`` is NaN when no preference had a defined value (``n_used == 0``).
    ``float(result)`` gives ``value``.
    """

    value: float
    n_used: int
    n_excluded: int
    per_preference: tuple[float, ...]  # NaN where excluded
    note: str

    def __float__(self) -> float:
        return float(self.value)


# ----------------------------------------------------------------------------- accuracy
def accuracy(logits, labels) -> float:
    """Top-1 accuracy, a fraction in [0, 1]:  mean_i [argmax_c logits[i, c] == labels[i]].

    ``logits``: (N, C); ``labels``: (N,) integer class ids in [0, C). Ties in argmax go to
    the lowest class index (numpy's argmax). Example: logits [[2, 1], [0, 3], [5, 4]],
    labels [0, 0, 0] -> 2/3.
    """
    lg = _as_float_array(logits, "logits")
    if hasattr(labels, "detach") and hasattr(labels, "cpu"):
        labels = labels.detach().cpu().numpy()
    lb = np.asarray(labels)
    if lg.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {lg.shape}")
    if lb.ndim != 1 or lb.shape[0] != lg.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {lg.shape[0]} (rows of logits), got shape {lb.shape}"
        )
    if lg.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined (N = 0)")
    if not np.issubdtype(lb.dtype, np.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {lb.dtype}")
    if lb.min() < 0 or lb.max() >= lg.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {lg.shape[1]}) (C = columns of logits); got range [{lb.min()}, {lb.max()}]"
        )
    if np.isnan(lg).any():
        raise ValueError("logits contain NaN")
    return float(np.mean(lg.argmax(axis=1) == lb))


def normalized_accuracy(acc, expert_acc):
    """Normalised accuracy  acc / expert_acc, elementwise (numpy broadcasting).

    Example: acc [0.6, 0.9], expert [0.8, 0.9] -> [0.75, 1.0]. Returns a float for scalar
    inputs, else a float64 array. Values above 1 (better than the expert) are kept.
    Raises ValueError if any expert accuracy is <= 0 or non-finite, or acc is non-finite.
    """
    a = _as_float_array(acc, "acc")
    e = _as_float_array(expert_acc, "expert_acc")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"acc contains non-finite values: {a}")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ValueError(f"expert accuracies must be finite and > 0 to normalise by them, got {e}")
    try:
        out = a / e
    except ValueError as err:
        raise ValueError(
            f"acc shape {a.shape} and expert_acc shape {e.shape} do not broadcast: {err}"
        ) from None
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- hypervolume
@dataclass(frozen=True)
class HypervolumeResult:
    """Hypervolume of a point set (raw value; tables multiply by 100).

    value: the hypervolume; exact: False when it is an approximation; method: how it was
    computed (e.g. "moocore.hypervolume exact" or
    "moocore.hv_approx Rphi-FWE+ (1048576 samples, deterministic)"); n_points: rows given;
    n_front: rows that contribute (strictly above the reference and non-dominated);
    dim: number of objectives.
    """

    value: float
    exact: bool
    method: str
    n_points: int
    dim: int
    n_front: int

    def __float__(self) -> float:
        return float(self.value)


def hypervolume(
    points,
    reference=None,
    *,
    exact_max_points: int = 200,
    approx_samples: int = 2**20,
    seed: int = 0,
    approx_method: str = "Rphi-FWE+",
) -> HypervolumeResult:
    """Hypervolume of ``points`` (P, T), all objectives MAXIMISED, w.r.t. ``reference``.

        HV(A) = Lebesgue measure of  U_{a in A} [r_1, a_1] x ... x [r_T, a_T]

    (``r`` = ``reference``, the origin by default). Points that are not strictly greater than
    ``r`` in every coordinate, and dominated points, add nothing and are dropped first.
    Examples: {(1, 0.5), (0.5, 1)} with r = 0 -> 1*0.5 + 0.5*1 - 0.5*0.5 = 0.75;
    {(1, 1, 1)} -> 1.

    Exact (``moocore.hypervolume``) when the contributing front has at most
    ``exact_max_points`` points or T <= 4 (polynomial algorithms up to 4-D: O(n log n) in
    2-D/3-D, O(n^2) in 4-D). Otherwise ``moocore.hv_approx`` with ``approx_samples``
    directions: the default ``approx_method="Rphi-FWE+"`` is a deterministic
    quasi-Monte-Carlo rule (``seed`` is unused); ``"DZ2019-MC"`` is plain Monte-Carlo
    seeded with ``seed``. The result's ``exact`` and ``method`` fields say which was used.
    Measured in 8-D (2-core CPU, bench/results_evaluation.md): exact about 0.3-0.8 s /
    8-20 s / 67 s for 100 / 200 / 300 points; Rphi-FWE+ with 2^20 samples under ~1 s,
    relative error ~1e-4.
    """
    pts = _as_matrix(points, "points")
    n, dim = pts.shape
    if reference is None:
        ref = np.zeros(dim)
    else:
        ref = _as_float_array(reference, "reference")
        if ref.ndim == 0:
            ref = np.full(dim, float(ref))
        if ref.shape != (dim,):
            raise ValueError(
                f"reference must have one entry per objective ({dim}), got shape {ref.shape}"
            )
        if not np.all(np.isfinite(ref)):
            raise ValueError(f"reference contains non-finite values: {ref}")
    if not isinstance(exact_max_points, int) or exact_max_points < 0:
        raise ValueError(f"exact_max_points must be a non-negative int, got {exact_max_points!r}")
    if not isinstance(approx_samples, int) or approx_samples < 1:
        raise ValueError(f"approx_samples must be a positive int, got {approx_samples!r}")
    if approx_method not in APPROX_METHODS:
        raise ValueError(f"approx_method must be one of {APPROX_METHODS}, got {approx_method!r}")

    above = pts[np.all(pts > ref, axis=1)]
    if len(above) == 0:
        return HypervolumeResult(0.0, True, "no point strictly above the reference", n, dim, 0)
    front = above[moocore.is_nondominated(above, maximise=True, keep_weakly=False)]
    n_front = len(front)
    if dim == 1:
        return HypervolumeResult(
            float(front.max() - ref[0]), True, "1-D: max(point) - reference", n, dim, n_front
        )
    if dim <= 4 or n_front <= exact_max_points:
        value = moocore.hypervolume(front, ref=ref, maximise=True)
        return HypervolumeResult(float(value), True, "moocore.hypervolume exact", n, dim, n_front)
    value = moocore.hv_approx(
        front, ref=ref, maximise=True, nsamples=approx_samples, seed=seed, method=approx_method
    )
    how = "deterministic" if approx_method != "DZ2019-MC" else f"seed {seed}"
    kind = "Monte-Carlo" if approx_method == "DZ2019-MC" else "quasi-Monte-Carlo"
    method = f"moocore.hv_approx {approx_method} {kind} approx ({approx_samples} samples, {how})"
    return HypervolumeResult(float(value), False, method, n, dim, n_front)


# ----------------------------------------------------------------------------- uniformity
def uniformity(preferences, normalized_accuracy, *, min_loss: float = 0.0) -> MeanMetric:
    """PHN-style uniformity (method.md 5a), averaged over preferences.

    For preference r (a row; only its direction matters) and normalised accuracies a:

        l_j    = max(1 - a_j, min_loss)                    (loss; a_j > 1 clips to min_loss)
        lhat_j = r_j l_j / sum_k r_k l_k
        U(r)   = 1 - sum_j lhat_j log(T lhat_j)            (0 log 0 = 0, natural log)
               = 1 - KL(lhat || uniform(T))

    U(r) = 1 exactly when r_j l_j is the same for every task (losses inversely proportional
    to the preference, the "exact Pareto" target of EPO/PHN); its minimum is 1 - log T,
    reached when lhat is one-hot (e.g. a one-hot r). A preference with
    sum_k r_k l_k = 0 (every preferred task at or above its expert) leaves lhat undefined:
    it is excluded, and the result records how many were (``n_excluded``); ``value`` is the
    mean over the rest (NaN if none remain). Example (T = 2): r = (0.5, 0.5),
    a = (0.8, 0.6) -> l = (0.2, 0.4), lhat = (1/3, 2/3),
    U = 1 - (1/3 log(2/3) + 2/3 log(4/3)) = 0.94366.
    """
    p, v = _check_pair(preferences, normalized_accuracy, "normalized_accuracy")
    if not (math.isfinite(min_loss) and min_loss >= 0):
        raise ValueError(f"min_loss must be a finite number >= 0, got {min_loss}")
    T = p.shape[1]
    loss = np.maximum(1.0 - v, min_loss)
    w = p * loss
    total = w.sum(axis=1)
    ok = total > 0
    per = np.full(len(p), np.nan)
    lhat = w[ok] / total[ok, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(lhat > 0, lhat * np.log(T * lhat), 0.0)
    per[ok] = 1.0 - terms.sum(axis=1)
    return _mean(
        per,
        "PHN-style uniformity 1 - KL(lhat || uniform), lhat = r*l/sum(r*l), l = max(1 - norm. acc, "
        f"{min_loss:g}); preferences with sum(r*l) = 0 excluded",
    )


def preference_alignment(preferences, normalized_accuracy) -> MeanMetric:
    """Preference alignment (method.md 5b): mean over preferences of Pearson(p, a).

        rho(p, a) = sum_j (p_j - pbar)(a_j - abar) / sqrt(sum_j (p_j - pbar)^2 sum_j (a_j - abar)^2)

    with a the normalised-accuracy vector produced at preference p. rho is undefined when
    p or a is constant across tasks (e.g. the equal preference); such preferences are
    excluded and counted in ``n_excluded``; ``value`` is NaN when none remain. Needs T >= 2.
    Example: p = (0.7, 0.3), a = (0.9, 0.8) -> 1; p = (0.2, 0.3, 0.5),
    a = (0.9, 0.7, 0.8) -> -0.01 / sqrt(0.046667 * 0.02) = -0.32733.
    """
    p, v = _check_pair(preferences, normalized_accuracy, "normalized_accuracy")
    if p.shape[1] < 2:
        raise ValueError("preference_alignment needs at least 2 tasks (a correlation over tasks)")
    pc = p - p.mean(axis=1, keepdims=True)
    vc = v - v.mean(axis=1, keepdims=True)
    sp = np.sqrt((pc**2).sum(axis=1))
    sv = np.sqrt((vc**2).sum(axis=1))
    # constant up to rounding: spread below 1e-12 of the row's scale
    ok = (sp > 1e-12 * np.abs(p).max(axis=1)) & (
        sv > 1e-12 * np.maximum(np.abs(v).max(axis=1), 1e-300)
    )
    per = np.full(len(p), np.nan)
    per[ok] = (pc[ok] * vc[ok]).sum(axis=1) / (sp[ok] * sv[ok])
    return _mean(
        per,
        "mean Pearson correlation between preference and normalised accuracy; "
        "preferences or accuracies constant across tasks excluded",
    )


def _mean(per: np.ndarray, note: str) -> MeanMetric:
    used = ~np.isnan(per)
    value = float(per[used].mean()) if used.any() else float("nan")
    return MeanMetric(
        value, int(used.sum()), int((~used).sum()), tuple(float(x) for x in per), note
    )
