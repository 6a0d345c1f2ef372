"""Pareto Merging (Chen and Kwok, ICML 2025, arXiv 2408.12105): one model for every preference.

Re-implemented from the paper's description; the authors published no code, so details
the paper leaves open are our choices and are marked as such below.

For a base merge theta_base (any merge: Task Arithmetic, AdaMerging, ...) and a preference
p on the simplex of T tasks, every selected 2-D weight W (m x n) of the image encoder gets a
preference-conditioned low-rank update

    W(p) = W_base + U (sum_k p_k C_k) V^T,     U: (m, r), V: (n, r), C_k: (r, r).

U and V start with random orthonormal columns, every core C_k starts at zero (so the
update is exactly zero and W(p) = W_base for every p before training). All factors are
trained jointly by Adam on the linear scalarisation of the per-task prediction entropies

    L(p) = sum_k p_k H_k,   H_k = mean entropy of softmax(s * normalize(f(x)) @ W_k^T), x in B_k,

with p ~ Dirichlet(1) drawn afresh each step and B_k a batch of unlabeled images of task k
(the AdaMerging objective, ``merging.adamerging.entropy``). Our choices where the paper is
not explicit: the base merge is kept fixed (the paper learns AdaMerging coefficients as
well), no extra regulariser, the selected weights are the 2-D float tensors except
embedding tables (``low_rank_keys``), and the rank is min(rank, m, n) per weight.

A query is one cheap merge: ``apply_factors(base, factors, p)``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.adamerging import _EpochSampler, _prepare, entropy

_FORMAT = "pareto-merging-factors/1"


@dataclass
class ParetoFactors:
    """Low-rank factors per weight key: ``U[key]`` (m, r), ``V[key]`` (n, r), ``C[key]`` (T, r, r)."""

    U: dict[str, torch.Tensor]
    V: dict[str, torch.Tensor]
    C: dict[str, torch.Tensor]
    history: list[float] = field(default_factory=list)  # scalarised entropy per training step

    @property
    def keys(self) -> list[str]:
        return list(self.U)

    @property
    def n_tasks(self) -> int:
        return int(next(iter(self.C.values())).shape[0])

    def num_parameters(self) -> int:
        return sum(t.numel() for d in (self.U, self.V, self.C) for t in d.values())


def low_rank_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The weights that get an update: 2-D float tensors, except embedding tables."""
    return [
        k
        for k, v in state.items()
        if v.ndim == 2 and v.is_floating_point() and "embedding" not in k
    ]


def init_factors(
    base: dict[str, torch.Tensor],
    n_tasks: int,
    rank: int = 16,
    *,
    keys: Sequence[str] | None = None,
    seed: int = 0,
) -> ParetoFactors:
    """Orthonormal U, V (QR of seeded Gaussians) and zero cores, for ``keys`` of ``base``."""
    if n_tasks < 1 or rank < 1:
        raise ValueError(f"need n_tasks >= 1 and rank >= 1, got {n_tasks}, {rank}")
    keys = low_rank_keys(base) if keys is None else list(keys)
    if not keys:
        raise ValueError("no 2-D weights to attach low-rank updates to")
    gen = torch.Generator().manual_seed(int(seed))
    U, V, C = {}, {}, {}
    for key in keys:
        w = base[key]
        if w.ndim != 2:
            raise ValueError(
                f"{key!r} has shape {tuple(w.shape)}; low-rank updates need 2-D weights"
            )
        m, n = w.shape
        r = min(rank, m, n)
        U[key] = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0].float()
        V[key] = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0].float()
        C[key] = torch.zeros(n_tasks, r, r)
    return ParetoFactors(U, V, C)


def low_rank_delta(
    U: torch.Tensor, V: torch.Tensor, C: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """U (sum_k p_k C_k) V^T."""
    core = torch.tensordot(p.to(C.dtype), C, dims=1)
    return U @ core @ V.T


def apply_factors(
    base: dict[str, torch.Tensor], factors: ParetoFactors, p: Sequence[float] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """theta(p): base with every factored weight replaced by W_base + U (sum p_k C_k) V^T."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if p.shape != (factors.n_tasks,):
        raise ValueError(
            f"preference must have {factors.n_tasks} entries, got shape {tuple(p.shape)}"
        )
    out = dict(base)
    for key in factors.keys:
        w = base[key]
        d = low_rank_delta(
            factors.U[key].double(), factors.V[key].double(), factors.C[key].double(), p
        )
        out[key] = (w.double() + d).to(w.dtype)  # exact w when the cores are zero
    return out


def scalarised_entropy(
    model: nn.Module,
    base: dict[str, torch.Tensor],
    factors: ParetoFactors,
    p: torch.Tensor,
    batches: Sequence[torch.Tensor],
    heads: Sequence[torch.Tensor],
    logit_scale: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum_k p_k H_k, [H_k]) on prepared ``batches`` (differentiable w.r.t. the factors)."""
    params = dict(base)
    for key in factors.keys:
        params[key] = base[key] + low_rank_delta(factors.U[key], factors.V[key], factors.C[key], p)
    hs = []
    for x, w in zip(batches, heads, strict=True):
        z = functional_call(model, params, (x,))
        hs.append(entropy(logit_scale * F.normalize(z.float(), dim=-1) @ w.T))
    return sum(pk * h for pk, h in zip(p, hs, strict=True)), hs


def train_factors(
    base: dict[str, torch.Tensor],
    factors: ParetoFactors,
    encoder: nn.Module,
    heads: Sequence[torch.Tensor],
    unlabeled: Sequence,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    logit_scale: float = 100.0,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ParetoFactors:
    """Train U, V, C_k (copies; inputs untouched) for ``steps`` Adam steps; returns the new factors.

    ``encoder``: module whose state-dict keys are ``base``'s; it is copied, never modified.
    ``unlabeled[k]``: indexable by a LongTensor of indices, with ``len()`` (task k's images);
    ``prepare`` maps a sampled batch to the encoder's input on ``device``. Each step draws
    p ~ Dirichlet(1) (numpy generator seeded by ``seed``) and one batch per task.
    """
    from tqdm.auto import tqdm

    T = factors.n_tasks
    if len(heads) != T or len(unlabeled) != T:
        raise ValueError(
            f"need {T} heads and unlabeled sets, got {len(heads)} and {len(unlabeled)}"
        )
    dev = torch.device(device)
    model = copy.deepcopy(encoder).to(dev).eval().requires_grad_(False)
    base_d = {k: v.to(dev) for k, v in base.items()}
    f = ParetoFactors(
        *(
            {k: v.detach().to(dev).clone().requires_grad_(True) for k, v in d.items()}
            for d in (factors.U, factors.V, factors.C)
        ),
        history=list(factors.history),
    )
    w_heads = [h.detach().to(dev, torch.float32) for h in heads]
    params = [t for d in (f.U, f.V, f.C) for t in d.values()]
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    samplers = [_EpochSampler(len(u), batch_size, gen) for u in unlabeled]
    for _ in tqdm(range(int(steps)), desc="Pareto Merging", disable=not progress):
        p = torch.as_tensor(rng.dirichlet(np.ones(T)), dtype=torch.float32, device=dev)
        batches = [
            _prepare(u[s.next()], prepare, dev) for u, s in zip(unlabeled, samplers, strict=True)
        ]
        optimizer.zero_grad(set_to_none=True)
        loss, _ = scalarised_entropy(model, base_d, f, p, batches, w_heads, logit_scale)
        loss.backward()
        optimizer.step()
        f.history.append(float(loss.detach()))
    return ParetoFactors(
        *({k: v.detach().cpu() for k, v in d.items()} for d in (f.U, f.V, f.C)), history=f.history
    )


def save_factors(path: str | os.PathLike, factors: ParetoFactors, meta: dict | None = None) -> None:
    """Write the factors (and training history) to one safetensors file."""
    from safetensors.torch import save_file

    tensors = {"history": torch.tensor(factors.history, dtype=torch.float64)}
    for name, d in (("U", factors.U), ("V", factors.V), ("C", factors.C)):
        tensors.update({f"{name}:{k}": v.contiguous() for k, v in d.items()})
    metadata = {"format": _FORMAT, "keys": json.dumps(factors.keys), "meta": json.dumps(meta or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_factors(path: str | os.PathLike) -> ParetoFactors:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        md = fh.metadata() or {}
        if md.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a Pareto Merging factors file (format {md.get('format')!r})"
            )
        keys = json.loads(md["keys"])
        d = {n: {k: fh.get_tensor(f"{n}:{k}") for k in keys} for n in ("U", "V", "C")}
        history = fh.get_tensor("history").tolist()
    return ParetoFactors(d["U"], d["V"], d["C"], history=history)
