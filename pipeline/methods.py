"""Controllable methods scored by the preference sweep, behind one small interface.

A method has an offline stage (``fit``) and answers a batch of preferences with the test
accuracy of every task (``accuracies``). ReACT answers from cached merged-model features
and closed-form maps; model-producing baselines (preference-weighted Task Arithmetic,
Pareto Merging, MAP) build a model per preference and score it at the cost of its forward
passes (:func:`models_accuracies`). Adding a method = a class here (or in ``baselines``)
plus an entry in ``METHODS`` and a ``configs/methods/<name>.yaml``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import merging
from correction import react

from .codeversion import FEATURES, code_version
from .features import accuracy_from_features, pooled_token_only
from .stages import Context, ModelRef, long_results

PREF_CHUNK_BYTES = 1 << 30  # cap on the (P, N, D) corrected-feature block per step


class Method:
    """Interface. ``cost`` is filled by ``fit`` and ``accuracies`` for the cost table."""

    name = "method"
    controllable = True
    code: tuple[str, ...] = ()  # modules that compute its numbers (cache keys: codeversion)

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.cost = {
            "offline_seconds": 0.0,
            "query_seconds": 0.0,
            "queries": 0,
            "forward_passes": 0,
        }
        self.answered: dict[bytes, np.ndarray] = {}  # model-producing methods: p -> (T,) accuracies

    def fit(self, ctx: Context) -> None:  # offline, preference-independent stage
        pass

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:
        """(P, T) preferences -> (P, T) test accuracies. ``tasks``: indices of the tasks
        asked for (None: all); the other columns may be NaN (a method that builds a model
        per preference evaluates only those test sets)."""
        raise NotImplementedError

    def artifacts(self) -> dict[str, Path]:
        """Files of the offline stage worth naming in the run's artifacts.json."""
        return {}

    def material(self) -> dict:
        """What, besides the upstream keys, determines this method's numbers."""
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(self.cfg, resolve=True) if self.cfg is not None else None
        return {"name": self.name, "cfg": cfg, "code": self.code_version()}

    def code_version(self) -> str:
        """Version of the code behind this method's numbers: its modules and the feature
        extraction it reads (``pipeline.codeversion``)."""
        return code_version(*FEATURES, *self.code)


class ReACT(Method):
    """Closed-form representation correction (correction.react) on the merged model."""

    name = "react"
    code = ("correction.react", "pipeline.methods")

    def fit(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        c = ctx.cfg.correction
        split = "test" if ctx.cfg.calibration.source == "test" else "val"
        material = {
            "merged": ctx.merged.key,
            "calibration": {t: ctx.calibration[t].tolist() for t in ctx.tasks},
            "split": split,
            "correction": {k: c[k] for k in ("beta", "reduction", "normalize_features")},
            "code": self.code_version(),
        }
        passes = 0

        def compute(out: Path):
            nonlocal passes
            stats = []
            for task in ctx.tasks:
                idx = ctx.calibration[task]
                z_m = ctx.features(ctx.merged, task, split, idx)
                z_e = ctx.features(ctx.expert_ref(task), task, split, idx)
                passes += 2 * len(idx)
                stats.append(
                    react.task_statistics(
                        z_m,
                        z_e,
                        beta=float(c.beta),
                        reduction=c.reduction,
                        normalize_features=bool(c.normalize_features),
                        task=task,
                    )
                )
            react.save_statistics(stats, out / "statistics.safetensors", task_names=ctx.tasks)

        unit = ctx.cache.unit("statistics", material, compute)
        self.stats_path = unit.file("statistics.safetensors")
        self.stats = _as_list(react.load_statistics(self.stats_path))
        self.cost["offline_seconds"] += time.perf_counter() - t0
        self.cost["forward_passes"] += passes

    def artifacts(self) -> dict[str, Path]:
        return {"statistics": self.stats_path}

    def maps(self, prefs: np.ndarray) -> torch.Tensor:
        p = torch.as_tensor(prefs, dtype=torch.float64)
        return react.preference_map(
            self.stats, p, aggregation=self.cfg.aggregation, dtype=torch.float32
        )

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.full((len(prefs), len(ctx.tasks)), np.nan)
        test = []  # per asked task: its index, merged test features, labels, head (on the device)
        for j in _asked(ctx, tasks):
            task = ctx.tasks[j]
            z = ctx.features(ctx.merged, task, "test").to(ctx.device)
            if self.cfg.normalize_features:
                z = torch.nn.functional.normalize(z, dim=-1)
            test.append(
                (j, z, ctx.labels(task, "test").to(ctx.device), ctx.heads[task].to(ctx.device))
            )
        chunk = max(1, PREF_CHUNK_BYTES // (4 * max(z.numel() for _, z, _, _ in test)))
        for s in range(0, len(prefs), chunk):
            W = self.maps(prefs[s : s + chunk]).to(ctx.device)  # one solve per preference
            for j, z, y, head in test:
                corrected = react.apply(W, z)  # (P, N, D)
                out[s : s + chunk, j] = (
                    accuracy_from_features(corrected, head, y, ctx.suite.logit_scale).cpu().numpy()
                )
        self.cost["query_seconds"] += time.perf_counter() - t0
        self.cost["queries"] += len(prefs)
        return out


class PreferenceTaskArithmetic(Method):
    """theta_0 + scale * sum_k (T p_k) tau_k: one merged model per preference."""

    name = "pref_ta"
    code = ("pipeline.methods", "merging.task_arithmetic", "merging._checks")

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:
        t0 = time.perf_counter()
        pre, experts = ctx.task_vector_inputs
        out = preference_models_accuracies(
            ctx,
            self,
            prefs,
            lambda p: merging.preference_task_arithmetic(
                pre, experts, p.tolist(), scale=self.cfg.scale
            ),
            tasks,
        )
        self.cost["query_seconds"] += time.perf_counter() - t0
        self.cost["queries"] += len(prefs)
        self.cost["forward_passes"] = ctx.forward_passes.get(self.name, 0)
        return out


def preference_models_accuracies(
    ctx: Context,
    method: Method,
    prefs: np.ndarray,
    state_of: Callable[[np.ndarray], dict],
    tasks: list[int] | None = None,
) -> np.ndarray:
    """(P, T) accuracies of the model ``state_of(p)`` of each preference on the ``tasks``
    asked for (indices; None: all; NaN elsewhere), through :func:`models_accuracies`. What
    the method already answered in this run is not built and evaluated again (the sets
    share points: one-hot = the grid's vertices, equal = its centroid, the pairwise sweeps'
    ends = one-hot; the same preference gives the same model): a preference is evaluated
    only on the asked tasks it has no accuracy for yet. The answers are kept on the method
    (``method.answered``: preference -> (T,) accuracies, NaN where not evaluated). The
    "preference" is whatever vector determines the model (MAP passes its chosen scalings)."""
    T = len(ctx.tasks)
    asked = _asked(ctx, tasks)
    keys = [np.round(p, 12).tobytes() for p in prefs]
    todo: dict[tuple[int, ...], dict[bytes, np.ndarray]] = {}  # missing tasks -> preferences
    for k, p in dict(zip(keys, prefs, strict=True)).items():  # each preference once
        known = method.answered.get(k)
        missing = tuple(j for j in asked if known is None or np.isnan(known[j]))
        if missing:
            todo.setdefault(missing, {})[k] = p
    for missing, group in todo.items():
        rows = models_accuracies(
            ctx, (state_of(p) for p in group.values()), method.name, tasks=list(missing)
        )
        for k, row in zip(group, rows, strict=True):
            old = method.answered.get(k, np.full(T, np.nan))
            method.answered[k] = np.where(np.isnan(row), old, row)
    return np.array([method.answered[k] for k in keys]).reshape(-1, T)


@torch.no_grad()
def models_accuracies(
    ctx: Context,
    states: Iterable[dict[str, torch.Tensor]],
    label: str,
    split: str = "test",
    tasks: list[int] | None = None,
) -> np.ndarray:
    """(P, T) accuracy on each asked task's ``split`` (``tasks``: indices, None: all; NaN
    elsewhere) of each model in ``states`` (image-tower state
    dicts, e.g. one per preference), at the cost of its forward passes: the weights go straight
    into ``torch.func.functional_call`` (no module copy, no per-model feature unit; the sweep
    unit caches the accuracies), the same batches and precision as ``Context.features``. Each
    model advances the running preference bar (``ctx.bar``)."""
    from torch.func import functional_call

    visual = ctx.visual().to(ctx.device).eval()
    amp = bool(ctx.cfg.autocast) and ctx.device.type == "cuda"
    bs = int(ctx.cfg.batch_size)
    data = []  # per asked task: its index, images, labels (on the device), head
    for j in _asked(ctx, tasks):
        t = ctx.tasks[j]
        data.append(
            (j, ctx.suite.split(t, split)[0], ctx.labels(t, split).to(ctx.device), ctx.heads[t])
        )

    def row(state: dict[str, torch.Tensor]) -> np.ndarray:
        params = {k: v.to(ctx.device) for k, v in state.items()}
        out = np.full(len(ctx.tasks), np.nan)
        for j, images, y, head in data:
            z = []
            for s in range(0, len(images), bs):
                x = torch.from_numpy(np.array(images[s : s + bs])).to(ctx.device)  # writable copy
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                    z.append(functional_call(visual, params, (ctx.suite.preprocess(x),)).float())
            z = torch.cat(z)
            if not torch.isfinite(z).all():
                raise FloatingPointError(
                    f"{label} | {ctx.tasks[j]}/{split}: non-finite embeddings; the model "
                    "weights are probably broken (check the merge / checkpoint)"
                )
            out[j] = float(accuracy_from_features(z, head.to(z.device), y, ctx.suite.logit_scale))
            ctx.forward_passes[label] = ctx.forward_passes.get(label, 0) + len(images)
        ctx.advance(1)
        return out

    with pooled_token_only(visual):  # the embedding is the class token: skip the rest
        rows = [row(state) for state in states]
    return np.array(rows, dtype=np.float64).reshape(-1, len(ctx.tasks))


def _asked(ctx: Context, tasks: list[int] | None) -> list[int]:
    """Task indices a method is asked for: ``tasks``, or every task when None."""
    return list(range(len(ctx.tasks))) if tasks is None else [int(j) for j in tasks]


def model_accuracies(ctx: Context, ref: ModelRef, split: str = "test") -> np.ndarray:
    """Accuracy of one model on every task's ``split`` (features cached per model key)."""
    return np.array([ctx.accuracy(ctx.features(ref, t, split), t, split) for t in ctx.tasks])


def reference_accuracies(ctx: Context) -> pd.DataFrame:
    """Test accuracy of the fixed models: pretrained, merged, and each expert on its own task
    (3T feature units, one progress bar)."""
    rows = []
    with ctx.feature_bar("features", 3 * len(ctx.tasks)):
        for label, ref in (
            ("pretrained", ctx.pretrained_ref()),
            (f"merged ({ctx.cfg.merge.name})", ctx.merged),
        ):
            accs = model_accuracies(ctx, ref)
            rows += [(label, t, float(a)) for t, a in zip(ctx.tasks, accs, strict=True)]
        rows += [
            ("expert", t, ctx.accuracy(ctx.features(ctx.expert_ref(t), t, "test"), t))
            for t in ctx.tasks
        ]
    df = pd.DataFrame(rows, columns=["label", "task", "accuracy"])
    expert = df[df.label == "expert"].set_index("task").accuracy
    df["normalized_accuracy"] = df.accuracy / df.task.map(expert)
    return df


def sweep(
    ctx: Context,
    method: Method,
    set_name: str,
    p: np.ndarray,
    reference: pd.DataFrame,
    scored: list[str] | None = None,
) -> pd.DataFrame:
    """Accuracies of one method over one preference set on the tasks it is ``scored`` on
    (None: all; ``pipeline.evaluate.scored_tasks``; rows of the other tasks are left out):
    a cache unit (results.parquet); normalised by the experts' accuracies in ``reference``."""
    expert_acc = {r.task: r.accuracy for r in reference[reference.label == "expert"].itertuples()}
    scored = list(ctx.tasks) if scored is None else list(scored)
    material = {
        "method": method.material(),
        "merged": ctx.merged.key,
        "calibration": {t: ctx.calibration[t].tolist() for t in ctx.tasks},
        "calibration_source": ctx.cfg.calibration.source,
        "preferences": np.round(p, 12).tolist(),
        "set": set_name,
        "scored": scored,
        "code": code_version("pipeline.methods", *FEATURES),  # this function's own code
    }

    def compute(out: Path):
        acc = method.accuracies(ctx, p, [ctx.tasks.index(t) for t in scored])
        df = long_results(method.name, set_name, acc, ctx.tasks, expert_acc)
        df = df[df.task.isin(scored)].reset_index(drop=True)
        if df.accuracy.isna().any():
            raise RuntimeError(f"{method.name} | {set_name}: no accuracy for a scored task")
        df.to_parquet(out / "results.parquet", index=False)

    before = ctx.bar.n if ctx.bar is not None else 0
    unit = ctx.cache.unit("sweep", material, compute)
    if ctx.bar is not None:  # a cached set, or a method that does not advance the bar itself
        ctx.advance(len(p) - (ctx.bar.n - before))
    return pd.read_parquet(unit.file("results.parquet"))


def _as_list(loaded):
    """load_statistics may return the list or (list, names)."""
    if isinstance(loaded, tuple):
        return loaded[0]
    return loaded


METHODS: dict[str, type[Method]] = {"react": ReACT, "pref_ta": PreferenceTaskArithmetic}


def register(name: str, cls: type[Method]) -> None:
    METHODS[name] = cls


def build_method(name: str, cfg) -> Method:
    _load_baselines()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)} (methods=[...])")
    return METHODS[name](cfg)


def _load_baselines() -> None:
    """Baselines register themselves on import (kept optional so the core has no cycle)."""
    try:
        import baselines  # noqa: F401
    except ModuleNotFoundError as e:  # only a missing package is optional; its own bugs surface
        if e.name != "baselines":
            raise
