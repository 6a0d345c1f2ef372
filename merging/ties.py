"""TIES merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

For task vectors tau_1..tau_T over the tensors that carry a task vector (float tensors where
at least one expert differs from the pretrained model; a tensor every expert copies from
the pretrained model, e.g. the projection that FusionBench's CLIPVisionModel experts lack,
is neither counted nor changed), each seen as one flat vector of N entries:

1. Trim: per task keep the k entries of largest magnitude over the WHOLE flattened task
   vector, zero the rest: trim_k = tau_k * [|tau_k| >= c_k], c_k the k-th largest |tau_k|
   (entries tied with c_k are all kept, so ties can keep more than k).
   ``keep_rule="floor_plus_one"`` (default): k = int(density * N) + 1, the original TIES
   code's count (its threshold is the (N - int(density * N))-th smallest magnitude; also
   FusionBench's and AdaMerging's, so behind the CLIP merging papers' numbers).
   ``keep_rule="round"``: k = round(density * N) (at least 1), the paper's "top density".
2. Elect: per entry, s = sign(sum_k trim_k) (the sign carrying more total mass).
   An entry whose trimmed values cancel exactly (sum exactly 0; it happens in float32 at
   ViT-B/32 size) has no sign:
   ``zero_sign="majority"`` (default, the original code): s = the sign of the sum of all
   entries' elected signs (the whole model's majority sign; when that is 0 as well, the
   negative values are taken, as the original code's selection does);
   ``zero_sign="zero"``: the entry gets 0 (the paper's rule read literally).
3. Disjoint merge: per entry, keep only the trimmed values with the elected sign, then
      "sum":  m = sum_k kept_k                      (CLIP merging code; lam = 0.3)
      "mean": m = sum_k kept_k / #{k : kept_k != 0}  (TIES paper; lam about 1)
   (an entry with no kept value gets 0).
Result: theta_0 + lam * m.

Memory: the thresholds c_k are found without concatenating the task vector, by an exact
sample-bracketed selection (see ``kth_largest_magnitude``); the merge then runs tensor by
tensor, holding T copies of one tensor at a time. Entries that cancel exactly are rare: they
are set aside during that pass and resolved once the model's majority sign is known.
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
KEEP_RULES = ("floor_plus_one", "round")
ZERO_SIGN_RULES = ("majority", "zero")

# A "part" of a flat vector: (numel, fn) where fn(None) returns the part's |values| as a
# flat tensor and fn(idx) returns |values| at the flat positions idx.
Part = tuple[int, Callable[[torch.Tensor | None], torch.Tensor]]


def keep_count(n: int, density: float, rule: str = "floor_plus_one") -> int:
    """Entries TIES keeps out of n: int(density * n) + 1 ("floor_plus_one", the original
    code) or round(density * n), at least 1 ("round"); never more than n."""
    if rule not in KEEP_RULES:
        raise ValueError(f"keep_rule must be one of {KEEP_RULES}, got {rule!r}")
    k = int(n * density) + 1 if rule == "floor_plus_one" else max(1, int(round(density * n)))
    return min(n, k)


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


def _check_rules(merge: str | None, keep_rule: str, zero_sign: str) -> None:
    if merge is not None and merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
    if keep_rule not in KEEP_RULES:
        raise ValueError(f"keep_rule must be one of {KEEP_RULES}, got {keep_rule!r}")
    if zero_sign not in ZERO_SIGN_RULES:
        raise ValueError(f"zero_sign must be one of {ZERO_SIGN_RULES}, got {zero_sign!r}")


class _Election:
    """Sign election over the whole model, one tensor at a time.

    ``elect(trimmed)`` returns the elected signs of one tensor's entries (T, n) -> (n,) and
    the flat positions whose trimmed values cancel exactly (sum 0, some value non-zero);
    those keep sign 0 until ``majority()``: the sign of the sum of every entry's elected
    sign (exact integer count), which the ``"majority"`` rule gives them.
    """

    def __init__(self) -> None:
        self.balance = 0

    def elect(self, trimmed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signs = trimmed.sum(dim=0).sign()
        self.balance += int(torch.count_nonzero(signs > 0)) - int(torch.count_nonzero(signs < 0))
        cancelled = torch.nonzero((signs == 0) & (trimmed != 0).any(dim=0)).reshape(-1)
        return signs, cancelled

    def majority(self) -> int:
        return (self.balance > 0) - (self.balance < 0)


def _agreeing(trimmed: torch.Tensor, sign: int | torch.Tensor) -> torch.Tensor:
    """Mask of the trimmed values with the elected sign: positive where the sign is > 0,
    negative where it is < 0 (and, for the majority rule's sign, negative where it is 0)."""
    return torch.where(torch.as_tensor(sign) > 0, trimmed > 0, trimmed < 0)


def _combine(trimmed: torch.Tensor, agree: torch.Tensor, merge: str) -> torch.Tensor:
    """Disjoint "sum" or "mean" over the agreeing values, (T, n) -> (n,)."""
    merged = (trimmed * agree).sum(dim=0)
    if merge == "mean":
        merged = merged / torch.count_nonzero(agree, dim=0).clamp_(min=1)
    return merged


def _trimmed_disjoint_merge(
    taus: torch.Tensor, thresholds: torch.Tensor, merge: str, election: _Election
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trim (in place), elect and disjoint-merge one tensor's stacked task vectors (T, n).

    Returns (merged, cancelled positions, their trimmed values (T, m)); merged is 0 at the
    cancelled positions. With P = sum of the positive trimmed values and N = sum of the
    negative ones, the agreeing values sum to P (sign +), N (sign -) or nothing (sign 0);
    "mean" divides by the number of agreeing values. Same result as ``_combine`` with
    ``_agreeing``, with fewer passes over the (T, n) block.
    """
    trimmed = taus.masked_fill_(taus.abs() < thresholds[:, None], 0)
    signs, cancelled = election.elect(trimmed)
    pos = trimmed.clamp(min=0).sum(dim=0)
    neg = trimmed.clamp(max=0).sum(dim=0)
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    merged = torch.where(signs > 0, pos, torch.where(signs < 0, neg, zero))
    if merge == "mean":
        n_pos = torch.count_nonzero(trimmed > 0, dim=0)
        n_neg = torch.count_nonzero(trimmed < 0, dim=0)
        count = torch.where(signs > 0, n_pos, torch.where(signs < 0, n_neg, 1))
        merged = merged / count.clamp_(min=1)
    return merged, cancelled, trimmed[:, cancelled].clone()


def carrying_keys(pretrained: StateDict, experts: Sequence[StateDict]) -> list[str]:
    """Float keys where at least one expert differs from ``pretrained`` (the tensors that
    carry a task vector), in ``pretrained``'s order."""
    return [
        key
        for key, ref in pretrained.items()
        if is_float(ref) and any(not torch.equal(e[key], ref) for e in experts)
    ]


def ties(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    scale: float = 0.3,
    density: float = 0.2,
    merge: str = "sum",
    *,
    keep_rule: str = "floor_plus_one",
    zero_sign: str = "majority",
) -> dict[str, torch.Tensor]:
    """TIES merge: theta_0 + scale * disjoint_merge(elect(trim(tau_1..tau_T, density))).

    ``merge="sum"`` with scale 0.3 is the CLIP merging papers' setting; ``merge="mean"``
    is the TIES paper's (scale about 1). ``keep_rule`` and ``zero_sign``: the module
    docstring (defaults: the original TIES code's conventions). Non-float tensors, and
    float tensors no expert changes, are copied from pretrained.
    """
    check_pretrained_and_experts(pretrained, experts)
    scale = check_scale(scale, "scale")
    density = check_density(density)
    _check_rules(merge, keep_rule, zero_sign)
    keys = carrying_keys(pretrained, experts)
    thresholds = _expert_thresholds(pretrained, experts, keys, density, keep_rule)
    election, pending = _Election(), []
    out: dict[str, torch.Tensor] = {}
    for key, ref in pretrained.items():
        if key not in keys:
            out[key] = ref.clone()
            continue
        acc = accumulation_dtype(ref.dtype)
        base = ref.reshape(-1).to(acc)
        taus = torch.stack([e[key].reshape(-1).to(acc) for e in experts]).sub_(base)
        thr = thresholds.to(device=taus.device, dtype=acc)
        merged, cancelled, values = _trimmed_disjoint_merge(taus, thr, merge, election)
        del taus
        if cancelled.numel():
            pending.append((key, cancelled, values, base[cancelled]))
        out[key] = merged.mul_(scale).add_(base).reshape(ref.shape).to(ref.dtype)
    if zero_sign == "majority":
        sign = election.majority()
        for key, idx, values, base in pending:
            merged = _combine(values, _agreeing(values, sign), merge)
            out[key].view(-1)[idx] = merged.mul_(scale).add_(base).to(out[key].dtype)
    return out


def _expert_thresholds(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    keys: Sequence[str],
    density: float,
    keep_rule: str,
) -> torch.Tensor:
    if not keys:
        warnings.warn("ties: no expert differs from pretrained in any float tensor", stacklevel=3)
        return torch.zeros(len(experts), dtype=torch.float64)
    n = sum(pretrained[key].numel() for key in keys)
    k = keep_count(n, density, keep_rule)
    return torch.tensor(
        [kth_largest_magnitude(_difference_parts(e, pretrained, keys), k) for e in experts],
        dtype=torch.float64,
    )


def _vector_thresholds(
    vectors: Sequence[StateDict], keys: Sequence[str], density: float, keep_rule: str
) -> torch.Tensor:
    if not keys:
        return torch.zeros(len(vectors), dtype=torch.float64)
    k = keep_count(sum(vectors[0][key].numel() for key in keys), density, keep_rule)
    return torch.tensor(
        [kth_largest_magnitude(_vector_parts(tv, keys), k) for tv in vectors], dtype=torch.float64
    )


def _nonzero_keys(vectors: Sequence[StateDict], keys: Sequence[str]) -> list[str]:
    return [key for key in keys if any(bool(tv[key].any()) for tv in vectors)]


def ties_trim(
    vectors: Sequence[StateDict], density: float = 0.2, *, keep_rule: str = "floor_plus_one"
) -> list[dict[str, torch.Tensor]]:
    """Step 1 only: each task vector keeps its top ``keep_count`` magnitudes (global, over
    the tensors where some vector is non-zero)."""
    all_keys = _check_vectors(vectors)
    density = check_density(density)
    _check_rules(None, keep_rule, ZERO_SIGN_RULES[0])
    keys = _nonzero_keys(vectors, all_keys)
    thresholds = _vector_thresholds(vectors, keys, density, keep_rule)
    return [
        {
            key: tv[key] * (tv[key].abs() >= c) if key in keys else tv[key].clone()
            for key in all_keys
        }
        for tv, c in zip(vectors, thresholds.tolist(), strict=True)
    ]


def ties_process(
    vectors: Sequence[StateDict],
    density: float = 0.2,
    *,
    keep_rule: str = "floor_plus_one",
    zero_sign: str = "majority",
) -> list[dict[str, torch.Tensor]]:
    """TIES-processed per-task vectors (trim + elect + disjoint mask), as AdaMerging++ uses.

    Task k's output is trim_k masked to the entries that agree with the elected sign, so
    sum_k output_k is the TIES "sum" merge of the vectors (before scaling), with the same
    ``keep_rule`` and ``zero_sign`` conventions (module docstring) and the same density
    over the tensors that carry a task vector (where some vector is non-zero).
    """
    all_keys = _check_vectors(vectors)
    density = check_density(density)
    _check_rules(None, keep_rule, zero_sign)
    keys = _nonzero_keys(vectors, all_keys)
    thresholds = _vector_thresholds(vectors, keys, density, keep_rule)
    election, pending = _Election(), []
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key in all_keys:
        ref = vectors[0][key]
        if key not in keys:
            for t, tv in enumerate(vectors):
                out[t][key] = tv[key].clone()
            continue
        acc = accumulation_dtype(ref.dtype)
        taus = torch.stack([tv[key].reshape(-1).to(acc) for tv in vectors])
        thr = thresholds.to(device=taus.device, dtype=acc)
        trimmed = taus.masked_fill_(taus.abs() < thr[:, None], 0)
        signs, cancelled = election.elect(trimmed)
        if cancelled.numel():
            pending.append((key, cancelled, trimmed[:, cancelled].clone()))
        kept = (trimmed * _agreeing(trimmed, signs) * (signs != 0)).to(ref.dtype)
        for t, row in enumerate(kept):
            out[t][key] = row.reshape(ref.shape)
    if zero_sign == "majority":
        sign = election.majority()
        for key, idx, values in pending:
            kept = values * _agreeing(values, sign)
            for t, row in enumerate(kept):
                out[t][key].view(-1)[idx] = row.to(out[t][key].dtype)
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
