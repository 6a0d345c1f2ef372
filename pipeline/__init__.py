"""Orchestration: Hydra stages, caching, suites, feature extraction, reports, W&B.

The torchvision guard is imported first so every process that imports the pipeline
(including Hydra joblib / submitit workers) can import open_clip on CPU-only torch.
"""

from . import (
    compat,  # noqa: F401  (must come first)
    paths,  # noqa: F401  (the ${project_root:} resolver of configs/paths)
)
