"""Preference-models answered per second by the model-producing baselines (pref-TA, Pareto
Merging): the pipeline's ``models_accuracies`` against a plain per-preference loop, and the
floor, the forward passes alone.

    python bench/bench_preference_models.py [--prefs 8] [Hydra overrides, e.g. suite=offline_tiny]

- plain loop (what the pipeline did before): per preference, build the merged state dict,
  ``load_state_dict`` it into the encoder, extract every task's test features through a
  cache unit (written, checksummed, read back) and score them;
- ``models_accuracies``: the same merge, the weights straight into ``functional_call``, no
  per-model feature unit (the sweep unit caches the accuracies);
- forward only: one fixed model over every test set (the cost of the forward passes), with
  open_clip's forward as is and with ``pipeline.features.pooled_token_only`` (the last
  block's MLP on the class token alone, what ``models_accuracies`` runs).
All three in one process on the same built suite, in a throwaway copy of nothing: the plain
loop's feature units go into a temporary cache folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from bench.benchlib import run_sections  # noqa: E402
from evaluation import preferences as prefs_lib  # noqa: E402
from merging import preference_task_arithmetic  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.features import pooled_token_only  # noqa: E402
from pipeline.main import apply_runtime, prepare_context, script_config  # noqa: E402
from pipeline.methods import model_accuracies, models_accuracies  # noqa: E402
from pipeline.stages import ModelRef  # noqa: E402

FORWARD_REPEATS = 3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefs", type=int, default=8, help="Dirichlet preferences per variant")
    args, cfg = script_config(ap, argv)
    device = apply_runtime(cfg)
    ctx = prepare_context(cfg, Cache(cfg.paths.cache_dir), device)
    T = len(ctx.tasks)
    prefs = prefs_lib.dirichlet(T, args.prefs, seed=0)[: args.prefs]
    pre, experts = ctx.task_vector_inputs
    scale = float(cfg.baselines.pref_ta.scale)
    n_images = sum(ctx.suite.split_size(t, "test") for t in ctx.tasks)

    def plain_loop() -> np.ndarray:
        cache = ctx.cache
        with tempfile.TemporaryDirectory() as tmp:
            ctx.cache = Cache(tmp)  # fresh feature units, as a first sweep computes them
            try:
                rows = []
                for i, p in enumerate(prefs):
                    ref = ModelRef(
                        f"bench:{i}",
                        "bench",
                        lambda p=p: preference_task_arithmetic(
                            pre, experts, p.tolist(), scale=scale
                        ),
                    )
                    rows.append(model_accuracies(ctx, ref))
            finally:
                ctx.cache = cache
            return np.stack(rows)

    def batched() -> np.ndarray:
        states = (preference_task_arithmetic(pre, experts, p.tolist(), scale=scale) for p in prefs)
        return models_accuracies(ctx, states, "bench")

    @torch.no_grad()
    def forward_only(shortcut: bool) -> None:
        visual = ctx.visual().to(device).eval()
        visual.load_state_dict(ctx.merged.state())
        bs = int(cfg.batch_size)
        with pooled_token_only(visual) if shortcut else contextlib.nullcontext():
            for _ in prefs:
                for t in ctx.tasks:
                    images = ctx.suite.split(t, "test")[0]
                    for s in range(0, len(images), bs):
                        x = torch.from_numpy(np.ascontiguousarray(images[s : s + bs])).to(device)
                        visual(ctx.suite.preprocess(x))

    def section(out: list[str]) -> None:
        timed = {}
        results = {}
        for name, fn in (("plain", plain_loop), ("batched", batched)):
            t0 = time.perf_counter()
            results[name] = fn()
            timed[name] = time.perf_counter() - t0
        forward_only(False)  # warm-up (allocator, first calls)
        for _ in range(FORWARD_REPEATS):  # interleaved, the best of each: a shared host drifts
            for name, shortcut in (("forward_full", False), ("forward", True)):
                t0 = time.perf_counter()
                forward_only(shortcut)
                timed[name] = min(timed.get(name, np.inf), time.perf_counter() - t0)
        assert np.array_equal(results["plain"], results["batched"]), "the two paths disagree"
        per_s = {k: len(prefs) / v for k, v in timed.items()}
        out += [
            f"## Preference-models answered per second (pref-TA, {T} tasks, {n_images} test "
            f"images per model, {len(prefs)} preferences)\n",
            "| variant | seconds per preference | preference-models / s | vs plain loop |",
            "|---|---|---|---|",
            *(
                f"| {label} | {timed[k] / len(prefs):.3f} | {per_s[k]:.2f} | "
                f"{per_s[k] / per_s['plain']:.1f}x |"
                for k, label in (
                    ("plain", "plain per-preference loop (load_state_dict + feature units)"),
                    (
                        "batched",
                        "models_accuracies (functional_call, no per-model units, class-token "
                        "shortcut in the last block)",
                    ),
                    ("forward_full", "forward passes only, open_clip's forward as is"),
                    ("forward", "forward passes only, class-token shortcut (the floor)"),
                )
            ),
            "",
            "Accuracies of the plain loop and models_accuracies are identical (checked). "
            f"Forward-only rows: the best of {FORWARD_REPEATS} interleaved runs each; the "
            f"shortcut is {timed['forward_full'] / timed['forward']:.2f}x open_clip's forward.\n",
        ]

    run_sections(
        "Preference models of the model-producing baselines",
        "bench/bench_preference_models.py",
        argv,
        device,
        {"preference_models": section},
    )


if __name__ == "__main__":
    main()
