"""Evaluation: metrics (accuracy, normalised accuracy, hypervolume, uniformity, preference
alignment), preference sets on the simplex, and the paper's figures.

- ``metrics``:     ``accuracy``, ``normalized_accuracy``, ``hypervolume`` (-> HypervolumeResult),
                   ``uniformity``, ``preference_alignment`` (-> MeanMetric)
- ``preferences``: ``equal``, ``one_hot``, ``priority``, ``simplex_grid``, ``dirichlet``,
                   ``pairwise``, ``embed``, ``subspace_grid``, ``validate_preferences``
- ``diagnostics``: a suite's regime: ``effective_dimension``, ``pairwise_overlaps``,
                   ``gain_share`` (``from evaluation import diagnostics``)
- ``plots``:       ``plot_pairwise_fronts``, ``plot_simplex_maps``, ``plot_scenario_bars``,
                   ``plot_cost`` (imported lazily: ``from evaluation import plots``)
"""

from . import preferences
from .metrics import (
    HypervolumeResult,
    MeanMetric,
    accuracy,
    hypervolume,
    normalized_accuracy,
    preference_alignment,
    uniformity,
)

__all__ = [
    "HypervolumeResult",
    "MeanMetric",
    "accuracy",
    "hypervolume",
    "normalized_accuracy",
    "preference_alignment",
    "preferences",
    "uniformity",
]
