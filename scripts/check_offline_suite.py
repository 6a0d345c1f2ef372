"""The first offline suite (`suite=offline4`): build times and a quick accuracy table.

Kept for the numbers in bench/results_offline_suite.md; the default suite's regime is
measured by scripts/suite_diagnostics.py (no method result) instead.

Builds (or loads) the offline suite, then on each task's test split: the pretrained
encoder with the frozen prototype heads ("zero-shot"), each expert on its own task, the
Task Arithmetic merge theta_0 + lam * sum_k (theta_k - theta_0), and that merge with a
per-task linear correction of its embeddings toward the expert's, W_t = argmin_W
||M_t W - E_t||_F^2 (least squares on the task's unlabeled val split; rows are samples),
applied as z' = z W_t, and with one shared correction for all tasks (equal weights),
W = (sum_t M_t^T M_t / n_t)^+ (sum_t M_t^T E_t / n_t), the unregularised (beta = 0)
equal-preference ReACT map written inline. Accuracy in %.

    .venv/bin/python scripts/check_offline_suite.py [--config configs/suite/offline4.yaml]
        [--cache .cache] [--threads 2] [--lam 0.3] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch
from omegaconf import OmegaConf

import pipeline.compat  # noqa: F401  (before open_clip)
from pipeline.cache import Cache
from pipeline.suites import build_suite

ROOT = Path(__file__).resolve().parents[1]


def accuracy(feats: torch.Tensor, head: torch.Tensor, labels, scale: float) -> float:
    z = torch.nn.functional.normalize(feats, dim=-1)
    return 100.0 * float(
        ((scale * z @ head.T).argmax(-1) == torch.as_tensor(labels)).double().mean()
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=str(ROOT / "configs/suite/offline4.yaml"))
    ap.add_argument("--cache", default=str(ROOT / ".cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. finetune.steps=300")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))

    t0 = time.perf_counter()
    cache = Cache(args.cache)
    suite = build_suite(cfg, cache, progress=True)
    t_build = time.perf_counter() - t0
    computed = [s for s, _, e in cache.events if e == "computed"]

    from pipeline.suites.offline_train import encode

    heads = suite.heads()
    theta0 = suite.pretrained_state()
    experts = suite.expert_states()
    merged = {k: theta0[k] + args.lam * sum(e[k] - theta0[k] for e in experts) for k in theta0}
    visual = suite.build_visual()

    def feats(state, task, split):
        visual.load_state_dict(state)
        x, _ = suite.split(task, split)
        return encode(visual, x, suite.mean, suite.std)

    rows, stats = [], {}
    for task, expert in zip(suite.tasks, experts, strict=True):
        _, y = suite.split(task, "test")
        h, s = heads[task], suite.logit_scale
        pre = accuracy(feats(theta0, task, "test"), h, y, s)
        exp = accuracy(feats(expert, task, "test"), h, y, s)
        m_test = feats(merged, task, "test")
        ta = accuracy(m_test, h, y, s)
        m_val, e_val = feats(merged, task, "val").double(), feats(expert, task, "val").double()
        w = torch.linalg.lstsq(m_val, e_val).solution
        corr = accuracy((m_test.double() @ w).float(), h, y, s)
        stats[task] = (m_val.T @ m_val / len(m_val), m_val.T @ e_val / len(m_val), m_test)
        rows.append([task, len(heads[task]), pre, exp, ta, corr])
    w_shared = torch.linalg.pinv(sum(g for g, _, _ in stats.values())) @ sum(
        c for _, c, _ in stats.values()
    )
    for row in rows:
        task = row[0]
        z = (stats[task][2].double() @ w_shared).float()
        row.append(accuracy(z, heads[task], suite.split(task, "test")[1], suite.logit_scale))

    print(
        f"\nsuite key {suite.key}; build/load {t_build:.1f} s; computed units: {computed or 'none'}"
    )
    print(f"split sizes: {suite.info['split_sizes']}\n")
    secs = suite.info["build_seconds"]
    print("| unit | seconds to build (when it was built) |\n|---|---|")
    for name, sec in secs.items():
        print(f"| {name} | {sec:.1f} |")
    print(f"| **all units** | {sum(secs.values()):.1f} |\n")
    print(
        f"| task | classes | chance | pretrained | expert | TA (lam={args.lam}) "
        "| TA + per-task linear corr. | TA + shared linear corr. |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for task, c, *acc in rows:
        print(f"| {task} | {c} | {100 / c:.1f} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")
    avg = [sum(r[i] for r in rows) / len(rows) for i in range(2, 7)]
    chance = sum(100 / r[1] for r in rows) / len(rows)
    print(f"| **average** | | {chance:.1f} | " + " | ".join(f"{a:.1f}" for a in avg) + " |")


if __name__ == "__main__":
    main()
