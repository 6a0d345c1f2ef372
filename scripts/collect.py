"""Collect the jobs of a --multirun (or several runs) into one table.

    python scripts/collect.py outputs/multirun/table1/<time>      # a multirun folder
    python scripts/collect.py --latest table1                     # newest multirun of an experiment

Reads every complete job (its run_complete.json records its summary.json) under the
folder: a run folder, a multirun folder, or a folder holding several of either. Writes
collected.md (the paper-shaped tables), collected.csv (long form), table1.csv,
table1_tasks.csv, table2.csv, sweep.csv and plots/sweep_<key>.png beside the jobs, and
prints the markdown. Jobs that failed, are incomplete or never started are named (on stderr
and in collected.md), never read; the exit code is 1 when no job is complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.collect import skipped_lines, to_markdown, write_collected  # noqa: E402


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
        c = write_collected(folder)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(f"# {folder}\n\n{to_markdown(c)}")
    if c.skipped:
        print("jobs not collected:\n" + "\n".join(skipped_lines(c.skipped)), file=sys.stderr)
    if not any(j.status == "complete" for j in c.jobs):
        raise SystemExit(
            f"no complete run under {folder} (a complete run ends with run_complete.json)"
        )


if __name__ == "__main__":
    main()
