"""Copy the README's figures from the newest outputs into docs/figures (`make docs-figures`
runs the targets first, then this).

    python scripts/docs_figures.py [--outputs outputs] [--dest docs/figures]

Each figure comes from the newest *complete* full-settings run (``run_complete.json``) or output folder of
the target that makes it (FIGURES below); a figure whose target has not run is named with
its make target, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf


# README figure -> (make target, folder under outputs/ holding one folder per run, file)
def _compare(plot: str) -> tuple[str, str, str]:
    return ("compare", "runs/compare", f"plots/{plot}.png")


def _sweep(target: str, key: str) -> tuple[str, str, str]:
    return (target, f"multirun/{target.replace('-', '_')}", f"plots/sweep_{key}.png")


FIGURES = {
    "pairwise_fronts.png": _compare("pairwise_fronts_accuracy"),
    "simplex.png": _compare("simplex_react_simplex3_accuracy"),
    "simplex_pref_ta.png": _compare("simplex_pref_ta_simplex3_accuracy"),
    "scenario_bars.png": _compare("scenario_bars_average_accuracy"),
    "cost.png": ("fig-cost", "cost_vs_tasks", "cost.png"),
    "tsne_by_task.png": ("tsne", "tsne", "tsne_by_task.png"),
    "sweep_beta.png": _sweep("ablation-beta", "correction.beta"),
    "sweep_calibration.png": _sweep("ablation-data", "calibration.size"),
    "sweep_aggregation.png": _sweep("ablation-aggregation", "correction.aggregation"),
}


def preset(run: Path) -> str:
    """The preset a run folder was made with: its (or its jobs') summary.json, or the
    config.yaml a script writes; 'full' when neither records one."""
    for summary in [run / "summary.json", *sorted(run.glob("*/summary.json"))]:
        if summary.is_file():
            return str(json.loads(summary.read_text()).get("preset", "full"))
    if (run / "config.yaml").is_file():
        return str(OmegaConf.load(run / "config.yaml").get("preset", "full"))
    return "full"


def newest(outputs: Path, folder: str, file: str) -> Path | None:
    """The file in the newest run folder under ``outputs/folder`` that has it, made at full
    settings (``FAST=1`` outputs are smoke tests); a pipeline run counts only when complete."""
    for run in sorted((outputs / folder).glob("*"), reverse=True):
        complete = not folder.startswith("runs/") or (run / "run_complete.json").exists()
        if complete and (run / file).is_file() and preset(run) == "full":
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
