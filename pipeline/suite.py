"""What a *suite* is: tasks, preprocessed images, a backbone, its experts and heads.

Every suite (the embedded offline one, the paper's eight tasks) is built by a builder
(``pipeline/suites/<name>.py``) into the same on-disk layout, and every later stage reads
it through this module only. That is what makes the offline demo and the real CLIP runs
share one code path.

Layout of a built suite (all files inside cache units, see ``pipeline.cache``):
- images: per task and split, ``images.npy`` uint8 (N, 3, H, W) already resized and
  cropped to the model's input resolution, and ``labels.npy`` int64 (N,). Decoding and
  resizing happen once; every feature extraction reads these arrays (memory-mapped).
- models: safetensors state dicts of the image tower (open_clip ``model.visual`` keys),
  one for the pretrained encoder and one per expert.
- heads: safetensors with one (C_t, D) L2-normalised tensor per task.
Splits: ``train`` (what experts were fine-tuned on), ``val`` (held out from expert
training), ``test``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import compat  # noqa: F401

SPLITS = ("train", "val", "test")
MODEL_CONFIG_FILE = "open_clip_config.json"  # beside a suite's checkpoints (write_model_config)


@dataclasses.dataclass
class Suite:
    """A built suite. Paths point into the cache; nothing heavy is loaded until asked."""

    name: str
    tasks: list[str]
    classnames: dict[str, list[str]]
    model_config: dict[str, Any]  # {"model_name": "ViT-B-32"} or {"clip_kwargs": {...}}
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    logit_scale: float
    pretrained_path: Path
    expert_paths: dict[str, Path]
    heads_path: Path
    data_dirs: dict[str, dict[str, Path]]  # task -> split -> folder with images.npy, labels.npy
    key: str  # cache key of the whole suite (changes when anything in it changes)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------- data
    def split(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (N,3,H,W) memory-mapped, labels int64 (N,)) of one task split."""
        if task not in self.data_dirs:
            raise ValueError(f"unknown task {task!r}; this suite has {self.tasks}")
        if split not in self.data_dirs[task]:
            raise ValueError(
                f"task {task!r} has no {split!r} split (has {sorted(self.data_dirs[task])})"
            )
        d = self.data_dirs[task][split]
        return np.load(d / "images.npy", mmap_mode="r"), np.load(d / "labels.npy")

    def split_size(self, task: str, split: str) -> int:
        return int(self.split(task, split)[1].shape[0])

    # ---------------------------------------------------------------- models
    def build_visual(self) -> torch.nn.Module:
        """A fresh image tower (random init); load a state dict into it."""
        return build_visual(self.model_config)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.pretrained_path))

    def expert_state(self, task: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.expert_paths[task]))

    def expert_states(self) -> list[dict[str, torch.Tensor]]:
        return [self.expert_state(t) for t in self.tasks]

    @property
    def model_config_path(self) -> Path:
        """The open_clip model config its builder wrote beside the pretrained checkpoint."""
        return Path(self.pretrained_path).parent / MODEL_CONFIG_FILE

    def heads(self) -> dict[str, torch.Tensor]:
        h = load_file(str(self.heads_path))
        return {t: h[t] for t in self.tasks}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) -> normalised float32, on the images' device."""
        return normalize_images(images, self.mean, self.std)


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def build_clip(model_config: dict[str, Any]):
    """An open_clip CLIP model (random init) from a suite's model config."""
    import open_clip

    if "model_name" in model_config:
        return open_clip.create_model(model_config["model_name"], pretrained=None)
    if "clip_kwargs" in model_config:
        return open_clip.CLIP(**model_config["clip_kwargs"])
    raise ValueError(
        f"model_config needs 'model_name' (an open_clip name) or 'clip_kwargs' (a custom "
        f"open_clip.CLIP config); got keys {sorted(model_config)}"
    )


def build_visual(model_config: dict[str, Any]) -> torch.nn.Module:
    return build_clip(model_config).visual


def open_clip_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """The ``open_clip.CLIP(**config)`` keywords of a suite's model config (custom or named)."""
    if "clip_kwargs" in model_config:
        return json.loads(json.dumps(model_config["clip_kwargs"]))  # a plain, JSON-able copy
    if "model_name" in model_config:
        import open_clip

        config = open_clip.get_model_config(model_config["model_name"])
        if config is None:
            raise ValueError(f"open_clip has no model config named {model_config['model_name']!r}")
        return config
    build_clip(model_config)  # raises the message naming the expected keys
    raise AssertionError("unreachable")


def write_model_config(out_dir: Path, model_config: dict[str, Any]) -> Path:
    """Write ``open_clip_config.json`` into ``out_dir`` (a builder calls it beside its
    checkpoints): ``open_clip.CLIP(**json.load(f))`` builds the architecture a folded
    checkpoint loads into, with nothing hand-written."""
    path = Path(out_dir) / MODEL_CONFIG_FILE
    path.write_text(json.dumps(open_clip_config(model_config), indent=1, sort_keys=True) + "\n")
    return path


# -------------------------------------------------------------------- writers for builders
def write_split(out_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one preprocessed split (uint8 (N,3,H,W), int labels) into ``out_dir``."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N,3,H,W); got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "images.npy", images)
    np.save(out_dir / "labels.npy", np.asarray(labels, dtype=np.int64))


def save_state(path: Path, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Save a state dict as safetensors (contiguous CPU copies); meta as JSON strings."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})


def preprocess_pil(image, image_size: int) -> np.ndarray:
    """CLIP-style: RGB, resize shortest side (bicubic), centre crop -> uint8 (3,H,W)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    w, h = image.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
