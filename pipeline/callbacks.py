"""Hydra callbacks: at the end of every ``--multirun``, collect the jobs into one table."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("react")


class CollectOnMultirunEnd(Callback):
    """Writes ``collected.csv`` / ``collected.md`` into the sweep folder (scripts/collect.py)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .collect import write_collected

        folder = Path(config.hydra.sweep.dir)
        try:
            write_collected(folder)
        except FileNotFoundError as e:  # every job failed: nothing to collect, say so
            log.warning("%s", e)
            return
        log.info("collected the sweep: %s", folder / "collected.md")
