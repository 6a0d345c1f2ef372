"""Hydra callbacks: a multirun ends with its collected tables (``pipeline.collect``), also
when one of its jobs fails (Hydra then skips ``on_multirun_end``): the failed job collects
the sweep so far, naming itself and the jobs that will not run."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode

log = logging.getLogger("react")


def collect_sweep(folder: Path) -> None:
    from .collect import skipped_lines, write_collected

    c = write_collected(folder)
    if c.skipped:
        log.warning("jobs not collected in %s:\n%s", folder, "\n".join(skipped_lines(c.skipped)))
    log.info("collected the sweep: %s", folder / "collected.md")


class CollectOnMultirunEnd(Callback):
    """Writes ``collected.{csv,md}`` and the paper tables into the sweep folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        collect_sweep(Path(config.hydra.sweep.dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if job_return.status == JobStatus.FAILED and config.hydra.mode == RunMode.MULTIRUN:
            from .report import FAILED, mark_failed

            job_dir = Path(config.hydra.runtime.output_dir)
            if job_dir.is_dir() and not (job_dir / FAILED).exists():  # failed before run() began
                try:
                    job_return.return_value  # noqa: B018 - a failed job's value raises its error
                except BaseException as error:  # noqa: BLE001 - recorded, not handled
                    mark_failed(job_dir, error)
            collect_sweep(Path(config.hydra.sweep.dir))
