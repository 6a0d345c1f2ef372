"""What a linear correction of the merged embeddings can do on a suite: two reference rows.

    python scripts/linear_bounds.py [hydra overrides, e.g. merge=ties] [--steps 100] [--out DIR]

Both are oracles fitted on the test images they are scored on, so they bound, and do not
compete with, the methods (the README labels them so):

- ``ReACT fitted on the whole test set``: ReACT's closed form (``cfg.correction``) with the
  statistics of every test image of every task instead of the calibration subset: equal and
  one-hot preferences.
- ``best single linear map with labels``: one W for all tasks trained with the test labels
  (``correction.supervised``: cross entropy of the frozen heads on normalize(W z), L-BFGS
  from W = I); and, per task, the best map for that task alone (the one-hot bound).

Uses the pipeline's cached suite, merge and features (``pipeline.main.prepare_context``,
``Context.features``), so after a pipeline run only the fits are computed. Writes
``bounds.csv`` and ``bounds.md`` into ``--out`` (default ``<paths.output_dir>/bounds/<time>``)
and prints the table. Accuracies in %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from correction import react  # noqa: E402
from correction.supervised import supervised_linear_map  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.main import apply_runtime, prepare_context, script_config, script_output_dir  # noqa: E402


def bounds(cfg, steps: int, device) -> pd.DataFrame:
    """Long table: row (reference), task, accuracy (%)."""
    ctx = prepare_context(cfg, Cache(cfg.paths.cache_dir), device)
    tasks, T = ctx.tasks, len(ctx.tasks)
    heads = ctx.heads
    z_m = {t: ctx.features(ctx.merged, t, "test").double() for t in tasks}
    z_e = {t: ctx.features(ctx.expert_ref(t), t, "test").double() for t in tasks}
    y = {t: ctx.labels(t, "test") for t in tasks}
    c = cfg.correction
    stats = [
        react.task_statistics(
            z_m[t],
            z_e[t],
            beta=float(c.beta),
            reduction=str(c.reduction),
            normalize_features=bool(c.normalize_features),
            task=t,
        )
        for t in tasks
    ]
    prefs = np.vstack([np.full((1, T), 1.0 / T), np.eye(T)])
    W = react.preference_map(stats, torch.as_tensor(prefs), aggregation=str(c.aggregation))
    rows = []

    def score(label: str, task: str, Wt: torch.Tensor | None, fitted_normalized=False) -> None:
        z = z_m[task]
        if fitted_normalized:  # ReACT fitted on L2-normalised features applies to them
            z = torch.nn.functional.normalize(z, dim=-1)
        z = z if Wt is None else react.apply(Wt.to(z.dtype), z)
        rows.append({"row": label, "task": task, "accuracy": 100 * ctx.accuracy(z.float(), task)})

    for j, t in enumerate(tasks):
        score("merged", t, None)
        rows.append({"row": "expert", "task": t, "accuracy": 100 * ctx.accuracy(z_e[t].float(), t)})
        nf = bool(c.normalize_features)
        score("ReACT on the whole test set, equal", t, W[0], nf)
        score("ReACT on the whole test set, one-hot", t, W[1 + j], nf)
    feats = [z_m[t] for t in tasks]
    labels = [y[t] for t in tasks]
    hs = [heads[t] for t in tasks]
    shared = supervised_linear_map(feats, labels, hs, ctx.suite.logit_scale, steps=steps)
    for j, t in enumerate(tasks):
        score("best single linear map with labels (all tasks)", t, shared)
        own = supervised_linear_map(
            feats, labels, hs, ctx.suite.logit_scale, steps=steps, weights=np.eye(T)[j].tolist()
        )
        score("best linear map with labels, per task (one-hot bound)", t, own)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame, tasks: list[str]) -> str:
    wide = df.pivot(index="row", columns="task", values="accuracy").reindex(
        index=list(dict.fromkeys(df.row)), columns=tasks
    )
    lines = ["| reference | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for label, r in wide.iterrows():
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in r) + f" | {r.mean():.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=100, help="L-BFGS iterations per fit")
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    args, cfg = script_config(ap, argv)
    device = apply_runtime(cfg)
    df = bounds(cfg, args.steps, device)
    out = script_output_dir(args.out, cfg, "bounds")
    df.to_csv(out / "bounds.csv", index=False)
    md = (
        f"Oracle references (fitted on the test images they are scored on), merge "
        f"`{cfg.merge.name}`, suite `{cfg.suite.name}`; accuracy %.\n\n"
        + to_markdown(df, list(dict.fromkeys(df.task)))
    )
    (out / "bounds.md").write_text(md)
    print(md)
    print(f"written: {out / 'bounds.md'}")


if __name__ == "__main__":
    main()
