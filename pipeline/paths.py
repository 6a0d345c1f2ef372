"""Where the project writes: anchored to the project root or to environment variables,
never silently to the current directory.

``configs/paths/default.yaml`` reads ``${project_root:}`` (this module's resolver): the
folder holding ``configs/`` and the packages, so ``react-merging`` (or ``python -m
pipeline.main``) run from any directory writes to ``<project>/outputs``. ``REACT_ROOT``,
``REACT_OUTPUTS`` and ``REACT_CACHE`` move it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(PROJECT_ROOT / "configs")  # a str, as Hydra's initialize_config_dir wants


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def describe_cache(root: Path) -> str:
    """One line for the start of a run: where the cache is and how full it is."""
    root = Path(root)
    stages = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    units = sum(1 for s in stages for u in s.iterdir() if u.is_dir() and not u.name.startswith("."))
    if units == 0:
        return f"cache {root}: empty (the suite is built first; the offline suite takes minutes)"
    return f"cache {root}: {units} cached units"


register_resolvers()
