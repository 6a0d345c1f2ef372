"""Validation of a whole run config before any stage: every key, each error naming it.

``validate_config(cfg)`` runs before the cache folder is even created; a bad value raises
:class:`ConfigError` (a ``ValueError``) whose message starts with the key, shows the value,
and says what is accepted.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


def _fail(key: str, value: Any, want: str) -> None:
    raise ConfigError(f"{key}={_show(value)}: {want}")


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_at_least(lo: int, none: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if none and v is None:
            return
        if not _is_int(v) or v < lo:
            _fail(key, v, f"must be an integer >= {lo}{' or null' if none else ''}")

    return check


def number_in(lo: float, hi: float, lo_open: bool = True, inf: bool = False):
    def check(key: str, v: Any) -> None:
        ok = _is_number(v) and not math.isnan(v) and (inf or math.isfinite(v))
        ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
            _fail(key, v, f"must be a number in {bounds}{' (or inf)' if inf else ''}")

    return check


def one_of(*choices: Any) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if v not in choices:
            _fail(key, v, f"must be one of {', '.join(map(str, choices))}")

    return check


def boolean(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(key, v, "must be true or false")


def text(key: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip() or "/" in v:
        _fail(key, v, "must be a non-empty name without '/'")


SEED = int_at_least(0)
POSITIVE = int_at_least(1)
FRACTION = number_in(0, 1)
POSITIVE_NUMBER = number_in(0, math.inf)
SPLIT = one_of("train", "val", "test")

TOP = {
    "seed": SEED,
    "num_threads": int_at_least(1, none=True),
    "max_images_per_split": int_at_least(1, none=True),
    "batch_size": POSITIVE,
    "autocast": boolean,
    "feature_workers": int_at_least(0),
    "progress": boolean,
    "experiment_name": text,
}
CORRECTION = {
    "beta": number_in(0, math.inf, lo_open=False, inf=True),
    "aggregation": one_of("closed_form", "naive", "polar"),
    "reduction": one_of("mean", "sum"),
    "normalize_features": boolean,
}
# keys of the merge group and the baselines, wherever they occur
SETTINGS = {
    "scale": POSITIVE_NUMBER,
    "density": FRACTION,
    "combine": one_of("sum", "mean"),
    "granularity": one_of("layer", "task"),
    "ties": boolean,
    "steps": POSITIVE,
    "lr": POSITIVE_NUMBER,
    "batch_size": POSITIVE,
    "init": number_in(-math.inf, math.inf, lo_open=True),
    "data_split": SPLIT,
    "exemplar_split": SPLIT,
    "exemplars": POSITIVE,
    "seed": SEED,
    "rank": POSITIVE,
    "samples": int_at_least(1, none=True),
    "fit": one_of("logit", "nls"),
    "fit_eps": number_in(0, 0.5, lo_open=True),
    "pop_size": POSITIVE,
    "n_gen": POSITIVE,
}
PREFERENCES = {
    "priority_main": number_in(0, 1, lo_open=False),
    "simplex_step": FRACTION,
    "grid": one_of("lattice", "dirichlet"),
    "grid_h": POSITIVE,
    "dirichlet_n": POSITIVE,
    "dirichlet_seed": SEED,
    "pairwise_steps": int_at_least(2),
    "score_all_tasks": boolean,
}


def check_keys(node, prefix: str, rules: dict[str, Callable[[str, Any], None]]) -> None:
    """Apply ``rules`` to the keys of ``node`` that exist (``prefix`` names the node)."""
    for key, rule in rules.items():
        if node is not None and key in node:
            rule(f"{prefix}{key}", node[key])


def check_numbers(node, prefix: str, text_keys=(), _rel: str = "") -> None:
    """Each leaf of ``node`` is a number, null or a list of numbers, except the dotted keys
    ``text_keys`` (relative to ``node``); ``prefix`` names the node in the message."""
    for key in node:
        rel = f"{_rel}{key}"
        value = node[key]
        if rel in text_keys:
            continue
        if OmegaConf.is_dict(value):
            check_numbers(value, prefix, text_keys, rel + ".")
        elif OmegaConf.is_list(value):
            if not all(_is_number(v) for v in value):
                _fail(f"{prefix}{rel}", value, "must be a list of numbers")
        elif value is not None and not _is_number(value):
            _fail(f"{prefix}{rel}", value, "must be a number")


def _names(cfg, key: str, allow_empty: bool) -> list[str]:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(v, str) for v in value):
        _fail(key, value, "must be a list of names, e.g. [react]")
    names = list(value)
    if not names and not allow_empty:
        _fail(key, value, "must name at least one method, e.g. [react]")
    if len(set(names)) != len(names):
        _fail(key, value, "names a method twice")
    return names


def check_calibration(c) -> None:
    from .stages import calibration_count, calibration_split

    calibration_split(c.source)
    # type and range of calibration.size now; its bound by the split size once the suite is built
    calibration_count(c.size, sys.maxsize)
    if _is_int(c.size) and c.size == 1:
        _fail(
            "calibration.size",
            1,
            "an integer is a count of images per task, so 1 would mean one image; write 1.0 "
            "for the whole split, or a count >= 2",
        )
    SEED("calibration.seed", c.seed)


def check_preferences(p, tasks: list[str]) -> None:
    check_keys(p, "preferences.", PREFERENCES)
    sets = p.sets
    if not isinstance(sets, (list, ListConfig)) or len(set(sets)) != len(sets):
        _fail("preferences.sets", sets, "must be a list of distinct set names")
    if not sets and p.get("custom") is None:
        _fail(
            "preferences.sets",
            sets,
            "no preferences to sweep: name at least one set or give preferences.custom rows",
        )
    if p.get("pairs") not in (None, "figure"):  # "figure" keeps the suite's panels that apply
        if not isinstance(p.pairs, (list, ListConfig)):
            _fail("preferences.pairs", p.pairs, 'must be "figure", null (all pairs) or a list')
        for pair in p.pairs:
            if not isinstance(pair, (list, ListConfig)) or len(pair) != 2 or pair[0] == pair[1]:
                _fail(
                    "preferences.pairs", p.pairs, f"each entry must be 2 distinct tasks of {tasks}"
                )
            unknown = [t for t in pair if t not in tasks]
            if unknown:
                _fail(
                    "preferences.pairs",
                    p.pairs,
                    f"unknown task(s) {unknown}; tasks are {tasks}",
                )
    custom = p.get("custom")
    if custom is not None:
        rows = list(custom) if isinstance(custom, (list, ListConfig)) else [custom]
        if rows and all(_is_number(x) for x in rows):  # one row given flat
            rows = [rows]
        rows = [r if isinstance(r, (list, ListConfig)) else [r] for r in rows]
        if not rows and not sets:
            _fail("preferences.custom", custom, "is empty and no other set is named")
        for i, row in enumerate(rows):
            if len(row) != len(tasks) or not all(_is_number(x) for x in row):
                _fail(
                    "preferences.custom",
                    custom,
                    f"row {i} has length {len(row)}, expected one weight per task "
                    f"({len(tasks)}: {', '.join(tasks)})",
                )


def validate_config(cfg: DictConfig) -> None:
    """Every check that needs no data, before any heavy stage; messages say what to change."""
    from .evaluate import preference_sets, resolve_tasks3
    from .features import resolve_device
    from .main import method_cfg
    from .merge import validate_merge_config
    from .methods import build_method
    from .suites import BUILDERS

    check_keys(cfg, "", TOP)
    resolve_device(cfg.device)
    validate_merge_config(cfg.merge)
    check_keys(cfg.merge, "merge.", {k: v for k, v in SETTINGS.items() if k != "fit"})
    if cfg.suite.name not in BUILDERS:
        _fail(
            "suite.name", cfg.suite.name, f"unknown suite; choose suite= one of {sorted(BUILDERS)}"
        )
    builder = importlib.import_module(BUILDERS[cfg.suite.name])
    if hasattr(builder, "TEXT_KEYS"):  # a suite whose other settings are all numbers
        check_numbers(cfg.suite, "suite.", builder.TEXT_KEYS)
    if hasattr(builder, "validate"):  # the suite's own keys (task names, splits, model)
        builder.validate(cfg.suite, cfg.backbone)
    tasks = list(cfg.suite.tasks)
    if len(set(tasks)) != len(tasks) or len(tasks) < 2:
        _fail("suite.tasks", tasks, "must list at least 2 distinct tasks")
    tasks3 = resolve_tasks3(tasks, cfg.tasks3)
    check_calibration(cfg.calibration)
    check_keys(cfg.correction, "correction.", CORRECTION)
    methods = _names(cfg, "methods", allow_empty=False)
    fixed = _names(cfg, "fixed_methods", allow_empty=True)
    both = sorted(set(methods) & set(fixed))
    if both:
        _fail("fixed_methods", fixed, f"{both} also in methods; list each method once")
    for name in methods + fixed:
        build_method(name, method_cfg(cfg, name))
        if name != "react":
            check_keys(cfg.baselines.get(name), f"baselines.{name}.", SETTINGS)
    check_preferences(cfg.preferences, tasks)
    preference_sets(cfg.preferences, tasks, tasks3)
