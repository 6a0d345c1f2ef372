"""Fold a correction map W into a CLIP image tower's final projection.

open_clip's VisionTransformer ends with ``embedding = pooled @ visual.proj`` (proj has shape
(width, D)). The corrected embedding is ``embedding @ W^T`` (react.apply), so

    pooled @ (proj @ W^T) = (pooled @ proj) @ W^T

and replacing proj by proj @ W^T gives an ordinary checkpoint whose ``encode_image`` (before
L2 normalisation) equals the corrected features, with no inference overhead.

If the statistics were fitted with normalize_features=True the map was fitted on unit-norm
features; since W (z / ||z||) = (W z) / ||z||, the folded model still gives the same
L2-normalised embeddings (hence the same CLIP logits) as correcting normalised features.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

__all__ = ["fold_into_clip", "fold_state_dict", "folded_projection"]


def _check_map(W: torch.Tensor, proj: torch.Tensor, where: str) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(
            f"W must be one (D, D) map, got shape {tuple(W.shape)} (fold one preference at a time)"
        )
    if proj.dim() != 2:
        raise ValueError(
            f"{where} must be a 2-D (width, D) projection, got shape {tuple(proj.shape)}"
        )
    if proj.shape[1] != W.shape[0]:
        raise ValueError(
            f"{where} has shape {tuple(proj.shape)} (embedding D={proj.shape[1]}) but W is "
            f"{W.shape[0]} x {W.shape[1]}; the statistics come from a model of another width"
        )
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains non-finite values (NaN or inf)")


def folded_projection(proj: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """proj @ W^T, computed in float64 and returned in proj's dtype and device."""
    _check_map(W, proj, "proj")
    out = proj.detach().to(torch.float64) @ W.detach().to(proj.device, torch.float64).mT
    return out.to(proj.dtype)


def fold_state_dict(
    state_dict: Mapping[str, torch.Tensor], W: torch.Tensor, key: str = "visual.proj"
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``key`` replaced by ``state_dict[key] @ W^T``.

    Works on full CLIP state dicts (``visual.proj``) and on image-tower state dicts (``proj``):
    with the default key, ``proj`` is used when ``visual.proj`` is absent. Other tensors are
    shared with the input (not copied).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors, got {type(state_dict).__name__}")
    use = key
    if use not in state_dict and key == "visual.proj" and "proj" in state_dict:
        use = "proj"
    if use not in state_dict:
        near = sorted(k for k in state_dict if k.endswith("proj"))[:8]
        raise ValueError(
            f"state dict has no {key!r} entry (the visual projection to fold into); "
            f"keys ending in 'proj': {near or 'none'}. Pass key= to name it"
        )
    proj = state_dict[use]
    if not isinstance(proj, torch.Tensor):
        raise ValueError(f"state_dict[{use!r}] is a {type(proj).__name__}, not a tensor")
    out = dict(state_dict)
    out[use] = folded_projection(proj, W)
    return out


def fold_into_clip(
    model: torch.nn.Module, W: torch.Tensor, *, inplace: bool = False
) -> torch.nn.Module:
    """An open_clip CLIP (or bare VisionTransformer) whose image embedding is W applied to the old one.

    ``model.encode_image(x, normalize=False)`` of the result equals
    ``react.apply(W, model.encode_image(x, normalize=False))`` of the input. A deep copy is
    returned unless ``inplace=True``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    visual = model.visual if hasattr(model, "visual") else model
    proj = getattr(visual, "proj", None)
    if not isinstance(proj, torch.Tensor):
        raise ValueError(
            "the image tower has no 'proj' matrix to fold into (needs an open_clip "
            "VisionTransformer with output projection; timm/attentional-pool towers are not "
            f"supported); got {type(visual).__name__}.proj = {type(proj).__name__}"
        )
    new = folded_projection(proj, W)  # validates before copying the model
    if not inplace:
        model = copy.deepcopy(model)
        visual = model.visual if hasattr(model, "visual") else model
    with torch.no_grad():
        visual.proj.copy_(new)
    return model
