"""The ``merge`` config group: dispatch a merge config to the pure functions in ``merging``.

Each merge result is one cache unit holding ``merged.safetensors`` (the image tower's state
dict) and, for learned merges, what was learned (AdaMerging coefficients), so a second run
with the same config skips the training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import merging
from merging.ties import KEEP_RULES, ZERO_SIGN_RULES

from .cache import Cache, Unit
from .codeversion import merge_code
from .suite import Suite, normalize_images, save_state

log = logging.getLogger("react")
MERGES = (
    "task_arithmetic",
    "ties",
    "weight_average",
    "adamerging",
    "adamerging_pp",
    "lot",
    "pretrained",
)


class IndexedImages:
    """uint8 images of one split, indexable by a LongTensor of indices (memory-mapped)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(idx)]))


def validate_merge_config(cfg) -> None:
    if cfg.name not in MERGES:
        raise ValueError(f"unknown merge {cfg.name!r}; choose merge= one of {list(MERGES)}")
    if "scale" in cfg and not cfg.scale > 0:
        raise ValueError(f"merge.scale must be > 0, got {cfg.scale}")
    if "density" in cfg and not 0 < cfg.density <= 1:
        raise ValueError(f"merge.density must be in (0, 1], got {cfg.density}")
    for key, allowed in (("keep_rule", KEEP_RULES), ("zero_sign", ZERO_SIGN_RULES)):
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"merge.{key} must be one of {list(allowed)}, got {cfg[key]!r}")


_CONVENTIONS = {
    "floor_plus_one": "keeps int({density} N) + 1 entries of each task vector (the original TIES code)",
    "round": "keeps round({density} N) entries of each task vector (the TIES paper's top-k)",
    "majority": "an entry whose trimmed values cancel exactly takes the model's majority sign "
    "(the original TIES code)",
    "zero": "an entry whose trimmed values cancel exactly gets 0 (the TIES paper read literally)",
}


def merge_conventions(cfg) -> str | None:
    """One sentence naming the TIES conventions of a merge config (None: no TIES step)."""
    if not (cfg.name == "ties" or (cfg.name in ("adamerging", "adamerging_pp") and cfg.ties)):
        return None
    keep = _CONVENTIONS[cfg.keep_rule].format(density=cfg.density)
    return (
        f"TIES{'-processed task vectors' if cfg.name != 'ties' else ''}: {keep}, N = the "
        f"entries of the tensors that carry a task vector; {_CONVENTIONS[cfg.zero_sign]}"
    )


def merge_material(cfg, suite: Suite, device: torch.device) -> dict:
    """What determines a merge's weights: the cache key material of ``run_merge``."""
    material = {"suite": suite.key, "merge": cfg, "code": merge_code(cfg.name)}
    if cfg.name in ("adamerging", "adamerging_pp", "lot"):
        material["device_type"] = device.type  # learned merges are not bit-equal across devices
    return material


def run_merge(cfg, suite: Suite, cache: Cache, device: torch.device, progress: bool = True) -> Unit:
    """Merged image-tower state dict for ``cfg`` (a ``merge`` group node), cached."""
    validate_merge_config(cfg)
    material = merge_material(cfg, suite, device)

    def compute(out: Path):
        t0 = time.perf_counter()
        pre, experts = suite.pretrained_state(), suite.expert_states()
        extra = {}
        if cfg.name == "pretrained":  # no merge: the correction is fitted on theta_0 itself
            merged = pre
        elif cfg.name == "task_arithmetic":
            merged = merging.task_arithmetic(pre, experts, scale=cfg.scale)
        elif cfg.name == "ties":
            merged = merging.ties(
                pre,
                experts,
                scale=cfg.scale,
                density=cfg.density,
                merge=cfg.combine,
                keep_rule=cfg.keep_rule,
                zero_sign=cfg.zero_sign,
            )
        elif cfg.name == "weight_average":
            merged = merging.weight_average(experts)
        elif cfg.name in ("adamerging", "adamerging_pp"):
            heads = suite.heads()
            unlabeled = [IndexedImages(suite.split(t, cfg.data_split)[0]) for t in suite.tasks]
            res = merging.adamerging(
                pre,
                experts,
                suite.build_visual(),
                [heads[t] for t in suite.tasks],
                unlabeled,
                granularity=cfg.granularity,
                ties=bool(cfg.ties),
                density=cfg.density,
                ties_keep_rule=cfg.keep_rule,
                ties_zero_sign=cfg.zero_sign,
                steps=cfg.steps,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                init=cfg.init,
                logit_scale=suite.logit_scale,
                prepare=lambda b: normalize_images(b.to(device), suite.mean, suite.std),
                seed=cfg.seed,
                device=device,
                progress=progress,
                tol=cfg.get("converge_tol"),
                window=int(cfg.get("converge_window", 25)),
            )
            merged = res.state_dict
            merging.save_coefficients(out / "coefficients.safetensors", res)
            extra["final_entropy"] = float(res.entropy_history[-1]) if res.entropy_history else None
            extra["steps_used"] = len(res.entropy_history)
            extra["forward_passes"] = (
                len(res.entropy_history) * len(suite.tasks) * int(cfg.batch_size)
            )
            log.info(
                "%s: %d of %d steps (%s), final entropy %.4f",
                cfg.name,
                len(res.entropy_history),
                int(cfg.steps),
                "entropy converged" if len(res.entropy_history) < int(cfg.steps) else "all steps",
                res.entropy_history[-1] if res.entropy_history else float("nan"),
            )
        elif cfg.name == "lot":
            rng = np.random.default_rng(cfg.seed)
            exemplars = []
            for t in suite.tasks:
                imgs = suite.split(t, cfg.exemplar_split)[0]
                k = min(int(cfg.exemplars), imgs.shape[0])
                sel = np.sort(rng.choice(imgs.shape[0], size=k, replace=False))
                exemplars.append(torch.from_numpy(np.ascontiguousarray(imgs[sel])))
            merged = merging.lot_merging(
                pre,
                experts,
                suite.build_visual(),
                exemplars,
                scale=cfg.scale,
                prepare=lambda b: normalize_images(b.to(device), suite.mean, suite.std),
                batch_size=cfg.batch_size,
                device=device,
                progress=progress,
            )
            extra["forward_passes"] = sum(len(e) for e in exemplars)
        save_state(
            out / "merged.safetensors",
            merged,
            meta={"merge": OmegaConf.to_container(cfg, resolve=True)},
        )
        extra["seconds"] = time.perf_counter() - t0
        return extra

    return cache.unit("merge", material, compute)


def load_merged(unit: Unit) -> dict[str, torch.Tensor]:
    return load_file(str(unit.file("merged.safetensors")))
