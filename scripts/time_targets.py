"""Time every paper target of the Makefile at full and fast settings; write a markdown table.

    python scripts/time_targets.py [--targets table1,compare] [--settings full,fast]
        [--out time_targets.md] [--cache DIR] [--timeout 1800] [--make-args "SUITE=offline"]
        [--args "num_threads=1"]

Each target runs as a user runs it (``make <target>``, ``FAST=1`` for the fast preset) in a
subprocess, one after the other. The suite is built once first (``make demo`` into the
``--cache`` folder, default the project's; that warm-up is timed and reported separately),
and every timed run gets a fresh cache folder holding only the suite's units (hard links
of its ``offline_*`` / ``paper8_*`` stages), so each target computes its own merges,
features, statistics and sweeps, as on a first run, and a figure is never a cache hit of an
earlier target. The table gives wall-clock minutes per target and setting, the machine and
its load average before each run; a target that fails or runs past ``--timeout`` is
reported as such, never dropped. The README's runtime table is pasted from this output
(``make time-targets``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    "demo",
    "table1",
    "table2",
    "fig-pairwise",
    "fig-simplex",
    "fig-cost",
    "ablation-beta",
    "ablation-data",
    "ablation-aggregation",
    "tsne",
    "compare",
]


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{os.cpu_count()}-core {line.split(':', 1)[1].strip()}"
    return f"{os.cpu_count()}-core {platform.machine()}"


SUITE_STAGES = ("offline_", "paper8_")  # prefixes of the suite builders' cache stages


def suite_only_cache(built: Path, dst: Path) -> Path:
    """A cache folder at ``dst`` holding hard links to the suite units of ``built`` (units
    are written once and renamed into place, never edited, so links are safe)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for stage in built.iterdir():
        if stage.is_dir() and stage.name.startswith(SUITE_STAGES):
            shutil.copytree(stage, dst / stage.name, copy_function=os.link)
    return dst


def matmul_rate(bursts: int = 5, reps: int = 20) -> float:
    """The host's float32 matmul rate now (GFLOP/s, torch's default threads; the median of
    ``bursts`` short bursts of the offline ViT's MLP matmul, 4352 x 128 @ 128 x 512). A
    shared machine's speed drifts by 1.5x within a day: printed beside each time so that two
    runs can be compared, never used to correct one."""
    import torch

    a, b = torch.randn(4352, 128), torch.randn(128, 512)
    rates = []
    for _ in range(bursts):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates.append(2 * 4352 * 128 * 512 * reps / (time.perf_counter() - t0) / 1e9)
    return sorted(rates)[len(rates) // 2]


def time_target(target: str, fast: bool, make_args: list[str], env: dict, timeout: float) -> dict:
    cmd = ["make", target, *make_args, *(["FAST=1"] if fast else [])]
    load = os.getloadavg()[0]
    rate_before = matmul_rate()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-2000:] if proc.returncode else ""
    except subprocess.TimeoutExpired:
        status, tail = f"stopped after {timeout / 60:.0f} min", ""
    seconds = time.perf_counter() - t0
    return {
        "command": " ".join(shlex.quote(c) for c in cmd),
        "seconds": seconds,
        "status": status,
        "load": load,
        "rate": (rate_before, matmul_rate()),
        "tail": tail,
    }


def table(rows: dict, settings: list[str]) -> str:
    head = "| target | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings)
    lines = [head]
    for target, by_setting in rows.items():
        cells = []
        for s in settings:
            r = by_setting.get(s)
            if r is None:
                cells.append("")
                continue
            m = r["seconds"] / 60
            rate = r.get("rate")
            host = f", matmul {rate[0]:.0f} / {rate[1]:.0f} GFLOP/s" if rate else ""
            cells.append(
                f"{m:.1f} min (load {r['load']:.1f}{host})"
                + ("" if r["status"] == "ok" else f" {r['status']}")
            )
        lines.append(f"| `make {target}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--settings", default="full,fast", help="full, fast or both")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "time_targets.md")
    ap.add_argument("--cache", type=Path, help="REACT_CACHE for every run (default: the project's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per target run")
    ap.add_argument("--make-args", default="", help='extra make variables, e.g. "SUITE=offline"')
    ap.add_argument(
        "--args", default="", help='extra overrides for every target, e.g. "num_threads=1"'
    )
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    settings = [s for s in args.settings.split(",") if s]
    if unknown or not set(settings) <= {"full", "fast"}:
        ap.error(f"unknown targets {unknown} or settings {settings}; targets: {TARGETS}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    built = (args.cache or ROOT / "outputs" / "cache").resolve()
    env["REACT_CACHE"] = str(built)
    make_args = shlex.split(args.make_args) + [f"ARGS=logger=disabled progress=false {args.args}"]
    warm = time_target("demo", False, make_args, env, args.timeout)  # builds the suite if cold
    print(f"suite warm-up (make demo): {warm['seconds']:.0f} s, {warm['status']}", flush=True)
    rows: dict = {}

    def write() -> str:  # after every run, so a stopped timing keeps what it measured
        text = (
            f"# Runtimes of the make targets\n\nMachine: {cpu()}; `{' '.join(sys.argv)}`; "
            f"suite warm-up (`make demo`, first run): {warm['seconds'] / 60:.1f} min, "
            f"{warm['status']}. Wall-clock minutes, each run with a cache holding only the "
            "built suite (it computes its own merges, features, statistics and sweeps); the "
            "load average before each run and the host's float32 matmul rate before / after "
            "it (`matmul_rate`) are given because a shared machine slows every number.\n\n"
            + table(rows, settings)
            + "\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return text

    for target in targets:
        for s in settings:
            fresh = suite_only_cache(built, built.parent / f"{built.name}-timing")
            r = time_target(
                target, s == "fast", make_args, {**env, "REACT_CACHE": str(fresh)}, args.timeout
            )
            rows.setdefault(target, {})[s] = r
            print(f"{r['command']}: {r['seconds']:.0f} s, {r['status']}", flush=True)
            if r["tail"]:
                print(r["tail"], file=sys.stderr)
            write()
    print(write())
    return 0 if all(r["status"] == "ok" for b in rows.values() for r in b.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
