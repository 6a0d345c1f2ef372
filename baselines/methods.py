"""Pipeline adapters: the baselines as ``pipeline.methods.Method``s (registered on import).

Each offline stage is one cache unit keyed by what determines it (base merge / suite key,
the baseline's config, the calibration indices), so a second run skips the training and
only answers preferences. Cost accounting (``Method.cost``): ``offline_seconds`` is the wall
time of ``fit`` in this run (a cache hit makes it small), ``forward_passes`` counts images
through the encoder when they were actually computed (training steps, uncached features).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import merging
from pipeline.merge import IndexedImages
from pipeline.methods import Method, models_accuracies, preference_models_accuracies, register
from pipeline.stages import Context, calibration_split
from pipeline.suite import normalize_images

from . import map as map_lib
from . import pareto_merging as pm
from . import surgery as surgery_lib


def _cfg(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _calibrated_material(ctx: Context, method: Method, **extra) -> dict:
    """Cache-key material of an offline stage trained on the base merge's calibration data."""
    return {
        "merged": ctx.merged.key,
        "calibration": {t: ctx.calibration[t].tolist() for t in ctx.tasks},
        "split": calibration_split(ctx.cfg.calibration.source),
        "cfg": _cfg(method.cfg),
        **extra,
        "code": method.code_version(),
    }


class ParetoMerging(Method):
    """Base merge + preference-conditioned low-rank updates (``baselines.pareto_merging``)."""

    name = "pareto_merging"
    code = ("baselines.pareto_merging", "baselines.methods", "merging.adamerging")

    def fit(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        c = self.cfg
        split = calibration_split(ctx.cfg.calibration.source)
        # training is not bit-equal across devices
        material = _calibrated_material(ctx, self, device_type=ctx.device.type)
        dev, suite = ctx.device, ctx.suite

        def compute(out: Path):
            base = ctx.merged.state()
            images = [
                IndexedImages(np.ascontiguousarray(suite.split(t, split)[0][ctx.calibration[t]]))
                for t in ctx.tasks
            ]
            factors = pm.init_factors(base, len(ctx.tasks), int(c.rank), seed=int(c.seed))
            factors = pm.train_factors(
                base, factors, ctx.visual(), [ctx.heads[t] for t in ctx.tasks], images,
                steps=int(c.steps), lr=float(c.lr), batch_size=int(c.batch_size), logit_scale=suite.logit_scale,
                prepare=lambda b: normalize_images(b.to(dev), suite.mean, suite.std),
                seed=int(c.seed), device=dev, progress=ctx.progress,
            )  # fmt: skip
            pm.save_factors(out / "factors.safetensors", factors)
            passes = int(c.steps) * sum(min(int(c.batch_size), len(im)) for im in images)
            self.cost["forward_passes"] += passes
            return {
                "forward_passes": passes,
                "parameters": factors.num_parameters(),
                "entropy_first": factors.history[0] if factors.history else None,
                "entropy_last": factors.history[-1] if factors.history else None,
            }

        unit = ctx.cache.unit("pareto_merging", material, compute)
        self.key = unit.key
        self.factors = pm.load_factors(unit.file("factors.safetensors"))
        self._offline_passes = self.cost["forward_passes"]
        self.cost["offline_seconds"] += time.perf_counter() - t0

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:
        t0 = time.perf_counter()
        base = ctx.merged.state()
        out = preference_models_accuracies(
            ctx, self, prefs, lambda p: pm.apply_factors(base, self.factors, p), tasks
        )
        self.cost["query_seconds"] += time.perf_counter() - t0
        self.cost["queries"] += len(prefs)
        self.cost["forward_passes"] = self._offline_passes + ctx.forward_passes.get(self.name, 0)
        return out


class MAP(Method):
    """Quadratic surrogates of Task Arithmetic scalings + NSGA-III front (``baselines.map``)."""

    name = "map"
    code = ("baselines.map", "baselines.methods", "merging.task_arithmetic", "merging._checks")
    SAMPLE_LABEL = "map (val samples)"

    def fit(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        c = self.cfg
        material = {
            "suite": ctx.suite.key,
            "split": "val",
            "cfg": _cfg(c),
            "code": self.code_version(),
        }
        before = ctx.forward_passes.get(self.SAMPLE_LABEL, 0)

        def compute(out: Path):
            T = len(ctx.tasks)
            scalings = map_lib.sample_scalings(T, c.samples, seed=int(c.seed))
            inputs = ctx.task_vector_inputs
            acc = models_accuracies(  # theta_0 + sum_k s_k tau_k, built lazily, not kept
                ctx,
                (merging.weighted_task_arithmetic(*inputs, _rounded(s)) for s in scalings),
                self.SAMPLE_LABEL,
                "val",
            )
            coefs = np.stack(
                [
                    map_lib.fit_quadratic(scalings, acc[:, k], how=c.fit, eps=float(c.fit_eps))
                    for k in range(T)
                ]
            )
            front_x, front_f = map_lib.pareto_front(
                coefs, pop_size=int(c.pop_size), n_gen=int(c.n_gen), seed=int(c.seed)
            )
            tensors = {
                "scalings": scalings,
                "val_accuracy": acc,
                "coefs": coefs,
                "front_x": front_x,
                "front_f": front_f,
            }
            save_file(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                str(out / "map.safetensors"),
            )
            fit_rmse = np.sqrt(np.mean((map_lib.predict(coefs, scalings) - acc) ** 2, axis=0))
            return {
                "merges_evaluated": len(scalings),
                "front_points": len(front_x),
                "fit_rmse": fit_rmse.tolist(),
            }

        unit = ctx.cache.unit("map", material, compute)
        saved = {k: v.numpy() for k, v in load_file(str(unit.file("map.safetensors"))).items()}
        self.front_x, self.front_f = saved["front_x"], saved["front_f"]
        self._offline_passes = ctx.forward_passes.get(self.SAMPLE_LABEL, 0) - before
        self.cost["forward_passes"] = self._offline_passes
        self.cost["offline_seconds"] += time.perf_counter() - t0

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:
        t0 = time.perf_counter()
        chosen = self.front_x[map_lib.select(self.front_f, prefs)]  # (P, T) scalings
        inputs = ctx.task_vector_inputs
        # a front point picked by several preferences (of any set) is evaluated once
        out = preference_models_accuracies(
            ctx,
            self,
            chosen,
            lambda c: merging.weighted_task_arithmetic(*inputs, _rounded(c)),
            tasks,
        )
        self.cost["query_seconds"] += time.perf_counter() - t0
        self.cost["queries"] += len(prefs)
        self.cost["forward_passes"] = self._offline_passes + ctx.forward_passes.get(self.name, 0)
        return out


def _rounded(scaling) -> list[float]:
    """MAP's scalings rounded to 12 digits, as the cache keys see them."""
    return np.round(np.asarray(scaling, dtype=np.float64), 12).tolist()


class Surgery(Method):
    """Per-task Representation Surgery adapters on the merged embedding (not controllable):
    every preference row gets the per-task corrected accuracy."""

    name = "surgery"
    code = ("baselines.surgery", "baselines.methods")
    controllable = False

    def fit(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        c = self.cfg
        split = calibration_split(ctx.cfg.calibration.source)
        material = _calibrated_material(ctx, self, experts=ctx.suite.key)

        def compute(out: Path):
            adapters, first, last = [], [], []
            for task in ctx.tasks:
                idx = ctx.calibration[task]
                z_m = ctx.features(ctx.merged, task, split, idx)
                z_e = ctx.features(ctx.expert_ref(task), task, split, idx)
                self.cost["forward_passes"] += 2 * len(idx)
                a, _ = surgery_lib.train_surgery(
                    z_m,
                    z_e,
                    rank=int(c.rank),
                    steps=int(c.steps),
                    lr=float(c.lr),
                    batch_size=int(c.batch_size),
                    seed=int(c.seed),
                )
                adapters.append(a)
                first.append(float((z_m - z_e).abs().mean()))
                last.append(surgery_lib.l1_distance(a, z_m, z_e))
            surgery_lib.save_adapters(out / "adapters.safetensors", adapters, ctx.tasks)
            return {
                "l1_before": dict(zip(ctx.tasks, first, strict=True)),
                "l1_after": dict(zip(ctx.tasks, last, strict=True)),
            }

        unit = ctx.cache.unit("surgery", material, compute)
        self.adapters = dict(
            zip(
                ctx.tasks,
                surgery_lib.load_adapters(unit.file("adapters.safetensors"), ctx.tasks),
                strict=True,
            )
        )
        self._per_task = None
        self.cost["offline_seconds"] += time.perf_counter() - t0

    def accuracies(
        self, ctx: Context, prefs: np.ndarray, tasks: list[int] | None = None
    ) -> np.ndarray:  # the per-task adapters cost nothing per task: every task, always
        t0 = time.perf_counter()
        if self._per_task is None:
            self._per_task = np.array(
                [
                    ctx.accuracy(self.adapters[t](ctx.features(ctx.merged, t, "test")), t)
                    for t in ctx.tasks
                ]
            )
        self.cost["query_seconds"] += time.perf_counter() - t0
        self.cost["queries"] += len(prefs)
        return np.tile(self._per_task, (len(prefs), 1))


register(ParetoMerging.name, ParetoMerging)
register(MAP.name, MAP)
register(Surgery.name, Surgery)
