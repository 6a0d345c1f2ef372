"""Hydra entry point: ``python -m pipeline.main [overrides]``.

    prepare -> merge -> features -> fit -> sweep -> evaluate -> report -> log

The task function lives in this package module (not a script) so Hydra's joblib and
submitit launchers can import it in their workers; ``pipeline/__init__`` installs the
torchvision guard first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import compat, lifecycle  # noqa: F401
from .artifacts import run_artifacts
from .cache import Cache, CacheLockError, disk_full
from .evaluate import evaluate, preference_sets, resolve_tasks3, scenario_sets, scored_tasks
from .features import resolve_device
from .merge import load_merged, run_merge
from .methods import build_method, reference_accuracies, sweep
from .paths import CONFIG_DIR, describe_cache
from .report import (
    MARKER,
    begin_run,
    mark_complete,
    mark_failed,
    run_meta,
    write_report,
    write_timings,
)
from .stages import (
    Context,
    ModelRef,
    calibration_indices,
)
from .suites import build_suite, capped
from .tracking import Tracker
from .validation import validate_config

log = logging.getLogger("react")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m pipeline.main <overrides>`` would run (for scripts and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def script_config(ap, argv: list[str] | None = None):
    """Parse a script's own flags plus Hydra ``key=value`` overrides; returns (args, validated cfg)."""
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        ap.error(f"unrecognised arguments {bad}; Hydra overrides look like key=value")
    cfg = compose_config(overrides)
    validate_config(cfg)
    args.overrides = overrides
    return args, cfg


def apply_runtime(cfg: DictConfig) -> torch.device:
    """Threads and seeds from the config (the pipeline and every script); returns the device."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return resolve_device(cfg.device)


def script_output_dir(out: Path | None, cfg: DictConfig, name: str) -> Path:
    """``out``, or ``<paths.output_dir>/<name>/<time>-<run id>`` (unique per process); created,
    with the script's composed config as ``config.yaml`` (its preset, seeds and settings)."""
    stamp = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{lifecycle.run_id()}"
    out = Path(out) if out else Path(cfg.paths.output_dir) / name / stamp
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    return out


def method_cfg(cfg: DictConfig, name: str):
    if name == "react":
        return cfg.correction
    return cfg.baselines.get(name)


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Run the whole pipeline for ``cfg``; returns the summary dict. The run folder ends with
    ``run_complete.json`` (success) or ``run_failed.json``, and W&B marks a failure failed."""
    run_dir = Path(run_dir or cfg.paths.output_dir)
    try:
        validate_config(cfg)  # before any folder or W&B run: a bad config leaves nothing behind
    except BaseException as e:
        if (run_dir / MARKER).exists():  # a reused folder: its old results are not this run's
            mark_failed(run_dir, e)
        raise
    tracker = Tracker.for_job(cfg, run_dir)
    try:
        _prepare_run_dir(run_dir)  # a rerun into this folder never leaves stale outputs
        device = apply_runtime(cfg)
        log.info("run folder %s", run_dir)
        log.info(describe_cache(Path(cfg.paths.cache_dir)))
        cache = Cache(cfg.paths.cache_dir)
        cache.sweep_tmp()
        with disk_full(run_dir, "the run's tables and report"):
            summary = _run(cfg, cache, device, run_dir, tracker)
    except BaseException as e:
        mark_failed(run_dir, e)
        tracker.fail(e)
        raise
    finally:
        if tracker.message:
            log.info(tracker.message)
    mark_complete(run_dir)  # the last file: the folder is complete
    return summary


def _prepare_run_dir(run_dir: Path) -> None:
    """A writable run folder without the outputs of an earlier run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"the output folder {run_dir} is not writable ({e.strerror}); set hydra.run.dir or paths.output_dir"
        ) from e
    stale = begin_run(run_dir)
    if stale:
        log.info("removed the outputs of an earlier run from %s: %s", run_dir, ", ".join(stale))


def load_suite(cfg: DictConfig, cache: Cache):
    """Stage prepare: build (or load from ``cache``) the suite of ``cfg``, its splits cut to
    ``max_images_per_split`` images when that is set (preset=fast)."""
    suite = build_suite(
        cfg.suite if cfg.suite.name != "paper8" else _with_backbone(cfg),
        cache,
        progress=cfg.progress,
    )
    return capped(suite, cfg.get("max_images_per_split"))


def prepare_context(cfg: DictConfig, cache: Cache, device: torch.device, suite=None) -> Context:
    """Stages prepare and merge: the built suite, the calibration subsets and the merged model.

    Everything later (features, fit, sweep) reads from the returned ``Context``; scripts
    (t-SNE, cost curves) start here too. ``suite``: an already built suite (e.g. a task
    subset of one, ``scripts/cost_vs_tasks.py``) instead of building ``cfg.suite``.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if suite is None:
        suite = load_suite(cfg, cache)
    timings["prepare"] = time.perf_counter() - t
    ctx = Context(cfg, cache, suite, device, progress=cfg.progress, timings=timings)
    ctx.calibration = calibration_indices(suite, cfg.calibration)
    with ctx.timed("merge"):
        merge_unit = run_merge(cfg.merge, suite, cache, device, progress=cfg.progress)
        merged_state = load_merged(merge_unit)
        ctx.merged_path = merge_unit.file("merged.safetensors")
        ctx.merged = ModelRef(
            f"merged:{merge_unit.key}", f"merged ({cfg.merge.name})", lambda: merged_state
        )
    return ctx


def _run(cfg, cache: Cache, device, run_dir: Path, tracker: Tracker) -> dict:
    """The algorithm box: one stage a line, each timed into ``timings.json``."""
    ctx = prepare_context(cfg, cache, device)  # prepare (suite, calibration subsets) and merge
    tasks3 = resolve_tasks3(ctx.tasks, cfg.tasks3)
    sets = preference_sets(cfg.preferences, ctx.tasks, tasks3)
    scored = {s: scored_tasks(cfg.preferences, s, ctx.tasks, tasks3) for s in sets}  # tasks read
    with ctx.timed("features"):  # the fixed models: pretrained, merged, each expert
        reference = reference_accuracies(ctx)
    frames, cost_rows, methods, stat_files = [], [], [], {}
    for name, method_sets in [
        *((name, sets) for name in cfg.methods),  # controllable: every preference set
        *((name, scenario_sets(sets)) for name in cfg.fixed_methods),  # equal/priority/one-hot
    ]:
        methods.append(method := build_method(name, method_cfg(cfg, name)))
        with ctx.timed("fit"), ctx.feature_bar(f"{name}: fit"):
            method.fit(ctx)
        stat_files[name] = [method.stats_path] if getattr(method, "stats_path", None) else []
        total = sum(len(p) for p in method_sets.values())
        with ctx.timed("sweep"), ctx.preference_bar(name, total):
            frames += [
                sweep(ctx, method, s, p, reference, scored[s]) for s, p in method_sets.items()
            ]
        cost_rows.append({"method": name, **method.cost, "device": str(device)})
    with ctx.timed("evaluate"):
        ev = evaluate(frames, sets, reference, cost_rows, ctx.tasks, tasks3, list(cfg.methods))
    with ctx.timed("report"):
        meta = run_meta(cfg, ctx.suite, ctx.calibration, tasks3, sets)
        artifacts = run_artifacts(ctx.suite, ctx.merged_path, methods, run_dir)
        summary, plots = write_report(run_dir, meta, ev, sets, tasks3, artifacts)
    write_timings(run_dir, ctx.timings, cache.events)
    tracker.log_job(summary, ev, ctx.timings, plots, stat_files)  # log: one W&B run per method
    log.info("results in %s", run_dir)
    return summary


def _with_backbone(cfg):
    """The suite config with the backbone inside (paper8 builds per backbone)."""
    return OmegaConf.create(
        {
            **OmegaConf.to_container(cfg.suite, resolve=True),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        }
    )


# what a user can fix (a config value, a missing file or package, a folder): one message, exit 2
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ImportError, CacheLockError)
_task_started = False  # set once Hydra has composed a config and called the task function


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global _task_started
    _task_started = True
    logging.basicConfig(level=logging.INFO)
    for noisy in ("fontTools", "matplotlib", "PIL"):  # PDF font subsetting logs every glyph
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode != RunMode.MULTIRUN
    if not single:
        lifecycle.watch_launcher()  # a joblib / submitit-local worker ends with its launcher
    elif threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: as Ctrl-C
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # the traceback (asked for), or Hydra's record of a failed job in a sweep
    reraise = os.environ.get("HYDRA_FULL_ERROR") == "1" or not single
    try:
        summary = run(cfg, run_dir)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: run() marked the folder failed
        if reraise:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"react-merging: interrupted ({signal.Signals(signum).name}); every finished "
            f"stage is kept in the cache {cfg.paths.cache_dir}: the same command resumes "
            f"from there (this run's folder, {run_dir}, is marked failed)",
            file=sys.stderr,
        )
        sys.exit(128 + int(signum))
    except USER_ERRORS as e:
        if reraise:
            raise
        _remove_if_empty(run_dir)
        print(
            f"react-merging: error: {e}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr
        )
        sys.exit(2)
    _print_summary(summary, run_dir)
    return summary


class Interrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM), raised where the run is, so that it ends
    as Ctrl-C does: the run folder marked failed, W&B told, the cache consistent."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def cli() -> None:
    """The console command (``react-merging``, ``python -m pipeline.main``): Hydra's app.
    A config Hydra cannot compose (an unknown key, a bad override) is a user error too: exit 2."""
    lifecycle.mark_launcher()  # multirun workers it starts end with it
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise
    except BrokenPipeError:  # `react-merging --help | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _remove_if_empty(run_dir: Path) -> None:
    """A run that failed before writing a result leaves no folder (only Hydra's own files)."""
    if run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def _print_summary(summary: dict, run_dir: Path) -> None:
    print(f"\nReACT pipeline finished: {run_dir}")
    for label, d in summary["reference"].items():
        print(f"  {label:<28s} avg acc {100 * d['average']:.1f}%")
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            print(f"  {method + ' (' + scenario + ')':<28s} avg acc {100 * d['average']:.1f}%")
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            print(f"  {method} {subset}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()))
    print(f"  report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    cli()
