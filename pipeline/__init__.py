"""Orchestration: Hydra stages, caching, suites, feature extraction, reports, W&B.

The torchvision guard is imported first so every process that imports the pipeline
(including Hydra joblib / submitit workers) can import open_clip on CPU-only torch;
``lifecycle`` registers the ``${run_id:}`` resolver of the run folders.
"""

from . import (
    compat,  # noqa: F401  (must come first)
    lifecycle,  # noqa: F401  (the ${run_id:} resolver of the run folders)
    paths,  # noqa: F401  (the ${project_root:} resolver of configs/paths)
)
