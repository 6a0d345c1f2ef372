"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

For task vectors tau_1..tau_T (all float tensors of a model, seen as one flat vector each):

1. Trim: per task keep the k = round(density * N) entries of largest magnitude over the
   WHOLE flattened task vector (N entries), zero the rest:
   trim_k = tau_k * [|tau_k| >= c_k], c_k the k-th largest |tau_k| (entries tied with c_k
   are all kept, so ties can keep slightly more than k).
2. Elect: per entry, s = sign(sum_k trim_k) (the sign carrying more total mass).
3. Disjoint merge: per entry, keep only the trimmed values that agree with s
   (trim_k * s > 0), then
      "sum":  m = sum_k kept_k                      (CLIP merging code; lam = 0.3)
      "mean": m = sum_k kept_k / #{k : kept_k != 0}  (TIES paper; lam about 1)
   An entry where no value agrees (all trimmed values zero, or an exact cancellation
   s = 0) gets m = 0. (The original TIES code replaces s = 0 by the majority sign of the
   whole model; for real-valued weights that event has measure zero.)
Result: theta_0 + lam * m.

Memory: the thresholds c_k are found without concatenating the task vector, by an exact
sample-bracketed selection (see ``kth_largest_magnitude``); the merge then runs tensor by
tensor, holding T copies of one tensor at a time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ._checks import (
    StateDict,
    accumulation_dtype,
    check_density,
    check_pretrained_and_experts,
    check_scale,
    check_state_dict,
    is_float,
)

MERGE_RULES = ("sum", "mean")

# A "part" of a flat vector: (numel, fn) where fn(None) returns the part's |values| as a
# flat tensor and fn(idx) returns |values| at the flat positions idx.
Part = tuple[int, Callable[[torch.Tensor | None], torch.Tensor]]


def keep_count(n: int, density: float) -> int:
    """Number of entries TIES keeps out of n: round(density * n), at least 1."""
    return min(n, max(1, int(round(density * n))))


def kth_largest_magnitude(
    parts: Sequence[Part],
    k: int,
    *,
    sample_size: int = 1 << 20,
    direct_below: int = 1 << 22,
    seed: int = 0,
) -> float:
    """Exact k-th largest value of the magnitudes spread over ``parts`` (k >= 1).

    Below ``direct_below`` entries: concatenate and ``torch.kthvalue``. Above: draw a
    random sample (stratified over parts, seeded) to bracket the answer in [lo, hi], then
    one streaming pass counts entries > hi and gathers the few in [lo, hi]; the answer is
    the (k - #>hi)-th largest of that bracket. If the bracket misses (probability ~1e-9 by
    the 6-sigma margin) or would be large, fall back to the full concatenation. The result
    is exact either way; only time and memory depend on the sample.
    """
    n = sum(numel for numel, _ in parts)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= direct_below:
        return _kth_largest_direct(parts, k)

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for numel, fn in parts:
        m = max(1, round(sample_size * numel / n))
        idx = torch.randint(numel, (m,), generator=gen)
        samples.append(fn(idx).cpu())
    sample = torch.cat(samples).sort(descending=True).values
    m = sample.numel()
    q = k / n
    center = q * m
    margin = 6.0 * math.sqrt(m * q * (1 - q)) + 16
    hi_pos, lo_pos = int(center - margin), int(center + margin)
    hi = math.inf if hi_pos < 0 else float(sample[hi_pos])
    lo = -math.inf if lo_pos >= m else float(sample[lo_pos])
    if lo == -math.inf and hi == math.inf:
        return _kth_largest_direct(parts, k)

    limit = max(4 * int(2 * margin * n / m), 1 << 16)
    count_above, kept, kept_n = 0, [], 0
    for _, fn in parts:
        a = fn(None)
        count_above += int(torch.count_nonzero(a > hi))
        sel = a[(a >= lo) & (a <= hi)]
        kept_n += sel.numel()
        if kept_n > limit:
            return _kth_largest_direct(parts, k)
        kept.append(sel)
    r = k - count_above  # rank of the answer inside the bracket, from the top
    if not 1 <= r <= kept_n:
        return _kth_largest_direct(parts, k)
    bracket = torch.cat(kept)
    return float(torch.kthvalue(bracket.cpu(), kept_n - r + 1).values)


def _kth_largest_direct(parts: Sequence[Part], k: int) -> float:
    flat = torch.cat([fn(None).reshape(-1) for _, fn in parts])
    return float(torch.kthvalue(flat.cpu(), flat.numel() - k + 1).values)


def _vector_parts(vector: StateDict, keys: Sequence[str]) -> list[Part]:
    def part(t: torch.Tensor) -> Part:
        flat = t.reshape(-1)
        return flat.numel(), lambda idx: (flat if idx is None else flat[idx.to(flat.device)]).abs()

    return [part(vector[key]) for key in keys]


def _difference_parts(expert: StateDict, pretrained: StateDict, keys: Sequence[str]) -> list[Part]:
    def part(e: torch.Tensor, p: torch.Tensor) -> Part:
        acc = accumulation_dtype(e.dtype)  # same arithmetic as the merge pass
        ef, pf = e.reshape(-1), p.reshape(-1)

        def fn(idx: torch.Tensor | None) -> torch.Tensor:
            if idx is None:
                return torch.sub(ef.to(acc), pf.to(acc)).abs_()
            idx = idx.to(ef.device)
            return (ef[idx].to(acc) - pf[idx].to(acc)).abs_()

        return ef.numel(), fn

    return [part(expert[key], pretrained[key]) for key in keys]


def _check_merge_rule(merge: str) -> None:
    if merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")


def _trim_elect(taus: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """taus (T, n), thresholds (T,) -> (trimmed (T, n), agree mask (T, n)).

    trimmed_k = tau_k * [|tau_k| >= c_k]; agree_k = trimmed_k * sign(sum_j trimmed_j) > 0.
    """
    trimmed = taus * (taus.abs() >= thresholds[:, None])
    elected = trimmed.sum(dim=0).sign()
    agree = (trimmed * elected) > 0
    return trimmed, agree


def _trimmed_disjoint_merge(
    taus: torch.Tensor, thresholds: torch.Tensor, merge: str
) -> torch.Tensor:
    """Trim (in place), elect and disjoint-merge one tensor's stacked task vectors (T, n).

    With P = sum of the positive trimmed values and N = sum of the negative ones, the
    elected sign is sign(P + N) and the agreeing values sum to P (sign +), N (sign -) or
    nothing (sign 0); "mean" divides by the number of agreeing values. Same result as
    masking with ``_trim_elect``, with fewer passes over the (T, n) block.
    """
    trimmed = taus.masked_fill_(taus.abs() < thresholds[:, None], 0)
    pos = trimmed.clamp(min=0).sum(dim=0)
    neg = trimmed.clamp(max=0).sum(dim=0)
    total = pos + neg
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    merged = torch.where(total > 0, pos, torch.where(total < 0, neg, zero))
    if merge == "mean":
        n_pos = torch.count_nonzero(trimmed > 0, dim=0)
        n_neg = torch.count_nonzero(trimmed < 0, dim=0)
        count = torch.where(total > 0, n_pos, torch.where(total < 0, n_neg, 1))
        merged = merged / count.clamp_(min=1)
    return merged


def ties(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    scale: float = 0.3,
    density: float = 0.2,
    merge: str = "sum",
) -> dict[str, torch.Tensor]:
    """TIES merge: theta_0 + scale * disjoint_merge(elect(trim(tau_1..tau_T, density))).

    ``merge="sum"`` with scale 0.3 is the CLIP merging papers' setting; ``merge="mean"``
    is the TIES paper's (scale about 1). Non-float tensors are copied from pretrained.
    """
    check_pretrained_and_experts(pretrained, experts)
    scale = check_scale(scale, "scale")
    density = check_density(density)
    _check_merge_rule(merge)
    keys = [key for key, t in pretrained.items() if is_float(t)]
    thresholds = _expert_thresholds(pretrained, experts, keys, density)
    out: dict[str, torch.Tensor] = {}
    for key, ref in pretrained.items():
        if not is_float(ref):
            out[key] = ref.clone()
            continue
        acc = accumulation_dtype(ref.dtype)
        base = ref.reshape(-1).to(acc)
        taus = torch.stack([e[key].reshape(-1).to(acc) for e in experts]).sub_(base)
        merged = _trimmed_disjoint_merge(taus, thresholds.to(device=taus.device, dtype=acc), merge)
        del taus
        merged = merged.mul_(scale).add_(base)
        out[key] = merged.reshape(ref.shape).to(ref.dtype)
    return out


def _expert_thresholds(
    pretrained: StateDict, experts: Sequence[StateDict], keys: Sequence[str], density: float
) -> torch.Tensor:
    if not keys:
        warnings.warn("ties: no floating-point tensors to merge", stacklevel=3)
        return torch.zeros(len(experts), dtype=torch.float64)
    n = sum(pretrained[key].numel() for key in keys)
    k = keep_count(n, density)
    return torch.tensor(
        [kth_largest_magnitude(_difference_parts(e, pretrained, keys), k) for e in experts],
        dtype=torch.float64,
    )


def ties_trim(vectors: Sequence[StateDict], density: float = 0.2) -> list[dict[str, torch.Tensor]]:
    """Step 1 only: each task vector keeps its top round(density * N) magnitudes (global)."""
    keys = _check_vectors(vectors)
    density = check_density(density)
    n = sum(vectors[0][key].numel() for key in keys)
    k = keep_count(n, density)
    out = []
    for tv in vectors:
        c = kth_largest_magnitude(_vector_parts(tv, keys), k)
        out.append({key: tv[key] * (tv[key].abs() >= c) for key in keys})
    return out


def ties_process(
    vectors: Sequence[StateDict], density: float = 0.2
) -> list[dict[str, torch.Tensor]]:
    """TIES-processed per-task vectors (trim + elect + disjoint mask), as AdaMerging++ uses.

    Task k's output is trim_k masked to the entries that agree with the elected sign, so
    sum_k output_k is the TIES "sum" merge of the vectors (before scaling).
    """
    keys = _check_vectors(vectors)
    density = check_density(density)
    n = sum(vectors[0][key].numel() for key in keys)
    k = keep_count(n, density)
    thresholds = torch.tensor(
        [kth_largest_magnitude(_vector_parts(tv, keys), k) for tv in vectors], dtype=torch.float64
    )
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key in keys:
        ref = vectors[0][key]
        acc = accumulation_dtype(ref.dtype)
        taus = torch.stack([tv[key].reshape(-1).to(acc) for tv in vectors])
        trimmed, agree = _trim_elect(taus, thresholds.to(device=taus.device, dtype=acc))
        kept = (trimmed * agree).to(ref.dtype)
        for t, row in enumerate(kept):
            out[t][key] = row.reshape(ref.shape)
    return out


def _check_vectors(vectors: object) -> list[str]:
    """Task vectors: a non-empty list of float state dicts with identical keys/shapes."""
    from ._checks import check_experts, check_matching

    check_experts(vectors)
    for t, tv in enumerate(vectors):
        check_state_dict(tv, f"task vector {t}")
        if t:
            check_matching(vectors[0], tv, f"task vector {t}", "task vector 0")
    keys = list(vectors[0].keys())
    for key in keys:
        if not is_float(vectors[0][key]):
            raise ValueError(
                f"task vector key {key!r} has non-float dtype {vectors[0][key].dtype}; "
                "task vectors hold only floating-point tensors (see merging.task_vectors)"
            )
    return keys
