"""A cold build of the offline suite's data (load, split, render, resize: ``offline_dataset``
and ``offline_images`` of every task) in one process against ``suite.data_workers`` processes.

    python bench/bench_suite_data.py [Hydra overrides, e.g. suite=offline_tiny]

Both variants run in this process one after the other, each into its own empty temporary
cache (deleted afterwards), and must write the same files (checked by the manifests' sha256).
The worker variant runs first, so the one-process variant finds the data libraries already
imported: the ratio understates the speed-up rather than overstating it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from bench.benchlib import run_sections  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.main import apply_runtime, script_config  # noqa: E402
from pipeline.suites import offline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, cfg = script_config(ap, argv)
    device = apply_runtime(cfg)
    suite = cfg.suite
    tasks = list(suite.tasks)
    workers = int(suite.get("data_workers") or 1)

    def build(in_workers: bool) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Cache(tmp)
            t0 = time.perf_counter()
            if in_workers:
                offline._prefetch_images(suite, cache, tasks)  # suite.data_workers processes
            units = {t: offline._images_unit(suite, cache, t) for t in tasks}  # the rest here
            seconds = time.perf_counter() - t0
            return seconds, {t: cache.manifest(u)["files"] for t, u in units.items()}

    def section(out: list[str]) -> None:
        many, files_many = build(True)
        one, files_one = build(False)
        assert files_one == files_many, "the worker processes wrote other files"
        out += [
            f"## Cold data build of `suite={suite.name}` ({len(tasks)} tasks)\n",
            "| variant | seconds | vs one process |",
            "|---|---|---|",
            f"| one process | {one:.1f} | 1.0x |",
            f"| `data_workers={workers}` "
            + ("(spawned processes)" if workers > 1 else "(fewer than 2: no worker processes)")
            + f" | {many:.1f} | {one / many:.2f}x |",
            "",
            "Both wrote the same files (sha256 of every unit file compared).\n",
        ]

    run_sections(
        "Offline suite data build", "bench/bench_suite_data.py", argv, device, {"data": section}
    )


if __name__ == "__main__":
    main()
