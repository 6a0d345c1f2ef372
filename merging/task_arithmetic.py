"""Task vectors and the linear merges built on them.

Notation: theta_0 the pretrained state dict, theta_k expert k (k = 1..T),
tau_k = theta_k - theta_0 its task vector (per floating-point tensor).

- Weighted task arithmetic:   theta = theta_0 + sum_k w_k tau_k
- Task Arithmetic:            w_k = lam                       (lam = 0.3 for CLIP)
- Preference task arithmetic: w_k = lam * T * p_k             (p on the simplex)
- Weight averaging:           theta = (1/T) sum_k theta_k

Every merge goes tensor by tensor and reads each input once: the weighted sum of experts is
accumulated in float32 (float64 for float64 inputs) and the pretrained term is added once,
theta = (1 - sum_k w_k) theta_0 + sum_k w_k theta_k. Inputs are never modified; non-float
tensors (integer buffers) are copied from the pretrained state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import (
    StateDict,
    accumulation_dtype,
    check_experts,
    check_matching,
    check_pretrained_and_experts,
    check_scale,
    check_state_dict,
    check_task_vectors,
    is_float,
)


def task_vectors(
    pretrained: StateDict, experts: Sequence[StateDict]
) -> list[dict[str, torch.Tensor]]:
    """tau_k = theta_k - theta_0 for every floating-point key (non-float keys are left out)."""
    check_pretrained_and_experts(pretrained, experts)
    return [
        {key: e[key] - ref for key, ref in pretrained.items() if is_float(ref)} for e in experts
    ]


def apply(
    pretrained: StateDict,
    vector: StateDict,
    scale: float = 1.0,
    *,
    inplace: bool = False,
) -> dict[str, torch.Tensor]:
    """theta_0 + scale * tau for one task vector ``tau`` (holding the float keys of theta_0).

    With ``inplace=True`` the float tensors of ``pretrained`` are overwritten and returned
    (saves one model's memory); otherwise a new state dict is returned and inputs are kept.
    """
    check_state_dict(pretrained, "pretrained")
    check_task_vectors(pretrained, [vector])
    scale = check_scale(scale, "scale")
    out: dict[str, torch.Tensor] = {}
    for key, ref in pretrained.items():
        if not is_float(ref):
            out[key] = ref if inplace else ref.clone()
        elif inplace:
            out[key] = ref.add_(vector[key], alpha=scale)
        else:
            out[key] = torch.add(ref, vector[key], alpha=scale)
    return out


def _combine(
    pretrained: StateDict | None,
    experts: Sequence[StateDict],
    weights: Sequence[float],
    base_weight: float,
) -> dict[str, torch.Tensor]:
    """base_weight * theta_0 + sum_k weights[k] * theta_k per float key (non-float: copied).

    Reads every input tensor once; one float32/float64 accumulator per key.
    """
    reference = pretrained if pretrained is not None else experts[0]
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if not is_float(ref):
            out[key] = ref.clone()
            continue
        acc_dtype = accumulation_dtype(ref.dtype)
        acc = torch.mul(experts[0][key].to(acc_dtype), weights[0])
        for w, e in zip(weights[1:], experts[1:], strict=True):
            acc.add_(e[key], alpha=w)
        if pretrained is not None and base_weight != 0.0:
            acc.add_(pretrained[key], alpha=base_weight)
        out[key] = acc if acc.dtype == ref.dtype else acc.to(ref.dtype)
    return out


def weighted_task_arithmetic(
    pretrained: StateDict, experts: Sequence[StateDict], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_k weights[k] * tau_k (one real coefficient per expert, e.g. MAP's c)."""
    check_pretrained_and_experts(pretrained, experts)
    w = _as_vector(weights, len(experts), "weights")
    return _combine(pretrained, experts, w, 1.0 - sum(w))


def task_arithmetic(
    pretrained: StateDict, experts: Sequence[StateDict], scale: float = 0.3
) -> dict[str, torch.Tensor]:
    """Task Arithmetic: theta_0 + scale * sum_k tau_k (scale = 0.3 is the CLIP setting)."""
    check_pretrained_and_experts(pretrained, experts)
    scale = check_scale(scale, "scale")
    w = [scale] * len(experts)
    return _combine(pretrained, experts, w, 1.0 - scale * len(experts))


def preference_task_arithmetic(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    p: Sequence[float] | torch.Tensor,
    scale: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Preference-weighted Task Arithmetic: theta_0 + scale * sum_k (T p_k) tau_k.

    ``p`` must lie on the simplex (p_k >= 0, sum p_k = 1 within 1e-6); p = 1/T gives
    Task Arithmetic, p = e_t gives theta_0 + scale * T * tau_t.
    """
    check_pretrained_and_experts(pretrained, experts)
    scale = check_scale(scale, "scale")
    t = len(experts)
    pv = _as_vector(p, t, "p")
    if min(pv) < 0:
        raise ValueError(f"preference p must be non-negative, got {pv}")
    if abs(sum(pv) - 1.0) > 1e-6:
        raise ValueError(f"preference p must sum to 1 (it lies on the simplex), got sum {sum(pv)}")
    w = [scale * t * pk for pk in pv]
    return _combine(pretrained, experts, w, 1.0 - sum(w))


def weight_average(experts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Weight averaging: (1/T) sum_k theta_k (non-float tensors copied from expert 0)."""
    check_experts(experts)
    for k, e in enumerate(experts[1:], start=1):
        check_matching(experts[0], e, f"expert {k}", "expert 0")
    t = len(experts)
    return _combine(None, experts, [1.0 / t] * t, 0.0)


def _as_vector(values: object, length: int, name: str) -> list[float]:
    """Finite 1-D real vector of the given length, as Python floats."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{name} must be a sequence of {length} numbers, got {type(values).__name__}"
        )
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries but there are {length} experts")
    return [check_scale(v, f"{name}[{i}]") for i, v in enumerate(values)]
