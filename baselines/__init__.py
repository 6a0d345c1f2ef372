"""Baselines ReACT is judged against (method.md sections 3 and 4).

Pure math / training on tensors and state dicts:
- ``baselines.pareto_merging``: Pareto Merging (Chen and Kwok, ICML 2025; re-implemented
  from the paper, no public code): preference-conditioned low-rank updates of a base merge.
- ``baselines.map``: MAP (Li et al., arXiv 2406.07529): quadratic surrogates of Task
  Arithmetic scalings, NSGA-III front, preference-weighted pick.
- ``baselines.surgery``: Representation Surgery (Yang et al., ICML 2024): per-task
  low-rank adapters on the merged embedding.
Preference-weighted Task Arithmetic lives in ``pipeline.methods`` (``pref_ta``).

Importing this package registers the pipeline adapters (``baselines.methods``) as the
methods ``pareto_merging``, ``map`` and ``surgery`` of ``pipeline.methods.METHODS``.
"""

from . import map, methods, pareto_merging, surgery  # noqa: F401  (methods registers the pipeline methods)
