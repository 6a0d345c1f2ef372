"""Parameter-space merges: pure functions from state dicts (dict[str, Tensor]) to state dicts.

- ``task_arithmetic``, ``weighted_task_arithmetic``, ``preference_task_arithmetic``,
  ``weight_average``, ``task_vectors``, ``apply``   (merging/task_arithmetic.py)
- ``ties``, ``ties_trim``, ``ties_process``           (merging/ties.py)
- ``adamerging``, ``adamerging_pp``, ``apply_adamerging_coefficients``,
  ``save_coefficients``, ``load_coefficients``       (merging/adamerging.py)
- ``lot_merging``                                      (merging/lot.py)

Every merge validates its state dicts first (keys, shapes, dtypes, devices; the first
offending key and expert are named), never modifies its inputs, and copies non-float
tensors from the pretrained state dict.
"""

from .adamerging import (
    AdaMergingResult,
    adamerging,
    adamerging_pp,
    apply_adamerging_coefficients,
    load_coefficients,
    save_coefficients,
)
from .adamerging import (
    converged as adamerging_converged,
)
from .lot import lot_merging
from .task_arithmetic import (
    apply,
    preference_task_arithmetic,
    task_arithmetic,
    task_vectors,
    weight_average,
    weighted_task_arithmetic,
)
from .ties import ties, ties_process, ties_trim

__all__ = [
    "AdaMergingResult",
    "adamerging",
    "adamerging_converged",
    "adamerging_pp",
    "apply",
    "apply_adamerging_coefficients",
    "load_coefficients",
    "lot_merging",
    "preference_task_arithmetic",
    "save_coefficients",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "ties_process",
    "ties_trim",
    "weight_average",
    "weighted_task_arithmetic",
]
