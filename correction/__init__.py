"""Representation correction: ReACT's closed-form maps (``react``) and folding them into
CLIP checkpoints (``fold``). Pure tensor math; no configuration, logging or files except the
explicit save/load helpers."""

from . import fold, react

__all__ = ["fold", "react"]
