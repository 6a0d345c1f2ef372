"""Copy the README's figures from the newest outputs into docs/figures (`make docs-figures`
runs the targets first, then this).

    python scripts/docs_figures.py [--outputs outputs] [--dest docs/figures]

Each figure comes from the newest *complete* run (``run_complete.json``) or output folder of
the target that makes it (FIGURES below); a figure whose target has not run is named with
its make target, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# README figure -> (make target, folder under outputs/ holding one folder per run, file)
FIGURES = {
    "pairwise_fronts.png": ("compare", "runs/compare", "plots/pairwise_fronts_accuracy.png"),
    "simplex.png": ("compare", "runs/compare", "plots/simplex_react_simplex3_accuracy.png"),
    "simplex_pref_ta.png": (
        "compare",
        "runs/compare",
        "plots/simplex_pref_ta_simplex3_accuracy.png",
    ),
    "scenario_bars.png": ("compare", "runs/compare", "plots/scenario_bars_average_accuracy.png"),
    "cost.png": ("fig-cost", "cost_vs_tasks", "cost.png"),
    "tsne_by_task.png": ("tsne", "tsne", "tsne_by_task.png"),
    "sweep_beta.png": (
        "ablation-beta",
        "multirun/ablation_beta",
        "plots/sweep_correction.beta.png",
    ),
    "sweep_calibration.png": (
        "ablation-data",
        "multirun/ablation_data",
        "plots/sweep_calibration.size.png",
    ),
    "sweep_aggregation.png": (
        "ablation-aggregation",
        "multirun/ablation_aggregation",
        "plots/sweep_correction.aggregation.png",
    ),
}


def newest(outputs: Path, folder: str, file: str) -> Path | None:
    """The file in the newest run folder under ``outputs/folder`` that has it; a pipeline
    run counts only when complete."""
    for run in sorted((outputs / folder).glob("*"), reverse=True):
        complete = not folder.startswith("runs/") or (run / "run_complete.json").exists()
        if complete and (run / file).is_file():
            return run / file
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--outputs", type=Path, default=Path("outputs"))
    ap.add_argument("--dest", type=Path, default=Path("docs/figures"))
    a = ap.parse_args(argv)
    a.dest.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, (target, folder, file) in FIGURES.items():
        src = newest(a.outputs, folder, file)
        if src is None:
            missing.append(f"{name}: run `make {target}` (no {a.outputs / folder}/<time>/{file})")
            continue
        shutil.copyfile(src, a.dest / name)
        print(f"{a.dest / name} <- {src}")
    if missing:
        print("not copied:\n  " + "\n  ".join(missing), file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
