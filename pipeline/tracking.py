"""W&B logging that never hangs or fails a run.

Offline by default (a run folder that ``wandb sync`` uploads later). When online is asked
for and W&B is unreachable or has no key, the run falls back to offline mode and says how
to sync; when even that fails, logging is switched off with a message and the run goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg, run_dir: Path, config: dict, group: str, name: str | None = None):
        self.run = None
        self.run_dir = Path(run_dir)
        self.mode = cfg.mode
        self.message = ""
        if cfg.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:  # pragma: no cover
            self.message = "wandb is not installed; W&B logging is off"
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            name=name,
            config=config,
            dir=str(self.run_dir),
            reinit="finish_previous",
        )
        modes = [cfg.mode] + (["offline"] if cfg.mode == "online" else [])
        init_timeout = float(cfg.get("init_timeout", 30))  # seconds W&B may take to answer
        for mode in modes:
            try:
                self.run = wandb.init(
                    mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs
                )
                self.mode = mode
                break
            except Exception as e:  # noqa: BLE001 - W&B must never fail the run
                self.message = f"W&B {mode} init failed ({type(e).__name__}: {e})"
                log.warning(self.message)
        if self.run is not None and self.mode == "offline":
            self.message = (
                f"W&B ran offline; upload later with: wandb sync {self.run_dir / 'wandb'}"
                + (
                    " (online was asked for but W&B was unreachable)"
                    if cfg.mode == "online"
                    else ""
                )
            )

    def _safe(self, fn, *args, **kwargs):
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed (%s); results are kept locally", e)

    def log(self, metrics: dict) -> None:
        self._safe(self.run.log, metrics) if self.run else None

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self._safe(self.run.summary.update, metrics)

    def table(self, name: str, df) -> None:
        if self.run is None:
            return
        import wandb

        self._safe(lambda: self.run.log({name: wandb.Table(dataframe=df)}))

    def image(self, name: str, path: Path) -> None:
        if self.run is None:
            return
        import wandb

        self._safe(lambda: self.run.log({name: wandb.Image(str(path))}))

    def finish(self) -> None:
        if self.run is not None:
            self._safe(self.run.finish)
            self.run = None


def log_run(tracker: Tracker, summary: dict, ev, timings: dict, plots: list[Path]) -> None:
    """The log stage: summary metrics, stage times, the result tables and the plots."""
    tracker.summary(flat_metrics(summary))
    tracker.log({f"time/{k}": v for k, v in timings.items()})
    for name in ("scenarios", "fronts", "reference", "cost"):
        tracker.table(name, getattr(ev, name))
    for p in plots:
        if p.suffix == ".png":
            tracker.image(f"plots/{p.stem}", p)


def flat_metrics(summary: dict) -> dict:
    flat = {}
    for method, sc in summary["scenarios"].items():
        for scenario, d in sc.items():
            flat[f"{method}/{scenario}/average_accuracy"] = d["average"]
    for method, fr in summary["fronts"].items():
        for subset, d in fr.items():
            for metric, v in d.items():
                flat[f"{method}/{metric}{subset}"] = v
    for label, d in summary["reference"].items():
        flat[f"reference/{label}/average_accuracy"] = d["average"]
    return flat
