"""Input validation shared by every merge: state dicts must agree key by key before any work.

A state dict here is a mapping ``str -> torch.Tensor``. Experts must have exactly the
pretrained model's keys, with the same shape, dtype and device for every key. The first
disagreement is reported with the expert's index and the key, so the user knows which
checkpoint to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def is_float(t: torch.Tensor) -> bool:
    """True for tensors that merges combine (floating point); others are copied."""
    return t.is_floating_point()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype used for intermediate sums: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_state_dict(sd: object, what: str) -> None:
    """Raise TypeError unless ``sd`` is a non-empty mapping of str -> Tensor."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"{what} must be a state dict (dict[str, Tensor]), got {type(sd).__name__}")
    if len(sd) == 0:
        raise ValueError(f"{what} is an empty state dict")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: keys must be str, got {key!r} ({type(key).__name__})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{what}: value of key {key!r} must be a torch.Tensor, got {type(value).__name__}"
            )


def check_matching(reference: StateDict, other: StateDict, what: str, ref_what: str) -> None:
    """Raise ValueError naming the first key where ``other`` disagrees with ``reference``.

    Checks missing keys (in ``reference`` order), extra keys (in ``other`` order), then
    shape, dtype and device of every key.
    """
    for key in reference:
        if key not in other:
            raise ValueError(f"{what}: key {key!r} is missing (present in {ref_what})")
    for key in other:
        if key not in reference:
            raise ValueError(f"{what}: unexpected key {key!r} (not in {ref_what})")
    for key, ref in reference.items():
        t = other[key]
        if t.shape != ref.shape:
            raise ValueError(
                f"{what}: key {key!r} has shape {tuple(t.shape)}, {ref_what} has {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise ValueError(f"{what}: key {key!r} has dtype {t.dtype}, {ref_what} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(
                f"{what}: key {key!r} is on {t.device}, {ref_what} is on {ref.device}; "
                "move all state dicts to one device"
            )


def check_experts(experts: object, min_count: int = 1) -> None:
    """Raise unless ``experts`` is a list/tuple of at least ``min_count`` state dicts."""
    if isinstance(experts, Mapping) or not isinstance(experts, Sequence):
        raise TypeError(
            f"experts must be a list of state dicts, got {type(experts).__name__}; "
            "wrap a single expert in a list"
        )
    if len(experts) < min_count:
        raise ValueError(f"need at least {min_count} expert state dict(s), got {len(experts)}")
    for k, e in enumerate(experts):
        check_state_dict(e, f"expert {k}")


def check_pretrained_and_experts(pretrained: object, experts: object) -> None:
    """Validate ``pretrained`` and every expert against it (keys, shapes, dtypes, devices)."""
    check_state_dict(pretrained, "pretrained")
    check_experts(experts)
    for k, e in enumerate(experts):
        check_matching(pretrained, e, f"expert {k}", "pretrained")


def check_task_vectors(pretrained: StateDict, vectors: object) -> None:
    """Task vectors must hold exactly the floating-point keys of ``pretrained``."""
    check_experts(vectors)
    float_ref = {k: v for k, v in pretrained.items() if is_float(v)}
    for k, tv in enumerate(vectors):
        check_matching(float_ref, tv, f"task vector {k}", "the floating-point keys of pretrained")


def check_scale(value: object, name: str, *, positive: bool = False) -> float:
    """A finite real number (``> 0`` when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_density(density: object) -> float:
    density = check_scale(density, "density")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density
