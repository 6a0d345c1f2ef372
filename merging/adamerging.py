"""AdaMerging / AdaMerging++ (Yang et al., ICLR 2024): merging coefficients learned by
entropy minimisation on unlabeled batches.

Merged parameters for coefficients lam:
    task-wise  (lam of shape (T,)):    theta_l = theta_0,l + sum_t lam_t     tau_t,l
    layer-wise (lam of shape (T, L)):  theta_l = theta_0,l + sum_t lam_t,l   tau_t,l
where l runs over the L floating-point state-dict entries ("layers") and tau_t is expert
t's task vector; AdaMerging++ uses the TIES-processed vectors (``ties_process``: trimmed
to the top ``density`` magnitudes, masked to the elected sign) instead.

Objective (minimised with Adam, lam clamped to [0, 1] after every step, init 0.3):
    H(lam) = (1/T) sum_t mean_{x in B_t} H(softmax(s * normalize(f(x; theta(lam))) @ W_t^T))
with B_t a batch of ``batch_size`` unlabeled images of task t (drawn without replacement,
epoch by epoch, from a seeded generator), W_t task t's zero-shot head, s the logit scale.
The encoder runs through ``torch.func.functional_call`` with the merged tensors, so no
model copy is rebuilt per step; each task's forward is back-propagated on its own
(activation memory of one task at a time).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ._checks import (
    StateDict,
    accumulation_dtype,
    check_density,
    check_pretrained_and_experts,
    check_scale,
    check_state_dict,
    check_task_vectors,
    is_float,
)
from .task_arithmetic import task_vectors as compute_task_vectors
from .ties import ties_process

GRANULARITIES = ("layer", "task")
_FORMAT = "adamerging-coefficients/1"


@dataclass
class AdaMergingResult:
    """What AdaMerging learned.

    ``coefficients``: (T,) for task-wise, (T, L) for layer-wise, column j belonging to
    ``keys[j]`` (the floating-point state-dict keys, in the pretrained state dict's order).
    ``state_dict`` is None for results read back with ``load_coefficients``.
    """

    state_dict: dict[str, torch.Tensor] | None
    coefficients: torch.Tensor
    keys: list[str]
    entropy_history: list[float] = field(default_factory=list)
    granularity: str = "layer"
    ties: bool = False
    density: float | None = None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the rows."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def apply_adamerging_coefficients(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    coefficients: torch.Tensor,
    granularity: str,
    *,
    keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t lam_t(,l) tau_t per float key; non-float keys copied from pretrained.

    ``coefficients`` (T,) for ``granularity="task"``, (T, L) for ``"layer"``. Column j of a
    layer-wise tensor belongs to ``keys[j]`` (default: the float keys of ``pretrained`` in
    order); ``keys`` may be given in any order but must name each float key exactly once.
    """
    check_state_dict(pretrained, "pretrained")
    check_task_vectors(pretrained, task_vectors)
    float_keys = [k for k, v in pretrained.items() if is_float(v)]
    column = _columns(float_keys, keys)
    lam = _check_coefficients(coefficients, len(task_vectors), len(float_keys), granularity)
    out: dict[str, torch.Tensor] = {}
    for key, ref in pretrained.items():
        if not is_float(ref):
            out[key] = ref.clone()
            continue
        acc = ref.to(accumulation_dtype(ref.dtype), copy=True)
        for t, tv in enumerate(task_vectors):
            c = lam[t] if granularity == "task" else lam[t, column[key]]
            acc.add_(tv[key], alpha=float(c))
        out[key] = acc.to(ref.dtype)
    return out


def adamerging(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    encoder: nn.Module | None,
    heads: Sequence[torch.Tensor] | None,
    unlabeled: Sequence | None,
    *,
    granularity: str = "layer",
    ties: bool = False,
    density: float = 0.2,
    ties_keep_rule: str = "floor_plus_one",
    ties_zero_sign: str = "majority",
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 16,
    init: float = 0.3,
    logit_scale: float = 100.0,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    coefficients: torch.Tensor | AdaMergingResult | None = None,
    progress: bool = True,
    tol: float | None = None,
    window: int = 25,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients (or apply given ones) and return the merged model.

    ``encoder``: module whose ``state_dict()`` keys are the state dicts' keys, mapping
    prepared images (N, ...) to embeddings (N, D); it is copied, never modified.
    ``heads[t]``: (C_t, D) L2-normalised zero-shot head of task t.
    ``unlabeled[t]``: indexable by a LongTensor of indices and with ``len()``;
    ``prepare`` maps a sampled batch to the encoder's input (e.g. uint8 -> normalised
    float on ``device``); without it batches must already be float.
    ``ties_keep_rule``, ``ties_zero_sign``: the TIES conventions of ``ties_process``
    (``merging.ties``; defaults: the original TIES code's, as AdaMerging++ used).
    ``coefficients``: skip training and apply these ((T,) / (T, L) tensor, or a result from
    ``load_coefficients``, whose granularity and ties setting must match).
    ``tol``: stop before ``steps`` once the entropy has converged: the mean entropy of the
    last ``window`` steps is less than ``tol`` (relative) below that of the ``window`` before
    (``converged``); ``len(entropy_history)`` is the number of steps used. None: all steps.
    """
    check_pretrained_and_experts(pretrained, experts)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    density = check_density(density)
    float_keys = [k for k, v in pretrained.items() if is_float(v)]
    n_tasks = len(experts)
    given = _given_coefficients(coefficients, granularity, ties, float_keys)
    if given is not None:
        _check_coefficients(given, n_tasks, len(float_keys), granularity)
    else:
        _check_training_inputs(
            pretrained, n_tasks, encoder, heads, unlabeled, steps, lr, batch_size, init, logit_scale
        )

    vectors = compute_task_vectors(pretrained, experts)
    if ties:
        vectors = ties_process(vectors, density, keep_rule=ties_keep_rule, zero_sign=ties_zero_sign)

    history: list[float] = []
    if given is None:
        lam, history = _train(
            pretrained, vectors, float_keys, encoder, heads, unlabeled,
            granularity=granularity, steps=int(steps), lr=float(lr), batch_size=int(batch_size),
            init=float(init), logit_scale=float(logit_scale), prepare=prepare, seed=int(seed),
            device=device, progress=progress, tol=tol, window=int(window),
        )  # fmt: skip
    else:
        lam = given.detach().to("cpu", torch.float32).clone()
    merged = apply_adamerging_coefficients(pretrained, vectors, lam, granularity)
    return AdaMergingResult(
        state_dict=merged,
        coefficients=lam,
        keys=float_keys,
        entropy_history=history,
        granularity=granularity,
        ties=bool(ties),
        density=density if ties else None,
    )


def adamerging_pp(*args, **kwargs) -> AdaMergingResult:
    """AdaMerging++: ``adamerging(..., ties=True)`` (coefficients over TIES-processed vectors)."""
    if "ties" in kwargs and not kwargs["ties"]:
        raise ValueError(
            "adamerging_pp always uses TIES-processed vectors; call adamerging instead"
        )
    kwargs["ties"] = True
    return adamerging(*args, **kwargs)


def _train(
    pretrained: StateDict,
    vectors: list[dict[str, torch.Tensor]],
    float_keys: list[str],
    encoder: nn.Module,
    heads: Sequence[torch.Tensor],
    unlabeled: Sequence,
    *,
    granularity: str,
    steps: int,
    lr: float,
    batch_size: int,
    init: float,
    logit_scale: float,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None,
    seed: int,
    device: torch.device | str | None,
    progress: bool,
    tol: float | None = None,
    window: int = 25,
) -> tuple[torch.Tensor, list[float]]:
    from tqdm.auto import tqdm

    dev = torch.device(device) if device is not None else next(iter(pretrained.values())).device
    n_tasks = len(vectors)
    model = copy.deepcopy(encoder).to(dev).eval()
    model.requires_grad_(False)
    base = {k: v.to(dev) for k, v in pretrained.items()}
    # (T, *shape) per float key: the merge is one tensordot per key
    stacked = {k: torch.stack([tv[k] for tv in vectors]).to(dev) for k in float_keys}
    del vectors
    w_heads = [h.detach().to(dev, torch.float32) for h in heads]
    shape = (n_tasks,) if granularity == "task" else (n_tasks, len(float_keys))
    lam = torch.full(shape, init, device=dev, dtype=torch.float32).clamp_(0, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    samplers = [_EpochSampler(len(u), batch_size, gen) for u in unlabeled]

    history: list[float] = []
    bar = tqdm(range(steps), desc="AdaMerging", disable=not progress)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        params = dict(base)
        for j, key in enumerate(float_keys):
            c = lam if granularity == "task" else lam[:, j]
            tau = stacked[key]
            params[key] = base[key] + torch.tensordot(c.to(tau.dtype), tau, dims=1)
        total = 0.0
        for t in range(n_tasks):
            x = _prepare(unlabeled[t][samplers[t].next()], prepare, dev)
            z = functional_call(model, params, (x,))
            logits = logit_scale * F.normalize(z.float(), dim=-1) @ w_heads[t].T
            h = entropy(logits)
            (h / n_tasks).backward(retain_graph=t < n_tasks - 1)
            total += float(h.detach())
        optimizer.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
        history.append(total / n_tasks)
        bar.set_postfix(entropy=f"{history[-1]:.4f}")
        if tol is not None and converged(history, tol, window):
            break
    bar.close()
    return lam.detach().to("cpu"), history


def converged(history: Sequence[float], tol: float, window: int) -> bool:
    """The mean of the last ``window`` values is less than ``tol`` (relative) below the mean
    of the ``window`` before them (an entropy that stopped falling)."""
    if window < 1 or len(history) < 2 * window:
        return False
    last = sum(history[-window:]) / window
    before = sum(history[-2 * window : -window]) / window
    return before - last < tol * abs(before)


class _EpochSampler:
    """Batches of indices without replacement, reshuffled each epoch (seeded generator)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, min(batch_size, n), gen
        self.perm = torch.randperm(n, generator=gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx.sort().values


def _prepare(batch: torch.Tensor, prepare: Callable | None, dev: torch.device) -> torch.Tensor:
    if prepare is not None:
        return prepare(batch)
    if not (isinstance(batch, torch.Tensor) and batch.is_floating_point()):
        raise TypeError(
            f"unlabeled batches are {getattr(batch, 'dtype', type(batch).__name__)}, not float; "
            "pass prepare= to turn them into the encoder's input (e.g. uint8 -> normalised float)"
        )
    return batch.to(dev)


def _check_training_inputs(
    pretrained, n_tasks, encoder, heads, unlabeled, steps, lr, batch_size, init, logit_scale
) -> None:
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    enc_sd = encoder.state_dict()
    for key in pretrained:
        if key not in enc_sd:
            raise ValueError(f"encoder has no state-dict entry {key!r} (present in pretrained)")
        if enc_sd[key].shape != pretrained[key].shape:
            raise ValueError(
                f"encoder entry {key!r} has shape {tuple(enc_sd[key].shape)}, "
                f"pretrained has {tuple(pretrained[key].shape)}"
            )
    for key in enc_sd:
        if key not in pretrained:
            raise ValueError(f"encoder state-dict entry {key!r} is missing from pretrained")
    if heads is None or len(heads) != n_tasks:
        raise ValueError(
            f"need one head per expert ({n_tasks}), got {None if heads is None else len(heads)}"
        )
    for t, h in enumerate(heads):
        if not isinstance(h, torch.Tensor) or h.ndim != 2 or not h.is_floating_point():
            raise ValueError(
                f"heads[{t}] must be a float (C_t, D) tensor, got {getattr(h, 'shape', h)}"
            )
    if unlabeled is None or len(unlabeled) != n_tasks:
        raise ValueError(
            f"need one unlabeled set per expert ({n_tasks}), got {None if unlabeled is None else len(unlabeled)}"
        )
    for t, u in enumerate(unlabeled):
        if not hasattr(u, "__len__") or not hasattr(u, "__getitem__") or len(u) == 0:
            raise ValueError(f"unlabeled[{t}] must be a non-empty indexable set with len()")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_scale(lr, "lr", positive=True)
    check_scale(logit_scale, "logit_scale", positive=True)
    init = check_scale(init, "init")
    if not 0 <= init <= 1:
        raise ValueError(f"init must be in [0, 1] (coefficients are clamped there), got {init}")


def _columns(float_keys: list[str], keys: Sequence[str] | None) -> dict[str, int]:
    if keys is None:
        return {k: j for j, k in enumerate(float_keys)}
    keys = list(keys)
    if len(keys) != len(set(keys)) or set(keys) != set(float_keys):
        missing = sorted(set(float_keys) - set(keys))[:3]
        extra = sorted(set(keys) - set(float_keys))[:3]
        raise ValueError(
            "coefficient keys must name each floating-point key of pretrained exactly once "
            f"(missing e.g. {missing}, unknown e.g. {extra})"
        )
    return {k: j for j, k in enumerate(keys)}


def _check_coefficients(c: object, n_tasks: int, n_layers: int, granularity: str) -> torch.Tensor:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"coefficients must be a tensor, got {type(c).__name__}")
    want = (n_tasks,) if granularity == "task" else (n_tasks, n_layers)
    if tuple(c.shape) != want:
        raise ValueError(
            f"{granularity}-wise coefficients must have shape {want} "
            f"(tasks{'' if granularity == 'task' else ', float state-dict entries'}), got {tuple(c.shape)}"
        )
    if not torch.isfinite(c).all():
        raise ValueError("coefficients contain NaN or inf")
    return c.detach().cpu().double()


def _given_coefficients(
    coefficients: object, granularity: str, ties: bool, float_keys: list[str]
) -> torch.Tensor | None:
    if coefficients is None:
        return None
    if isinstance(coefficients, AdaMergingResult):
        r = coefficients
        if r.granularity != granularity or r.ties != bool(ties):
            raise ValueError(
                f"given coefficients were learned with granularity={r.granularity!r}, ties={r.ties}; "
                f"this call has granularity={granularity!r}, ties={bool(ties)}"
            )
        col = _columns(float_keys, r.keys)
        c = r.coefficients
        if granularity == "layer" and c.ndim == 2 and c.shape[1] == len(float_keys):
            c = c[:, [col[k] for k in float_keys]]  # reorder columns to pretrained's key order
        return c
    if not isinstance(coefficients, torch.Tensor):
        raise TypeError(
            f"coefficients must be a tensor or an AdaMergingResult, got {type(coefficients).__name__}"
        )
    return coefficients


def save_coefficients(path: str | os.PathLike, result: AdaMergingResult) -> None:
    """Write coefficients, layer keys, settings and entropy history to a safetensors file."""
    from safetensors.torch import save_file

    if not isinstance(result, AdaMergingResult):
        raise TypeError(f"result must be an AdaMergingResult, got {type(result).__name__}")
    path = Path(path)
    tensors = {
        "coefficients": result.coefficients.detach().cpu().contiguous(),
        "entropy_history": torch.tensor(result.entropy_history, dtype=torch.float64),
    }
    metadata = {
        "format": _FORMAT,
        "keys": json.dumps(list(result.keys)),
        "granularity": result.granularity,
        "ties": json.dumps(bool(result.ties)),
        "density": json.dumps(result.density),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_coefficients(path: str | os.PathLike) -> AdaMergingResult:
    """Read a file written by ``save_coefficients`` (``state_dict`` is None)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not an AdaMerging coefficients file (format {meta.get('format')!r})"
            )
        coefficients = f.get_tensor("coefficients")
        history = f.get_tensor("entropy_history").tolist()
    return AdaMergingResult(
        state_dict=None,
        coefficients=coefficients,
        keys=json.loads(meta["keys"]),
        entropy_history=history,
        granularity=meta["granularity"],
        ties=json.loads(meta["ties"]),
        density=json.loads(meta["density"]),
    )
