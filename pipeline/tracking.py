"""W&B logging: one W&B run per method of a pipeline job, with the same keys for every
method, so a dashboard groups runs by experiment and colours them by method.

Each method's run has ``group`` = the experiment (an ad-hoc multirun: ``sweep-<time>``),
``job_type`` = the method, tags and config entries for the method, merge, backbone, suite
and every override of the job, and a name with the swept values
(``react-task_arithmetic-correction.beta=0.1``). Summary keys, every accuracy, HV and U in
percent (alignment is a Pearson r)::

    equal/avg_acc  priority/avg_acc  one_hot/avg_acc   <scenario>/norm_acc  <scenario>/acc/<task>
    hv@3  hv@all  u@3  u@all  align@3  align@all        (controllable methods)
    merged/avg_acc  merged/acc/<task>  expert/...  pretrained/...   (the merge is config.merge)
    cost/<field>  time/<stage>

plus a ``preferences`` table (one row per preference: ``pref_set``, ``p_<task>``,
``acc_<task>``, ``norm_<task>``, ``avg_acc``: a scatter panel of two ``acc_`` columns
redraws a Pareto front), the plots as images, and artifacts: the job's tables
(``run-tables``) and, for ReACT, its statistics. A job that fails logs one run of
``job_type`` ``pipeline`` with the error and exit code 1.

Logging never hangs or fails a run: offline by default (``wandb sync`` uploads later);
online falls back to offline when W&B is unreachable; any W&B error is a warning.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .report import TABLES

log = logging.getLogger(__name__)

NOT_SWEPT = ("hydra.", "paths.", "logger", "progress", "num_threads", "launcher", "experiment")
FRONT_KEYS = {"hypervolume": "hv", "uniformity": "u", "preference_alignment": "align"}
PERCENT = {"uniformity"}  # summary fractions logged x100 (HV is x100 already)


def job_identity(cfg) -> dict:
    """Group, name parts and tags of this job, from the config and Hydra's job overrides.
    ``swept``: in a multirun, the job's values of the swept keys; in a single run, its
    overrides other than paths, logging and the like."""
    overrides, group, swept = [], str(cfg.experiment_name), None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            overrides = [str(o) for o in hc.overrides.task]
            if hc.mode == RunMode.MULTIRUN:
                swept = _swept_keys(Path(hc.sweep.dir))
                if group == "default":  # an ad-hoc sweep is its own group
                    group = f"sweep-{Path(hc.sweep.dir).name}"
    except ImportError:  # pragma: no cover
        pass
    plain = [o.lstrip("+~") for o in overrides]
    if swept is None:
        chosen = [o for o in plain if not o.startswith(NOT_SWEPT)]
    else:
        chosen = [o for o in plain if o.split("=", 1)[0] in swept]
    backbone = cfg.backbone.get("name", cfg.backbone.get("model_name"))
    return {
        "group": group,
        "merge": str(cfg.merge.name),
        "suite": str(cfg.suite.name),
        "backbone": str(backbone),
        "overrides": overrides,
        "swept": chosen,
    }


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys a multirun sweeps over (several values), from its ``multirun.yaml``."""
    from .collect import sweep_overrides

    try:
        parsed = sweep_overrides(sweep_dir)
    except Exception:  # noqa: BLE001 - no readable multirun.yaml: name by every override
        return None
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def run_name(method: str, ident: dict) -> str:
    """``<method>-<merge>-<swept overrides>`` (the merge override is the merge itself)."""
    return "-".join(
        [method, ident["merge"], *(o for o in ident["swept"] if not o.startswith("merge="))]
    )


def _tag(text: str) -> str:
    return str(text)[:64]  # W&B's limit on a tag


def method_metrics(summary: dict, method: str) -> dict[str, float]:
    """The summary keys of one method's W&B run (module docstring), in percent."""
    out: dict[str, float] = {}
    for scenario, d in summary["scenarios"].get(method, {}).items():
        out[f"{scenario}/avg_acc"] = 100 * d["average"]
        out[f"{scenario}/norm_acc"] = 100 * d["normalized_average"]
        out.update({f"{scenario}/acc/{t}": 100 * d[t] for t in summary["tasks"] if t in d})
    for subset, d in summary["fronts"].get(method, {}).items():
        for metric, v in d.items():
            out[f"{FRONT_KEYS.get(metric, metric)}{subset}"] = 100 * v if metric in PERCENT else v
    for label, d in summary["reference"].items():
        ref = "merged" if label.startswith("merged") else label
        out[f"{ref}/avg_acc"] = 100 * d["average"]
        out.update({f"{ref}/acc/{t}": 100 * d[t] for t in summary["tasks"] if t in d})
    return out


def preference_table(results: pd.DataFrame, prefs: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per preference of ``method``: weights, accuracies (%) and their average."""
    r = results[results.method == method]
    acc = r.pivot_table(index=["pref_set", "pref_id"], columns="task", values="accuracy")
    norm = r.pivot_table(
        index=["pref_set", "pref_id"], columns="task", values="normalized_accuracy"
    )
    tasks = list(dict.fromkeys(r.task))
    out = (100 * acc[tasks]).add_prefix("acc_").join((100 * norm[tasks]).add_prefix("norm_"))
    out["avg_acc"] = 100 * acc[tasks].mean(axis=1, skipna=False)  # NaN: a set scored on a subset
    w = prefs.set_index(["pref_set", "pref_id"])[tasks].add_prefix("p_")
    return w.join(out, how="inner").reset_index()


class Tracker:
    def __init__(self, cfg, run_dir: Path, config: dict, identity: dict):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config = config
        self.identity = identity
        self.mode = cfg.mode
        self.note = ""  # why logging is off, when it is
        self.runs: list[str] = []  # names of the runs logged
        self._wandb = None
        if cfg.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:  # pragma: no cover
            self.note = "wandb is not installed; W&B logging is off"
            return
        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")

    @classmethod
    def for_job(cls, cfg, run_dir: Path) -> Tracker:
        """The tracker of a pipeline job: ``cfg.logger`` settings, the resolved config."""
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - a bad interpolation: validation names it later
            config = OmegaConf.to_container(cfg, resolve=False)
        return cls(cfg.logger, run_dir, config, job_identity(cfg))

    def _init(self, name: str, job_type: str, tags: list[str], extra: dict):
        """A new W&B run (the previous one finished); the first success fixes the mode."""
        wandb = self._wandb
        kwargs = dict(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.identity["group"],
            job_type=job_type,
            name=name,
            tags=[_tag(t) for t in dict.fromkeys(tags)],
            config={**self.config, **extra},
            dir=str(self.run_dir),
            reinit="finish_previous",
        )
        modes = [self.mode] + (["offline"] if self.mode == "online" else [])
        init_timeout = float(self.cfg.get("init_timeout", 30))  # seconds W&B may take to answer
        for mode in modes:
            try:
                run = wandb.init(
                    mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs
                )
            except Exception as e:  # noqa: BLE001 - W&B must never fail the run
                self.note = f"W&B {mode} init failed ({type(e).__name__}: {e})"
                log.warning(self.note)
                continue
            self.mode, self.note = mode, ""
            return run
        self._wandb = None  # neither mode works: stop trying
        return None

    def _tags(self, method: str) -> list[str]:
        i = self.identity
        return [
            method,
            f"merge={i['merge']}",
            f"suite={i['suite']}",
            f"backbone={i['backbone']}",
        ] + i["swept"]

    def _extra(self, method: str) -> dict:
        i = self.identity
        return {"method": method, "overrides": i["overrides"], "swept": i["swept"]}

    def log_job(self, summary: dict, ev, timings: dict, plots, artifacts: dict) -> None:
        """One W&B run per method of the finished job (module docstring). ``ev``: the
        evaluate stage's tables; ``plots``: files written by the report; ``artifacts``:
        files per method (ReACT's statistics)."""
        if self._wandb is None:
            return
        for method in summary["methods"]:
            run = self._init(
                run_name(method, self.identity), method, self._tags(method), self._extra(method)
            )
            if run is None:
                return
            try:
                self._log_method(run, method, summary, ev, timings, plots, artifacts.get(method))
            except Exception as e:  # noqa: BLE001 - W&B must never fail the run
                log.warning("W&B logging failed for %s (%s); results are kept locally", run.name, e)
            self._finish(run, 0)

    def _log_method(self, run, method, summary, ev, timings, plots, artifacts) -> None:
        wandb = self._wandb
        cost = ev.cost
        metrics = method_metrics(summary, method)
        for row in cost[cost.method == method].drop(columns="method").to_dict("records")[:1]:
            metrics.update({f"cost/{k}": v for k, v in row.items()})
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        run.summary.update(metrics)
        table = preference_table(ev.results, ev.preferences, method)
        run.log({"preferences": wandb.Table(dataframe=table)})
        for png in (Path(p) for p in plots if Path(p).suffix == ".png"):
            run.log({f"plots/{png.stem}": wandb.Image(str(png))})
        run.log_artifact(self._tables_artifact())
        if artifacts:
            art = wandb.Artifact(
                re.sub(r"[^\w.-]+", "_", f"{method}-statistics"), type="statistics"
            )
            for p in artifacts:
                art.add_file(str(p))
            run.log_artifact(art)

    def _tables_artifact(self):
        art = self._wandb.Artifact("run-tables", type="run-tables")
        for name in TABLES:
            art.add_file(str(self.run_dir / f"{name}.csv"))
        for name in ("summary.json", "report.md"):
            art.add_file(str(self.run_dir / name))
        return art

    def fail(self, error: BaseException) -> None:
        """Log the failed job as one run (``job_type`` pipeline) with exit code 1."""
        if self._wandb is None:
            return
        name = run_name("pipeline", self.identity) + "-failed"
        run = self._init(
            name, "pipeline", [*self._tags("pipeline"), "failed"], self._extra("pipeline")
        )
        if run is not None:
            try:
                run.summary.update({"error": f"{type(error).__name__}: {error}"})
            except Exception as e:  # noqa: BLE001
                log.warning("W&B logging failed for %s (%s)", run.name, e)
            self._finish(run, 1)

    def _finish(self, run, exit_code: int) -> None:
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B could not finish %s (%s)", run.name, e)
        self.runs.append(run.name)

    @property
    def message(self) -> str:
        """What the user should know at the end: how to upload, or why nothing was logged."""
        if self.note or not self.runs or self.mode != "offline":
            return self.note
        return (
            f"W&B ran offline ({len(self.runs)} run(s)); upload later with: "
            f"wandb sync {self.run_dir / 'wandb'}/offline-run-*"
            + (
                " (online was asked for but W&B was unreachable)"
                if self.cfg.mode == "online"
                else ""
            )
        )
