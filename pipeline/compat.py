"""Make ``import torchvision`` (and so open_clip / transformers) work on CPU-only torch.

PyPI ships only CUDA builds of torchvision; on the CPU build of torch its import fails with
"operator torchvision::nms does not exist". Defining the two missing operator *schemas*
(not kernels) is enough for transforms, models and datasets to work. Where torchvision
works (GPU machines, users' CUDA installs) this module does nothing.

Import this before anything imports torchvision; ``pipeline/__init__.py`` does.
"""

from __future__ import annotations

import torch

_LIB = None  # keep the Library object alive for the life of the process


def ensure_torchvision_ops() -> None:
    global _LIB
    if _LIB is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup is the check
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib


ensure_torchvision_ops()
