"""Representation Surgery (Yang et al., ICML 2024; code EnnengYang/RepresentationSurgery).

Per task t a small adapter removes the task-specific bias of the merged model's embedding:

    z_hat = z - B relu(A z),     A: (r, D) down-projection, B: (D, r) up-projection, no bias,

with B initialised to zero (so the adapter starts as the identity) and A like a default
``nn.Linear`` (uniform in +-1/sqrt(D), seeded). A and B are trained by Adam (lr 1e-3) on the
L1 distance mean |z_hat - z_expert| between the corrected merged embedding and expert t's
embedding of the same unlabeled image. Embeddings are precomputed, so training runs on
cached features (the encoder is frozen in the original method as well).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


class SurgeryAdapter(torch.nn.Module):
    def __init__(self, dim: int, rank: int = 16, *, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / dim**0.5
        self.down = torch.nn.Parameter(
            torch.empty(rank, dim).uniform_(-bound, bound, generator=gen)
        )
        self.up = torch.nn.Parameter(torch.zeros(dim, rank))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - torch.relu(z @ self.down.T) @ self.up.T


def l1_distance(adapter: SurgeryAdapter, z_merged: torch.Tensor, z_expert: torch.Tensor) -> float:
    with torch.no_grad():
        return float((adapter(z_merged) - z_expert).abs().mean())


def train_surgery(
    z_merged: torch.Tensor,
    z_expert: torch.Tensor,
    *,
    rank: int = 16,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[SurgeryAdapter, list[float]]:
    """Fit one adapter on paired embeddings (N, D); minibatches drawn without replacement
    epoch by epoch (seeded). Returns the adapter and the per-step L1 loss."""
    if z_merged.shape != z_expert.shape or z_merged.ndim != 2:
        raise ValueError(
            f"need paired (N, D) embeddings, got {tuple(z_merged.shape)} and {tuple(z_expert.shape)}"
        )
    adapter = SurgeryAdapter(z_merged.shape[1], rank, seed=seed)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    n, bs = len(z_merged), min(int(batch_size), len(z_merged))
    perm, pos, history = torch.randperm(n, generator=gen), 0, []
    for _ in range(int(steps)):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        loss = (adapter(z_merged[idx]) - z_expert[idx]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return adapter.eval().requires_grad_(False), history


def save_adapters(
    path: str | os.PathLike, adapters: Sequence[SurgeryAdapter], names: Sequence[str]
) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, a in zip(names, adapters, strict=True):
        tensors[f"{name}:down"], tensors[f"{name}:up"] = (
            a.down.detach().contiguous(),
            a.up.detach().contiguous(),
        )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "surgery-adapters/1"})
    os.replace(tmp, path)


def load_adapters(path: str | os.PathLike, names: Sequence[str]) -> list[SurgeryAdapter]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    out = []
    for name in names:
        down, up = t[f"{name}:down"], t[f"{name}:up"]
        a = SurgeryAdapter(down.shape[1], down.shape[0])
        with torch.no_grad():
            a.down.copy_(down)
            a.up.copy_(up)
        out.append(a.eval().requires_grad_(False))
    return out
