"""Collect the jobs of a --multirun (or several runs) into one table.

    python scripts/collect.py outputs/multirun/table1/<time>      # a multirun folder
    python scripts/collect.py --latest table1                     # newest multirun of an experiment

Reads each job's summary.json and Hydra overrides; writes collected.csv and collected.md
beside the jobs and prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.collect import write_collected  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--latest", metavar="EXPERIMENT")
    ap.add_argument("--outputs", type=Path, default=Path("outputs"))
    a = ap.parse_args(argv)
    folder = a.folder
    if a.latest:
        runs = sorted((a.outputs / "multirun" / a.latest).glob("*")) or sorted(
            (a.outputs / "runs" / a.latest).glob("*")
        )
        if not runs:
            raise SystemExit(f"no runs of experiment {a.latest!r} under {a.outputs}")
        folder = runs[-1]
    if folder is None:
        ap.error("give a folder or --latest EXPERIMENT")
    try:
        md = write_collected(folder)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(f"# {folder}\n\n{md}")


if __name__ == "__main__":
    main()
