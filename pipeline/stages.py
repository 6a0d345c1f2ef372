"""The stages of the pipeline, each a function from typed inputs to typed outputs.

    prepare -> merge -> features -> fit -> sweep -> evaluate -> report

Every expensive result is a cache unit (``pipeline.cache``) keyed by its config and its
inputs' keys; ``Context`` carries what the stages share. ``pipeline.main`` reads like the
paper's algorithm box by calling these in order.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .cache import Cache, stable_hash
from .codeversion import FEATURES, code_version
from .features import accuracy_from_features, extract_features
from .suite import Suite


@dataclasses.dataclass
class ModelRef:
    """A model whose features can be cached: a stable key and a way to get its weights."""

    key: str
    label: str
    state: Callable[[], dict[str, torch.Tensor]]


@dataclasses.dataclass
class Context:
    cfg: object
    cache: Cache
    suite: Suite
    device: torch.device
    progress: bool = True
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    merged: ModelRef | None = None
    merged_path: Path | None = None  # the merged image tower's safetensors (a cache file)
    calibration: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    forward_passes: dict[str, int] = dataclasses.field(default_factory=dict)
    bar: Any = None  # the running method's bar over its preferences (tqdm), see preference_bar
    units: dict | None = None  # a stage's bar over its feature units, see feature_bar
    _visual: torch.nn.Module | None = None

    @property
    def tasks(self) -> list[str]:
        return self.suite.tasks

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    @contextmanager
    def preference_bar(self, method: str, total: int):
        """One bar per method over all its preferences, with an ETA (``advance`` moves it)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, desc=f"{method}: preferences", unit="pref", disable=not self.progress
        )
        try:
            yield self.bar
        finally:
            self.bar.close()
            self.bar = None

    @contextmanager
    def feature_bar(self, desc: str, total: int | None = None):
        """One bar over the feature units ``features`` reads or computes inside (each a short
        pass, under a second on the offline suites) instead of a bar per unit; it appears
        with the first unit, so a stage that reads none shows nothing."""
        self.units = {"desc": desc, "total": total, "bar": None}
        try:
            yield
        finally:
            if self.units["bar"] is not None:
                self.units["bar"].close()
            self.units = None

    def _unit_done(self) -> None:
        if self.units is None:
            return
        if self.units["bar"] is None:
            from tqdm.auto import tqdm

            self.units["bar"] = tqdm(
                total=self.units["total"],
                desc=self.units["desc"],
                unit=" feature units",
                disable=not self.progress,
            )
        self.units["bar"].update(1)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    @functools.cached_property
    def heads(self) -> dict[str, torch.Tensor]:
        """The suite's frozen per-task heads, read once per context."""
        return self.suite.heads()

    @functools.cached_property
    def task_vector_inputs(self) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(pretrained, experts) state dicts, read once and only when a merge must be built
        (a sweep whose features are all cached never reads them)."""
        return self.suite.pretrained_state(), self.suite.expert_states()

    def accuracy(self, features: torch.Tensor, task: str, split: str = "test") -> float:
        """Top-1 accuracy of ``features`` (all of ``task``/``split``) under the task's head."""
        return float(
            accuracy_from_features(
                features, self.heads[task], self.labels(task, split), self.suite.logit_scale
            )
        )

    def visual(self) -> torch.nn.Module:
        if self._visual is None:
            self._visual = self.suite.build_visual()
        return self._visual

    # ------------------------------------------------------------------ models
    def pretrained_ref(self) -> ModelRef:
        return ModelRef(f"pretrained:{self.suite.key}", "pretrained", self.suite.pretrained_state)

    def expert_ref(self, task: str) -> ModelRef:
        return ModelRef(
            f"expert:{self.suite.key}:{task}",
            f"expert {task}",
            lambda: self.suite.expert_state(task),
        )

    def state_ref(self, label: str, state: dict[str, torch.Tensor], material) -> ModelRef:
        """A model given by weights in memory, keyed by ``material`` (its recipe)."""
        return ModelRef(f"{label}:{stable_hash(material)}", label, lambda: state)

    # ------------------------------------------------------------------ features
    def features(
        self, model: ModelRef, task: str, split: str, indices: np.ndarray | None = None
    ) -> torch.Tensor:
        """Embeddings of ``task``/``split`` (optionally a subset) through ``model``, cached."""
        images, _ = self.suite.split(task, split)
        idx = np.arange(images.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        precision = (
            "bf16-autocast" if (self.cfg.autocast and self.device.type == "cuda") else "fp32"
        )
        material = {
            "model": model.key,
            "task": task,
            "split": split,
            "indices": stable_hash(idx.tolist()),
            "precision": precision,
            "code": code_version(*FEATURES),
        }

        def compute(out: Path):
            visual = self.visual()
            visual.load_state_dict(model.state())
            feats = extract_features(
                visual,
                images,
                self.suite.mean,
                self.suite.std,
                indices=idx,
                batch_size=self.cfg.batch_size,
                device=self.device,
                autocast=self.cfg.autocast,
                num_workers=self.cfg.get("feature_workers", 0) if self.device.type == "cuda" else 0,
                progress=self.progress and self.units is None,
                desc=f"{model.label} | {task}/{split}",
            )
            save_file({"features": feats}, str(out / "features.safetensors"))
            return {"n": len(idx)}

        unit = self.cache.unit("features", material, compute)
        if unit.computed:
            self.forward_passes[model.label] = self.forward_passes.get(model.label, 0) + len(idx)
        self._unit_done()
        return load_file(str(unit.file("features.safetensors")))["features"]

    def labels(self, task: str, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        lab = torch.from_numpy(self.suite.split(task, split)[1])
        return lab if indices is None else lab[torch.as_tensor(indices)]


# ---------------------------------------------------------------------- calibration
def calibration_split(source: str) -> str:
    if source == "test":
        return "test"
    if source == "train":
        return "val"  # held out from the experts' training
    raise ValueError(f"calibration.source must be 'test' or 'train', got {source!r}")


def calibration_indices(suite: Suite, cfg) -> dict[str, np.ndarray]:
    """Per task, the seeded calibration subset of the source split (sorted indices)."""
    split = calibration_split(cfg.source)
    out = {}
    for t_i, task in enumerate(suite.tasks):
        n = suite.split_size(task, split)
        k = calibration_count(cfg.size, n, task, split)
        rng = np.random.default_rng([int(cfg.seed), t_i])
        out[task] = np.sort(rng.choice(n, size=k, replace=False))
    return out


def calibration_count(size, n: int, task: str = "?", split: str = "?") -> int:
    """How many of an ``n``-image split to use: a float is a fraction in (0, 1], an int a count."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"calibration.size must be a fraction in (0, 1] or a count, got {size!r}")
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ValueError(
                f"calibration.size={size} is a fraction outside (0, 1]; use e.g. 0.1 for 10%, "
                "1.0 for the whole split, or an integer count"
            )
        return max(1, int(round(size * n)))
    if size < 1:
        raise ValueError(f"calibration.size={size}: need at least 1 calibration image per task")
    if size > n:
        raise ValueError(
            f"calibration.size={size} is larger than the {split!r} split of task {task!r} "
            f"({n} images); use a smaller count or a fraction"
        )
    return int(size)


# ---------------------------------------------------------------------- tables
def long_results(
    method: str,
    pref_set: str,
    accuracies: np.ndarray,
    tasks: list[str],
    expert_acc: dict[str, float],
    offset: int = 0,
) -> pd.DataFrame:
    """(P, T) accuracies -> the tidy ``results`` frame of evaluation.plots."""
    P, T = accuracies.shape
    rows = {
        "method": [method] * (P * T),
        "pref_set": [pref_set] * (P * T),
        "pref_id": np.repeat(np.arange(offset, offset + P), T),
        "task": tasks * P,
        "accuracy": accuracies.reshape(-1),
    }
    df = pd.DataFrame(rows)
    df["normalized_accuracy"] = df["accuracy"] / df["task"].map(expert_acc)
    return df
