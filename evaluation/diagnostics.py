"""The regime of a suite, measured before any method: pure numpy, features are (n, D) rows.

- ``effective_dimension``: how many of the D embedding dimensions a set of features uses.
  Spectrum: the eigenvalues l_1 >= ... >= l_D of the covariance (1/n) X_c^T X_c of the
  **centred** features X_c = X - mean(X) (``centered=False``: the uncentred second moment
  (1/n) X^T X, where the shared mean direction counts as one more dimension). The 1/n
  cancels in both measures:
  * participation ratio PR = (sum_i l_i)^2 / sum_i l_i^2, in [1, rank]: D for isotropic
    features, 1 when one direction holds everything;
  * the energy dimension k_E: the smallest k with l_1 + ... + l_k >= E (l_1 + ... + l_D),
    E = 0.9 by default ("the number of dimensions holding 90% of the energy").
- ``principal_subspace`` / ``subspace_overlap`` / ``pairwise_overlaps``: a task's feature
  subspace is the span of its top-k principal directions (centred, as above), k = that
  task's 90%-energy dimension. The overlap of two subspaces with orthonormal bases A
  (D x k_a) and B (D x k_b) is the mean squared cosine of their min(k_a, k_b) principal
  angles, ||A^T B||_F^2 / min(k_a, k_b), in [0, 1]: 1 when the smaller subspace lies inside
  the larger, 0 when they are orthogonal. Two independent uniformly random subspaces give
  max(k_a, k_b) / D on average (``chance_overlap``), the level to read an overlap against.
- ``gain_share``: how much of the experts' gain over zero-shot a merge keeps,
  (merge - zeroshot) / (expert - zeroshot), per task and for the task averages.
- ``head_overlaps``: the same overlap for the tasks' classification heads: the span of each
  task's class vectors after removing their mean (a vector added to every class changes no
  prediction within the task), rank <= C - 1. High overlap means a feature change made for
  one task's classes is read by another task's head.
- ``task_vector_cosines``: cosine similarity of the flattened task vectors
  tau_t = theta_t - theta_0 (every floating-point entry of the state dicts), the measure of
  how separately the experts moved the weights (near 0 for CLIP's experts).
- ``parameter_groups``: the weights of a CLIP ViT image tower by kind (embedding, attention,
  MLP, block norms, output) and by depth (one group per transformer block), to locate where
  summed task vectors interfere (Task Arithmetic on one group only, or on all but one).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EffectiveDimension",
    "GainShare",
    "SubspaceOverlaps",
    "chance_overlap",
    "covariance_spectrum",
    "effective_dimension",
    "energy_dimension",
    "gain_share",
    "head_overlaps",
    "pairwise_overlaps",
    "parameter_groups",
    "principal_subspace",
    "subspace_overlap",
    "task_vector_cosines",
]


def _features(x, what: str = "features") -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{what} must be an (n, D) array with n >= 2 samples, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has non-finite values")
    return a


def _centre(x: np.ndarray, centered: bool) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True) if centered else x


def covariance_spectrum(features, centered: bool = True, weights=None) -> np.ndarray:
    """Eigenvalues (descending, length min(n, D)) of (1/n) X^T X of the (centred) features.

    ``weights`` (n,), >= 0: the weighted form X^T diag(w) X with w scaled to sum to 1, centred
    on the weighted mean (e.g. 1 / n_t for the rows of task t: every task counts equally).
    """
    x = _features(features)
    if weights is None:
        w = np.full(len(x), 1.0 / len(x))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(x),) or (w < 0).any() or not w.sum() > 0:
            raise ValueError(f"weights must be {len(x)} non-negative numbers, not all 0")
        w = w / w.sum()
    if centered:
        x = x - w @ x
    s = np.linalg.svd(np.sqrt(w)[:, None] * x, compute_uv=False)
    return s**2


def energy_dimension(eigenvalues, energy: float = 0.9) -> int:
    """Smallest k whose k largest eigenvalues hold at least ``energy`` of their sum."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy}")
    lam = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None))[::-1]
    total = lam.sum()
    if not total > 0:
        raise ValueError("the features have zero variance: no dimension holds any energy")
    # the relative tolerance keeps an exact split (e.g. 9 of 10 equal eigenvalues at 0.9)
    # from being pushed one dimension up by rounding in the cumulative sum
    k = int(np.searchsorted(np.cumsum(lam) / total, energy - 1e-12)) + 1
    return min(k, len(lam))


@dataclasses.dataclass(frozen=True)
class EffectiveDimension:
    participation_ratio: float
    energy_dim: int  # dimensions holding ``energy`` of the total
    energy: float
    centered: bool
    n: int
    D: int


def effective_dimension(
    features, energy: float = 0.9, centered: bool = True, weights=None
) -> EffectiveDimension:
    """Participation ratio and ``energy`` dimension of ``features`` (n, D) (module docstring;
    ``weights`` as in ``covariance_spectrum``)."""
    x = _features(features)
    lam = covariance_spectrum(x, centered, weights)
    if not lam.sum() > 0:
        raise ValueError("the features have zero variance: their effective dimension is undefined")
    pr = float(lam.sum() ** 2 / (lam**2).sum())
    return EffectiveDimension(pr, energy_dimension(lam, energy), energy, centered, *x.shape)


def principal_subspace(features, k: int, centered: bool = True) -> np.ndarray:
    """(D, k) orthonormal basis of the top-k principal directions of ``features``."""
    x = _centre(_features(features), centered)
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"k must be in [1, min(n, D) = {min(x.shape)}], got {k}")
    return np.linalg.svd(x, full_matrices=False)[2][:k].T


def subspace_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between span(a) and span(b).

    ``a`` (D, k_a), ``b`` (D, k_b): orthonormal columns. = ||a^T b||_F^2 / min(k_a, k_b).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"bases must be (D, k) with one D, got {a.shape} and {b.shape}")
    return float(np.sum((a.T @ b) ** 2) / min(a.shape[1], b.shape[1]))


def chance_overlap(k_a: int, k_b: int, D: int) -> float:
    """Expected ``subspace_overlap`` of independent uniformly random k_a- and k_b-dim subspaces
    of R^D: E||A^T B||_F^2 = k_a k_b / D, divided by min(k_a, k_b)."""
    return max(k_a, k_b) / D


@dataclasses.dataclass(frozen=True)
class SubspaceOverlaps:
    overlap: np.ndarray  # (T, T), symmetric, 1 on the diagonal
    chance: np.ndarray  # (T, T) ``chance_overlap`` of each pair's dimensions
    dims: list[int]  # each task's subspace dimension k_t (its ``energy`` dimension)
    energy: float


def pairwise_overlaps(
    features: Sequence, energy: float = 0.9, centered: bool = True
) -> SubspaceOverlaps:
    """Overlaps of every pair of tasks' top-k_t principal subspaces, k_t = the task's
    ``energy`` dimension; ``features``: one (n_t, D) array per task."""
    feats = [_features(f, f"features of task {i}") for i, f in enumerate(features)]
    if len({f.shape[1] for f in feats}) != 1:
        raise ValueError(f"tasks' features differ in D: {[f.shape[1] for f in feats]}")
    D = feats[0].shape[1]
    dims = [energy_dimension(covariance_spectrum(f, centered), energy) for f in feats]
    bases = [principal_subspace(f, k, centered) for f, k in zip(feats, dims, strict=True)]
    return _overlaps(bases, D, energy)


def _overlaps(bases: list[np.ndarray], D: int, energy: float) -> SubspaceOverlaps:
    """Every pair's ``subspace_overlap`` and ``chance_overlap`` of orthonormal (D, k_t) bases."""
    dims = [b.shape[1] for b in bases]
    T = len(bases)
    overlap = np.array([[subspace_overlap(bases[i], bases[j]) for j in range(T)] for i in range(T)])
    chance = np.array([[chance_overlap(dims[i], dims[j], D) for j in range(T)] for i in range(T)])
    return SubspaceOverlaps(overlap, chance, dims, energy)


def head_overlaps(heads: Sequence, rtol: float = 1e-6) -> SubspaceOverlaps:
    """Overlaps of every pair of tasks' head subspaces; ``heads``: one (C_t, D) array of
    class vectors per task. A task's subspace: the right singular vectors of its centred
    class vectors with singular values above ``rtol`` times the largest (``dims``: their
    number, C_t - 1 for distinct classes; ``energy`` is reported as 1.0)."""
    hs = [_features(h, f"head of task {i}") for i, h in enumerate(heads)]
    if len({h.shape[1] for h in hs}) != 1:
        raise ValueError(f"tasks' heads differ in D: {[h.shape[1] for h in hs]}")
    D = hs[0].shape[1]
    bases = []
    for i, h in enumerate(hs):
        _, sv, vt = np.linalg.svd(h - h.mean(axis=0), full_matrices=False)
        k = int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0
        if k == 0:
            raise ValueError(f"head of task {i}: its class vectors are all equal (no subspace)")
        bases.append(vt[:k].T)
    return _overlaps(bases, D, 1.0)


@dataclasses.dataclass(frozen=True)
class GainShare:
    per_task: np.ndarray  # (merge_t - zeroshot_t) / (expert_t - zeroshot_t); NaN where equal
    average: float  # the same ratio of the task averages (the paper's (69.1-48.0)/(90.5-48.0))


def gain_share(merged, zeroshot, expert) -> GainShare:
    """Share of the experts' gain over zero-shot that a merge keeps (per task, of averages).

    The average is the ratio of the averages, not the mean of the per-task ratios (a task
    whose expert barely beats zero-shot would otherwise dominate it); a task whose expert
    equals zero-shot has no gain to keep (NaN).
    """
    m, z, e = (np.asarray(v, dtype=np.float64) for v in (merged, zeroshot, expert))
    if not m.shape == z.shape == e.shape or m.ndim != 1 or m.size == 0:
        raise ValueError(
            f"merged, zeroshot and expert must be equal-length 1-D accuracy arrays, got "
            f"{m.shape}, {z.shape}, {e.shape}"
        )
    gain = e - z
    per_task = np.divide(m - z, gain, out=np.full_like(gain, np.nan), where=gain != 0)
    avg_gain = e.mean() - z.mean()
    average = float((m.mean() - z.mean()) / avg_gain) if avg_gain != 0 else float("nan")
    return GainShare(per_task, average)


def task_vector_cosines(pretrained, experts: Sequence) -> np.ndarray:
    """(T, T) cosines <tau_a, tau_b> / (|tau_a| |tau_b|) of the task vectors
    tau_t = experts[t] - pretrained, each flattened over every floating-point entry (keys in
    ``pretrained``'s order; tensors or arrays, computed in float64). A zero task vector has
    no direction: its row and column are NaN (1 on the diagonal otherwise)."""
    pre = {k: _array(v) for k, v in pretrained.items()}
    keys = [k for k, v in pre.items() if np.issubdtype(v.dtype, np.floating)]
    if not keys:
        raise ValueError("task_vector_cosines: the pretrained state has no floating-point entry")
    base = np.concatenate([pre[k].ravel() for k in keys])
    taus = []
    for t, e in enumerate(experts):
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"task_vector_cosines: expert {t} lacks {missing[:3]}")
        taus.append(np.concatenate([_array(e[k]).ravel() for k in keys]) - base)
    tau = np.stack(taus)
    norms = np.linalg.norm(tau, axis=1)
    gram = tau @ tau.T
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = gram / np.outer(norms, norms)
    cos[norms == 0, :] = np.nan
    cos[:, norms == 0] = np.nan
    return cos


_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")
_KINDS = (  # (group, test) for a weight inside a transformer block
    ("attention", lambda k: ".attn." in k),
    ("MLP", lambda k: ".mlp." in k),
    ("block norms", lambda k: ".ln_1." in k or ".ln_2." in k),
)
_OUTSIDE = {  # group: the top-level modules (first name of the key) outside the blocks
    "embedding": {"conv1", "class_embedding", "positional_embedding", "ln_pre"},
    "output": {"ln_post", "proj"},
}


def parameter_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Named groups of an open_clip ``VisionTransformer``'s weight names (``keys``: e.g. the
    float keys of its state dict), to locate interference between task vectors:

    - by kind, a partition of ``keys``: ``embedding`` (patch convolution, class and
      positional embeddings, ``ln_pre``), ``attention``, ``MLP`` and ``block norms``
      (``ln_1``, ``ln_2``) of every transformer block, ``output`` (``ln_post``, ``proj``),
      and ``other`` for any name none of these match (only when there is one);
    - by depth, ``block i``: every weight of transformer block ``i`` (in block order).

    Each group lists its keys in the order of ``keys``; a kind with no key is left out."""
    groups: dict[str, list[str]] = {}
    blocks: dict[int, list[str]] = {}
    for k in keys:
        m = _BLOCK.search(k)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(k)
            kind = next((name for name, test in _KINDS if test(k)), "other")
        else:
            top = k.split(".", 1)[0]
            kind = next((name for name, mods in _OUTSIDE.items() if top in mods), "other")
        groups.setdefault(kind, []).append(k)
    order = ["embedding", "attention", "MLP", "block norms", "output", "other"]
    out = {name: groups[name] for name in order if name in groups}
    out.update({f"block {i}": blocks[i] for i in sorted(blocks)})
    return out


def _array(v) -> np.ndarray:
    """float64 numpy view of a tensor or array (floating kinds), other dtypes as they are."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return v.double().numpy() if v.is_floating_point() else v.numpy()
    a = np.asarray(v)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a
