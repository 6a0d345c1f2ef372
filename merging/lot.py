"""LOT Merging (Sun et al., arXiv 2505.23859): layer-wise optimal task vector merging.

Each parameter "unit" gets the merged task vector T* that minimises the drift of the
unit's output from every expert's output, measured on the expert's own inputs
(X_k: the unit's inputs during expert k's forward pass on task k's exemplars):

    T* = argmin_T  sum_k || unit(X_k; T) - unit(X_k; T_k) ||^2,   T_k = theta_k - theta_0

Closed forms (G_k = X_k^T X_k, rows = samples/tokens):
- linear weight W (out x in, y = x W^T):  T* = (sum_k T_k G_k)(sum_k G_k)^+
  (pseudo-inverse via a symmetric eigendecomposition, so rank-deficient sums are fine:
  T* is the minimum-norm minimiser). Units: ``nn.Linear`` weights; the Q, K and V blocks
  of ``nn.MultiheadAttention.in_proj_weight`` (each with its own input: query, key,
  value); ``out_proj.weight`` (its input, the attention output before out_proj, is
  recomputed from the MHA's inputs because MHA never calls its out_proj module);
  ``nn.Conv2d`` weights (groups=1) as linear maps on unfolded patches, W reshaped to
  (out, in*kh*kw); a bare 2-D ``proj`` parameter used as ``pooled @ proj`` by a module with
  a ``_pool`` method (open_clip's VisionTransformer), solved in transposed layout.
- bias, norm shift: sample-weighted mean  T* = sum_k n_k T_k / sum_k n_k  (n_k input rows).
- norm scale (LayerNorm weight), per dimension d:
  T*[d] = sum_k e_k[d] T_k[d] / sum_k e_k[d],  e_k[d] = sum over rows of xhat_k[:, d]^2,
  xhat the LayerNorm's normalised (pre-affine) input.
- everything else (class/positional embeddings, ...): mean of the task vectors.
Result: theta_0 + scale * T* (scale 1.2 for ViT-B/32, 1.5 for ViT-L/14 in the paper).

Statistics are accumulated as Gram matrices (float64) batch by batch, so memory does not
grow with the number of exemplars.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ._checks import (
    StateDict,
    check_pretrained_and_experts,
    check_scale,
    is_float,
)

Emit = Callable[[tuple[str, ...], torch.Tensor], None]


@dataclass(frozen=True)
class Unit:
    """One LOT unit: a state-dict key (or a row block of it) and where its input comes from.

    kind: "linear" | "bias" | "norm_scale" | "norm_shift".
    rows: [start, stop) block of the tensor's first dimension (Q/K/V parts), None = all.
    layout: "out_in" (weight reshaped to (out, -1), y = x W^T) or "in_out" (y = x P).
    """

    key: str
    kind: str
    source: str
    rows: tuple[int, int] | None = None
    layout: str = "out_in"


# ----------------------------------------------------------------------------- closed forms


def pinv_psd(b: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (eigenvalues <= rcond * max dropped).

    rcond None: max(shape) * machine epsilon of the dtype (numpy/torch convention).
    """
    if rcond is None:
        rcond = b.shape[-1] * torch.finfo(b.dtype).eps
    w, v = torch.linalg.eigh(b)
    cutoff = rcond * w.abs().max().clamp(min=torch.finfo(b.dtype).tiny)
    inv = torch.where(w > cutoff, 1.0 / w, torch.zeros_like(w))
    return (v * inv) @ v.T


def linear_closed_form(
    task_vectors: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], rcond: float | None = None
) -> torch.Tensor:
    """T* = (sum_k T_k G_k)(sum_k G_k)^+ for T_k (out x in) and G_k = X_k^T X_k (in x in)."""
    a = sum(t.double() @ g.double() for t, g in zip(task_vectors, grams, strict=True))
    b = sum(g.double() for g in grams)
    return a @ pinv_psd(b, rcond)


def norm_scale_closed_form(
    task_vectors: Sequence[torch.Tensor], energies: Sequence[torch.Tensor]
) -> torch.Tensor:
    """T*[d] = sum_k e_k[d] T_k[d] / sum_k e_k[d] (plain mean where sum_k e_k[d] = 0)."""
    num = sum(e.double() * t.double() for t, e in zip(task_vectors, energies, strict=True))
    den = sum(e.double() for e in energies)
    mean = sum(t.double() for t in task_vectors) / len(task_vectors)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny), mean)


def weighted_mean(task_vectors: Sequence[torch.Tensor], counts: Sequence[float]) -> torch.Tensor:
    """sum_k n_k T_k / sum_k n_k (the bias / norm-shift rule)."""
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total count")
    return sum(n * t.double() for t, n in zip(task_vectors, counts, strict=True)) / total


# ----------------------------------------------------------------------------- unit discovery

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def lot_units(encoder: nn.Module, keys: Sequence[str] | None = None) -> list[Unit]:
    """The LOT units of ``encoder`` (restricted to ``keys`` when given, e.g. float keys)."""
    units, _ = _discover(encoder, set(keys) if keys is not None else None)
    return units


def _discover(model: nn.Module, keys: set[str] | None) -> tuple[list[Unit], list[tuple]]:
    """Units and hook specs (module name, module, kind) for the recorder."""
    units: list[Unit] = []
    hooks: list[tuple] = []
    skip: set[int] = set()
    params = dict(model.named_parameters(remove_duplicate=False))

    def has(key: str) -> bool:
        return key in params and (keys is None or key in keys)

    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        if id(mod) in skip:
            continue
        if isinstance(mod, nn.MultiheadAttention):
            e = mod.embed_dim
            src = {r: f"{name}[{r}]" for r in ("query", "key", "value")}
            blocks = {"query": (0, e), "key": (e, 2 * e), "value": (2 * e, 3 * e)}
            if mod._qkv_same_embed_dim and has(p + "in_proj_weight"):
                units += [Unit(p + "in_proj_weight", "linear", src[r], blocks[r]) for r in src]
            elif not mod._qkv_same_embed_dim:
                for r, w in (
                    ("query", "q_proj_weight"),
                    ("key", "k_proj_weight"),
                    ("value", "v_proj_weight"),
                ):
                    if has(p + w):
                        units.append(Unit(p + w, "linear", src[r]))
            if mod.in_proj_bias is not None and has(p + "in_proj_bias"):
                units += [Unit(p + "in_proj_bias", "bias", src[r], blocks[r]) for r in src]
            out_src = f"{name}[out_proj_input]"
            if has(p + "out_proj.weight"):
                units.append(Unit(p + "out_proj.weight", "linear", out_src))
            if mod.out_proj.bias is not None and has(p + "out_proj.bias"):
                units.append(Unit(p + "out_proj.bias", "bias", out_src))
            skip.add(id(mod.out_proj))
            hooks.append((name, mod, "mha"))
        elif isinstance(mod, nn.Linear):
            if has(p + "weight"):
                units.append(Unit(p + "weight", "linear", name))
            if mod.bias is not None and has(p + "bias"):
                units.append(Unit(p + "bias", "bias", name))
            hooks.append((name, mod, "linear"))
        elif (
            isinstance(mod, nn.Conv2d)
            and mod.groups == 1
            and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        ):
            if has(p + "weight"):
                units.append(Unit(p + "weight", "linear", name))
            if mod.bias is not None and has(p + "bias"):
                units.append(Unit(p + "bias", "bias", name))
            hooks.append((name, mod, "conv2d"))
        elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            if has(p + "weight"):
                units.append(Unit(p + "weight", "norm_scale", name))
            if mod.bias is not None and has(p + "bias"):
                units.append(Unit(p + "bias", "norm_shift", name))
            hooks.append((name, mod, "layernorm"))
        proj = mod._parameters.get("proj") if hasattr(mod, "_parameters") else None
        if (
            proj is not None
            and proj.ndim == 2
            and callable(getattr(mod, "_pool", None))
            and has(p + "proj")
        ):
            units.append(Unit(p + "proj", "linear", p + "proj", layout="in_out"))
            hooks.append((name, mod, "pool"))
    return units, hooks


def _install(hooks: list[tuple], emit: Emit) -> list[Callable[[], None]]:
    """Register the recorder's hooks; returns functions that remove them."""
    removers: list[Callable[[], None]] = []
    for name, mod, kind in hooks:
        p = f"{name}." if name else ""
        if kind == "linear":
            removers.append(mod.register_forward_pre_hook(_linear_hook(name, emit)).remove)
        elif kind == "conv2d":
            removers.append(mod.register_forward_pre_hook(_conv_hook(name, emit)).remove)
        elif kind == "layernorm":
            removers.append(mod.register_forward_pre_hook(_layernorm_hook(name, emit)).remove)
        elif kind == "mha":
            h = mod.register_forward_hook(_mha_hook(name, emit), with_kwargs=True)
            removers.append(h.remove)
        elif kind == "pool":
            original = mod._pool

            def pool(x, _orig=original, _src=p + "proj"):
                pooled, tokens = _orig(x)
                emit((_src,), pooled.reshape(-1, pooled.shape[-1]))
                return pooled, tokens

            mod._pool = pool
            removers.append(lambda m=mod: m.__dict__.pop("_pool", None))
    return removers


def _linear_hook(name: str, emit: Emit):
    def hook(mod, args):
        x = args[0]
        emit((name,), x.reshape(-1, x.shape[-1]))

    return hook


def _conv_hook(name: str, emit: Emit):
    def hook(mod, args):
        x = args[0]
        if x.ndim == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(
            x, mod.kernel_size, mod.dilation, mod.padding, mod.stride
        )  # (N, C*kh*kw, L)
        emit((name,), cols.transpose(1, 2).reshape(-1, cols.shape[1]))

    return hook


def _layernorm_hook(name: str, emit: Emit):
    def hook(mod, args):
        x = args[0]
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        emit((name,), xhat.reshape(-1, math.prod(mod.normalized_shape)))

    return hook


def _mha_hook(name: str, emit: Emit):
    """Record query/key/value inputs and the attention output before out_proj.

    nn.MultiheadAttention applies out_proj inside F.multi_head_attention_forward without
    calling the module, so the out_proj input is recomputed with an identity out_proj.
    """

    def hook(mod, args, kwargs, output):
        b = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
        b.apply_defaults()
        q, k, v = b.arguments["query"], b.arguments["key"], b.arguments["value"]
        srcs = {r: f"{name}[{r}]" for r in ("query", "key", "value")}
        if q is k and k is v:
            emit((srcs["query"], srcs["key"], srcs["value"]), q.reshape(-1, q.shape[-1]))
        else:
            emit((srcs["query"],), q.reshape(-1, q.shape[-1]))
            if k is v:
                emit((srcs["key"], srcs["value"]), k.reshape(-1, k.shape[-1]))
            else:
                emit((srcs["key"],), k.reshape(-1, k.shape[-1]))
                emit((srcs["value"],), v.reshape(-1, v.shape[-1]))
        batched = q.dim() == 3
        if mod.batch_first and batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        e = mod.embed_dim
        eye = torch.eye(e, dtype=q.dtype, device=q.device)
        attn, _ = F.multi_head_attention_forward(
            q, k, v, e, mod.num_heads, mod.in_proj_weight, mod.in_proj_bias,
            mod.bias_k, mod.bias_v, mod.add_zero_attn, 0.0, eye, None,
            training=False,
            key_padding_mask=b.arguments["key_padding_mask"],
            need_weights=False,
            attn_mask=b.arguments["attn_mask"],
            use_separate_proj_weight=not mod._qkv_same_embed_dim,
            q_proj_weight=mod.q_proj_weight,
            k_proj_weight=mod.k_proj_weight,
            v_proj_weight=mod.v_proj_weight,
            average_attn_weights=b.arguments["average_attn_weights"],
            is_causal=b.arguments["is_causal"],
        )  # fmt: skip
        if mod.batch_first and batched:
            attn = attn.transpose(0, 1)
        emit((f"{name}[out_proj_input]",), attn.reshape(-1, e))

    return hook


# ----------------------------------------------------------------------------- recording


def layer_inputs(
    encoder: nn.Module, state_dict: StateDict, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every LOT source's input rows during ``encoder``'s forward on ``x`` with ``state_dict``.

    Keys are source names (``Unit.source``); LayerNorm sources hold the normalised
    (pre-affine) inputs. For inspection and tests: this keeps all activations.
    """
    model = copy.deepcopy(encoder).eval()
    _, hooks = _discover(model, None)
    rows: dict[str, list[torch.Tensor]] = {}

    def emit(srcs: tuple[str, ...], r: torch.Tensor) -> None:
        for s in srcs:
            rows.setdefault(s, []).append(r.detach().clone())

    removers = _install(hooks, emit)
    try:
        with torch.no_grad():
            functional_call(model, dict(state_dict), (x,))
    finally:
        for remove in removers:
            remove()
    return {s: torch.cat(r) for s, r in rows.items()}


class _TaskStatistics:
    """Per-source row counts and Gram matrices (linear) or squared-norm energies (norm)."""

    def __init__(self, kinds: dict[str, str]):
        self.kinds = kinds
        self.count: dict[str, int] = {}
        self.stat: dict[str, torch.Tensor] = {}

    def emit(self, srcs: tuple[str, ...], rows: torch.Tensor) -> None:
        srcs = tuple(s for s in srcs if s in self.kinds)
        if not srcs:
            return
        kind = self.kinds[srcs[0]]
        s = None
        if kind != "count":
            r = rows.detach().to(torch.float64)
            s = r.T @ r if kind == "gram" else (r * r).sum(dim=0)
        for src in srcs:
            self.count[src] = self.count.get(src, 0) + rows.shape[0]
            if s is not None:
                self.stat[src] = self.stat[src] + s if src in self.stat else s


def _source_kinds(units: list[Unit]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for u in units:
        if u.kind == "linear":
            kinds[u.source] = "gram"
        elif u.kind == "norm_scale":
            kinds[u.source] = "energy"
        else:
            kinds.setdefault(u.source, "count")
    return kinds


def _unit_view(t: torch.Tensor, u: Unit) -> torch.Tensor:
    """The unit's part of a (task-vector) tensor, as float64; linear units as (out, in)."""
    t = t.double()
    if u.rows is not None:
        t = t[u.rows[0] : u.rows[1]]
    if u.kind == "linear":
        return t.T if u.layout == "in_out" else t.reshape(t.shape[0], -1)
    return t.reshape(-1)


# ----------------------------------------------------------------------------- the merge


def lot_merging(
    pretrained: StateDict,
    experts: Sequence[StateDict],
    encoder: nn.Module,
    exemplars: Sequence[torch.Tensor],
    *,
    scale: float = 1.2,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rcond: float | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """LOT Merging: theta_0 + scale * T*, T* the per-unit drift minimiser (module docstring).

    ``encoder``: module whose ``state_dict()`` keys are the state dicts' keys (copied, never
    modified). ``exemplars[k]``: task k's exemplar images (sliceable, with len()), fed in
    batches of ``batch_size`` through ``prepare`` (e.g. uint8 -> normalised float on
    ``device``) to the encoder loaded with expert k's weights. ``rcond``: relative
    eigenvalue cutoff of the pseudo-inverse (default max(in) * eps of float64).
    """
    from tqdm.auto import tqdm

    check_pretrained_and_experts(pretrained, experts)
    scale = check_scale(scale, "scale")
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    _check_encoder_keys(encoder, pretrained)
    n_tasks = len(experts)
    if exemplars is None or len(exemplars) != n_tasks:
        raise ValueError(
            f"need one exemplar set per expert ({n_tasks}), got {None if exemplars is None else len(exemplars)}"
        )
    for k, ex in enumerate(exemplars):
        if not hasattr(ex, "__len__") or len(ex) == 0:
            raise ValueError(f"exemplars[{k}] must be a non-empty batch of images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if rcond is not None:
        rcond = check_scale(rcond, "rcond")
        if rcond < 0:
            raise ValueError(f"rcond must be >= 0, got {rcond}")

    dev = torch.device(device) if device is not None else next(iter(pretrained.values())).device
    model = copy.deepcopy(encoder).to(dev).eval()
    model.requires_grad_(False)
    float_keys = [k for k, v in pretrained.items() if is_float(v)]
    units, hooks = _discover(model, set(float_keys))
    kinds = _source_kinds(units)
    base = {k: v.to(dev) for k, v in pretrained.items()}

    num: dict[Unit, torch.Tensor] = {}  # linear: sum_k T_k G_k; others: weighted sums
    den: dict[Unit, torch.Tensor | float] = {}  # norm_scale: sum_k e_k; bias: sum_k n_k
    gram_sum: dict[str, torch.Tensor] = {}  # per source: sum_k G_k
    other_sum: dict[str, torch.Tensor] = {}
    unit_keys = {u.key for u in units}

    for k in tqdm(range(n_tasks), desc="LOT: recording experts", disable=not progress):
        params = {key: v.to(dev) for key, v in experts[k].items()}
        stats = _TaskStatistics(kinds)
        removers = _install(hooks, stats.emit)
        try:
            with torch.no_grad():
                ex = exemplars[k]
                for i in range(0, len(ex), batch_size):
                    x = _prepare(ex[i : i + batch_size], prepare, dev)
                    functional_call(model, params, (x,))
        finally:
            for remove in removers:
                remove()
        with torch.no_grad():
            for src, kind in kinds.items():
                if kind == "gram" and src in stats.stat:
                    g = stats.stat[src]
                    gram_sum[src] = gram_sum[src] + g if src in gram_sum else g
            for u in units:
                if u.source not in stats.count:
                    continue
                t = _unit_view(params[u.key] - base[u.key], u)
                if u.kind == "linear":
                    contrib, weight = t @ stats.stat[u.source], None
                elif u.kind == "norm_scale":
                    contrib, weight = stats.stat[u.source] * t, stats.stat[u.source]
                else:
                    n = float(stats.count[u.source])
                    contrib, weight = n * t, n
                num[u] = num[u] + contrib if u in num else contrib
                if weight is not None:
                    den[u] = den[u] + weight if u in den else weight
            for key in float_keys:
                if key not in unit_keys:
                    t = (params[key] - base[key]).double()
                    other_sum[key] = other_sum[key] + t if key in other_sum else t
        del params, stats

    merged_tv = _solve(units, num, den, gram_sum, experts, base, dev, rcond, progress)
    out: dict[str, torch.Tensor] = {}
    for key, ref in pretrained.items():
        if not is_float(ref):
            out[key] = ref.clone()
            continue
        tv = merged_tv[key] if key in merged_tv else other_sum[key] / n_tasks
        out[key] = (base[key].double() + scale * tv).to(ref.dtype).to(ref.device)
    return out


def _solve(
    units, num, den, gram_sum, experts, base, dev, rcond, progress
) -> dict[str, torch.Tensor]:
    """Assemble T* per key from the accumulated statistics (pinv once per input source)."""
    from tqdm.auto import tqdm

    merged: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    by_source: dict[str, list[Unit]] = {}
    for u in units:
        by_source.setdefault(u.source, []).append(u)

    def put(u: Unit, value: torch.Tensor) -> None:
        if u.key not in merged:
            merged[u.key] = torch.zeros(base[u.key].shape, dtype=torch.float64, device=dev)
        target = merged[u.key]
        if u.rows is not None:
            target = target[u.rows[0] : u.rows[1]]
        if u.kind == "linear" and u.layout == "in_out":
            value = value.T
        target.copy_(value.reshape(target.shape))

    with torch.no_grad():
        for src, group in tqdm(by_source.items(), desc="LOT: solving", disable=not progress):
            pinv = None
            for u in group:
                if u not in num:  # the source never ran: fall back to the mean task vector
                    missing.append(u.key)
                    mean = sum(_unit_view(e[u.key].to(dev) - base[u.key], u) for e in experts)
                    put(u, mean / len(experts))
                elif u.kind == "linear":
                    if pinv is None:
                        pinv = pinv_psd(gram_sum[src], rcond)
                    put(u, num[u] @ pinv)
                elif u.kind == "norm_scale":
                    d = den[u]
                    mean = sum(_unit_view(e[u.key].to(dev) - base[u.key], u) for e in experts)
                    mean = mean / len(experts)
                    value = torch.where(
                        d > 0, num[u] / d.clamp(min=torch.finfo(d.dtype).tiny), mean
                    )
                    put(u, value)
                else:
                    put(u, num[u] / den[u])
            del pinv
    if missing:
        warnings.warn(
            f"LOT: no inputs were recorded for {sorted(set(missing))[:5]} "
            f"({len(set(missing))} keys); used the mean task vector there",
            stacklevel=3,
        )
    return merged


def _prepare(batch: torch.Tensor, prepare: Callable | None, dev: torch.device) -> torch.Tensor:
    if prepare is not None:
        return prepare(batch)
    if not (isinstance(batch, torch.Tensor) and batch.is_floating_point()):
        raise TypeError(
            f"exemplar batches are {getattr(batch, 'dtype', type(batch).__name__)}, not float; "
            "pass prepare= to turn them into the encoder's input (e.g. uint8 -> normalised float)"
        )
    return batch.to(dev)


def _check_encoder_keys(encoder: nn.Module, pretrained: StateDict) -> None:
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
