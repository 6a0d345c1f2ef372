"""Process lifecycle of runs: unique run folders, and multirun workers that end with their parent.

- ``${run_id:}`` (an OmegaConf resolver, registered on import of ``pipeline``): a random
  token drawn once per process, cached in the config like Hydra's ``${now:}``, so the
  default run and sweep folders (``configs/config.yaml``) are unique even for two runs
  started in the same second (a shell ``&`` loop, a SLURM job array, two terminals).
- :func:`mark_launcher` records the launching process (host and pid) in the environment,
  which Hydra's joblib (loky) and submitit-local workers inherit; :func:`watch_launcher`,
  called at the start of a job, ends the job's process once that launcher is gone (killed
  with SIGKILL, its terminal closed), instead of computing on for nobody. Jobs on other
  hosts (SLURM) and jobs run in the launcher's own process (the basic launcher) are left alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

LAUNCHER_ENV = "REACT_LAUNCHER"
WATCH_SECONDS = 0.5
_TOKEN = secrets.token_hex(4)


def run_id() -> str:
    """This process's random token (8 hex digits) for unique folder names."""
    return _TOKEN


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


def mark_launcher() -> None:
    """Record this process as the launcher of the workers it starts; call it in the
    command-line entry point (``python -m pipeline.main``), before Hydra launches."""
    os.environ[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"


def watch_launcher() -> bool:
    """In a worker process started by the recorded launcher on this host, end the process
    when the launcher is gone. Returns whether a watcher was started."""
    host, _, pid = os.environ.get(LAUNCHER_ENV, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname() or int(pid) == os.getpid():
        return False
    launcher = int(pid)
    if os.getppid() != launcher:  # not a direct worker of it (e.g. a run started by a run)
        return False

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(WATCH_SECONDS)
        log.error(
            "the multirun launcher (pid %d) is gone: ending this job (pid %d); its finished "
            "cache units are kept, the unit it was writing is recomputed by the next run",
            launcher,
            os.getpid(),
        )
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="react-launcher-watch", daemon=True).start()
    return True
