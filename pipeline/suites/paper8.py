"""The paper's eight tasks on a real open_clip backbone, built into the common suite layout.

Tasks SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (facts in
``paper8_tasks.json``: hub ids, split and column names, the task-vectors protocol's class
names and templates). Backbone: an open_clip CLIP (``configs/backbone/vit_b32.yaml`` etc.,
OpenAI weights) or, for tests, a custom ``clip_kwargs`` model with a local checkpoint.
Experts: FusionBench transformers checkpoints, the task-vectors release, or local state
dicts (``pipeline.checkpoints``).

Cache units (each keyed by its config, its inputs' keys and a code version):

    paper8_images[task]   dataset -> train / val / test uint8 (N, 3, S, S) npy, decoded once
    paper8_backbone       open_clip model -> its image tower, logit scale, mean / std
    paper8_pretrained     the pretrained tower, when it does not come from open_clip
                          (task-vectors zeroshot.pt, a transformers or state-dict checkpoint)
    paper8_expert[task]   one expert's image tower, mapped to open_clip keys and checked
    paper8_head[task]     zero-shot head (pipeline.zeroshot) of one task
    paper8_heads          the suite's heads file (one (C_t, D) tensor per task)

Before computing anything, every unit is looked up; if any is missing, the files and hub
entries it needs are checked together (:func:`check_sources`) and one
``MissingResourceError`` lists what is missing and how to get it. Hub sources are keyed by id
and revision, so a cached suite builds offline; local files and folders are keyed by path,
size and mtime, so they must still be there (a changed file rebuilds what depends on it).

Splits: ``train`` and ``test`` are the dataset's; ``val`` is ``val_fraction`` of train drawn as
FusionBench's ``train_validation_split`` does (``torch.utils.data.random_split`` with
``torch.Generator().manual_seed(val_seed)``), and ``train`` keeps the rest. ``max_per_split``
keeps a seeded random subset of each split (tiny runs).

Entry point: ``build(cfg, cache, progress=True) -> Suite`` with ``cfg`` the ``suite`` config
node merged with ``{"backbone": <backbone node>}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import checkpoints as ckpt
from ..cache import Cache, Unit, stable_hash
from ..checkpoints import CheckpointRef, Resource
from ..codeversion import code_version
from ..suite import SPLITS, Suite, preprocess_pil, save_state

log = logging.getLogger(__name__)

TASKS_FILE = Path(__file__).with_name("paper8_tasks.json")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOURCES = ("hf", "task_vectors", "state_dict")
# per unit, the modules whose code computes it (their source hash is in the unit's key)
_UNIT_CODE = {
    "images": ("pipeline.suite",),
    "backbone": ("pipeline.suite",),
    "pretrained": ("pipeline.checkpoints", "pipeline.suite"),
    "expert": ("pipeline.checkpoints", "pipeline.suite"),
    "head": ("pipeline.zeroshot",),
    "heads": (),
}
CODE_VERSIONS = {k: code_version(__name__, *mods) for k, mods in _UNIT_CODE.items()}
_CHUNK = 64  # images per decoding task


@functools.cache
def task_facts() -> dict[str, dict[str, Any]]:
    """Per task: hub id, config, splits, columns, class names, templates (paper8_tasks.json)."""
    return json.loads(TASKS_FILE.read_text())["tasks"]


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _as_config(cfg, backbone=None) -> DictConfig:
    cfg = OmegaConf.create(_plain(cfg))  # a resolved, non-struct copy (Hydra nodes are struct)
    if backbone is not None:
        cfg = OmegaConf.merge(cfg, {"backbone": _plain(backbone)})
    return cfg


# ====================================================================== backbone
@dataclasses.dataclass(frozen=True)
class Backbone:
    """The open_clip model a suite is built on, resolved from the backbone config.

    ``model_config`` is what ``pipeline.suite.build_clip`` rebuilds: ``{"model_name": n}`` with
    ``n`` the open_clip name whose activation matches the weights (OpenAI CLIP was trained
    with QuickGELU: ``ViT-B-32`` + ``openai`` resolves to ``ViT-B-32-quickgelu``), or
    ``{"clip_kwargs": {...}}`` for a custom model. ``pretrained`` is an open_clip tag or a
    file holding a whole CLIP state dict.
    """

    model_config: dict[str, Any]
    pretrained: str
    quick_gelu: bool
    image_size: int
    tag: dict[str, Any]  # open_clip's pretrained config of the tag ({} for a file)

    def material(self) -> dict[str, Any]:
        m = {"model_config": self.model_config, "pretrained": self.pretrained}
        if not self.tag and Path(self.pretrained).is_file():
            st = Path(self.pretrained).stat()
            m["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return m

    def resource(self) -> Resource:
        what = "pretrained CLIP weights (open_clip)"
        if not self.tag:
            return Resource(
                what,
                "file",
                self.pretrained,
                "a whole-CLIP state dict (safetensors or torch.save(model.state_dict()))",
            )
        name = self.model_config["model_name"]
        fix = (
            f'python -c "import pipeline.compat, open_clip; open_clip.create_model('
            f"'{name}', pretrained='{self.pretrained}')\""
        )
        hub = os.path.split(str(self.tag.get("hf_hub") or ""))[0]  # open_clip: "org/name/[file]"
        if hub:
            return Resource(what, "hub_model", hub, fix + f"  (or: hf download {hub})")
        return Resource(what, "file", str(self.tag.get("url")), fix)


def resolve_backbone(bcfg) -> Backbone:
    """Validate the backbone config and resolve the open_clip model (no weights loaded)."""
    import open_clip

    bcfg = _plain(bcfg) or {}
    name, kwargs, pretrained = (
        bcfg.get("model_name"),
        bcfg.get("clip_kwargs"),
        bcfg.get("pretrained"),
    )
    if not name and not kwargs and bcfg.get("name") == "offline":
        raise ValueError(
            "suite=paper8 needs a CLIP backbone, and backbone=offline (the default) is the "
            "offline suite's own model: add backbone=vit_b32 (or vit_b16, vit_l14; "
            "configs/backbone/), as `make <target> SUITE=paper8` does"
        )
    if bool(name) == bool(kwargs):
        raise ValueError(
            "the backbone needs exactly one of model_name (an open_clip name, e.g. ViT-B-32) and "
            f"clip_kwargs (a custom open_clip.CLIP config); got model_name={name!r}, "
            f"clip_kwargs={'set' if kwargs else None}"
        )
    if not pretrained:
        raise ValueError(
            "backbone.pretrained must be an open_clip tag (e.g. openai) or a checkpoint file"
        )
    pretrained = str(pretrained)
    if kwargs:
        vision = kwargs.get("vision_cfg") or {}
        if "image_size" not in vision:
            raise ValueError("backbone.clip_kwargs.vision_cfg.image_size is required")
        return Backbone(
            {"clip_kwargs": kwargs},
            pretrained,
            bool(kwargs.get("quick_gelu", False)),
            _side(vision["image_size"]),
            {},
        )
    if name not in open_clip.list_models():
        raise ValueError(
            f"backbone.model_name {name!r} is not an open_clip model (open_clip.list_models())"
        )
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if not tag and not _looks_like_path(pretrained):
        raise ValueError(
            f"backbone.pretrained {pretrained!r} is neither an open_clip tag of {name} "
            f"({open_clip.list_pretrained_tags_by_model(name)}) nor a file path"
        )
    model_cfg = open_clip.get_model_config(name)
    quick = bool(model_cfg.get("quick_gelu", False))
    if tag.get("quick_gelu", False) and not quick:
        if f"{name}-quickgelu" not in open_clip.list_models():
            raise ValueError(
                f"{name} weights {pretrained!r} need QuickGELU but open_clip has no "
                f"{name}-quickgelu config"
            )
        name, quick = f"{name}-quickgelu", True
        tag = open_clip.get_pretrained_cfg(name, pretrained) or tag
        model_cfg = open_clip.get_model_config(name)
    return Backbone(
        {"model_name": name},
        pretrained,
        quick,
        _side(model_cfg["vision_cfg"]["image_size"]),
        dict(tag),
    )


def _side(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"only square inputs are supported; image_size={size}")
        size = size[0]
    return int(size)


def _looks_like_path(s: str) -> bool:
    return "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        state = ckpt.load_safetensors(path)
    else:
        state = ckpt.load_torch_weights(path)
        state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip(backbone: Backbone) -> torch.nn.Module:
    """The pretrained open_clip CLIP (both towers), in eval mode on the CPU."""
    import open_clip

    if "clip_kwargs" in backbone.model_config:
        model = open_clip.CLIP(**backbone.model_config["clip_kwargs"])
        model.load_state_dict(_load_state(backbone.pretrained))
    elif backbone.tag:
        model = open_clip.create_model(
            backbone.model_config["model_name"], pretrained=backbone.pretrained
        )
    else:
        model = open_clip.create_model(backbone.model_config["model_name"], pretrained=None)
        model.load_state_dict(_load_state(backbone.pretrained))
    return model.eval()


# ====================================================================== experts
def checkpoint_refs(cfg: DictConfig) -> tuple[CheckpointRef | None, dict[str, CheckpointRef]]:
    """(pretrained ref or None for the open_clip weights, {task: expert ref}) from the config.

    ``backbone.experts.source`` picks where experts come from:
    - ``hf``: ``experts.hf.template.format(suffix=..., task=...)``, e.g.
      ``tanganke/clip-vit-base-patch32_{suffix}`` (a hub id or a local folder);
    - ``task_vectors``: ``<experts.task_vectors.root>/<Task>/finetuned.pt``;
    - ``state_dict``: ``experts.state_dict.template.format(task=..., suffix=...)``.
    ``experts.overrides.<Task>: {source, location}`` replaces one task's expert.
    ``experts.pretrained``: null (the experts' own family: task_vectors ``<root>/zeroshot.pt``;
    hf ``experts.hf.pretrained``, e.g. ``openai/clip-vit-base-patch32``, the hub weights the
    FusionBench experts were fine-tuned from, or the open_clip weights when that is null;
    state_dict the open_clip weights), ``open_clip``, or a location read in the experts'
    format (a ``.safetensors`` file is always read as a state dict, a folder or hub id as
    transformers).
    """
    e = cfg.backbone.get("experts") or {}
    source = e.get("source")
    if source not in SOURCES:
        raise ValueError(f"backbone.experts.source must be one of {SOURCES}; got {source!r}")
    facts = task_facts()
    refs = {}
    for task in cfg.tasks:
        over = (e.get("overrides") or {}).get(task)
        if over is not None:
            if over.get("source") not in SOURCES or not over.get("location"):
                raise ValueError(
                    f"backbone.experts.overrides.{task} needs source (one of {SOURCES}) and "
                    f"location; got {_plain(over)}"
                )
            refs[task] = CheckpointRef(
                f"expert {task}", over.source, str(over.location), over.get("revision")
            )
            continue
        refs[task] = _expert_ref(e, source, task, facts[task])
    pre = e.get("pretrained")
    if pre is None:
        pre_ref = None
        if source == "task_vectors":
            pre_ref = CheckpointRef(
                "pretrained",
                "task_vectors",
                str(Path(_required(e, "task_vectors", "root")) / "zeroshot.pt"),
            )
        elif source == "hf" and (e.get("hf") or {}).get("pretrained"):
            pre_ref = CheckpointRef("pretrained", "hf", str(e.hf.pretrained))
    elif str(pre) == "open_clip":
        pre_ref = None
    else:
        pre = str(pre)
        if pre.endswith(".safetensors"):
            kind = "state_dict"
        elif pre.endswith((".pt", ".pth", ".bin")):
            kind = "task_vectors" if source == "task_vectors" else "state_dict"
        else:
            kind = "hf"
        pre_ref = CheckpointRef("pretrained", kind, pre, (e.get("hf") or {}).get("revision"))
    return pre_ref, refs


def describe_pretrained(pre_ref: CheckpointRef | None, backbone: Backbone) -> str:
    """Where the pretrained image tower (theta_0 of every task vector) came from, in words."""
    if pre_ref is None:
        name = backbone.model_config.get("model_name", "custom CLIP")
        return f"open_clip {name} weights {backbone.pretrained!r}"
    what = {
        "hf": "a transformers CLIP checkpoint, mapped to open_clip keys",
        "task_vectors": "a task-vectors release checkpoint",
        "state_dict": "a state-dict file",
    }[pre_ref.kind]
    return f"{pre_ref.location} ({what}); zero-shot heads from the open_clip text tower"


def _required(e, section: str, key: str) -> str:
    value = (e.get(section) or {}).get(key)
    if not value:
        raise ValueError(
            f"backbone.experts.source={e.get('source')} needs backbone.experts.{section}.{key}"
        )
    return str(value)


def _expert_ref(e, source: str, task: str, facts: dict) -> CheckpointRef:
    names = {"task": task, "suffix": facts["expert_hf_suffix"]}
    if source == "hf":
        loc = _required(e, "hf", "template").format(**names)
        return CheckpointRef(f"expert {task}", "hf", loc, (e.get("hf") or {}).get("revision"))
    if source == "task_vectors":
        root = Path(_required(e, "task_vectors", "root"))
        return CheckpointRef(
            f"expert {task}",
            "task_vectors",
            str(root / facts["task_vectors_name"] / "finetuned.pt"),
        )
    loc = _required(e, "state_dict", "template").format(**names)
    return CheckpointRef(f"expert {task}", "state_dict", loc)


# ====================================================================== data
@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a task's images come from: a hub dataset or a ``save_to_disk`` folder."""

    task: str
    kind: str  # "hub" | "disk"
    location: str
    config_name: str | None = None
    revision: str | None = None

    def material(self) -> dict[str, Any]:
        m = dataclasses.asdict(self)
        marker = Path(self.location) / "dataset_dict.json"
        if self.kind == "disk" and marker.is_file():
            m["mtime_ns"] = marker.stat().st_mtime_ns
        return m

    def resource(self) -> Resource:
        facts = task_facts()[self.task]
        what = f"dataset of {self.task}"
        args = f"'{facts['hub_id']}'" + (
            f", '{facts['config_name']}'" if facts["config_name"] else ""
        )
        if self.kind == "disk":
            return Resource(
                what + " (a datasets save_to_disk folder)",
                "dir",
                self.location,
                f'python -c "import datasets; datasets.load_dataset({args}).save_to_disk('
                f"'{self.location}')\"  (or unset suite.data_root to read the hub)",
                needs="dataset_dict.json",
            )
        hub_args = f"'{self.location}'" + (f", '{self.config_name}'" if self.config_name else "")
        return Resource(
            what + " (Hugging Face hub)",
            "hub_dataset",
            self.location,
            f'python -c "import datasets; datasets.load_dataset({hub_args})"  (with network), '
            "or set suite.data_root to a folder of <Task>/ save_to_disk copies",
            revision=self.revision,
        )


def data_source(cfg: DictConfig, task: str) -> DataSource:
    facts = task_facts()[task]
    over = (cfg.get("hub_ids") or {}).get(task)
    if over:
        if Path(str(over)).is_dir():
            return DataSource(task, "disk", str(over))
        return DataSource(task, "hub", str(over), facts["config_name"], facts["revision"])
    if cfg.get("data_root"):
        return DataSource(task, "disk", str(Path(cfg.data_root) / task))
    return DataSource(task, "hub", facts["hub_id"], facts["config_name"], facts["revision"])


def load_splits(source: DataSource) -> dict[str, Any]:
    """{"train": Dataset, "test": Dataset} of a task, with columns and labels checked."""
    import datasets

    facts = task_facts()[source.task]
    if source.kind == "disk":
        dd = datasets.load_from_disk(source.location)
    else:
        dd = datasets.load_dataset(source.location, source.config_name, revision=source.revision)
    out = {}
    for ours, theirs in facts["splits"].items():
        if theirs not in dd:
            raise ValueError(f"{source.location} has no {theirs!r} split (has {list(dd)})")
        ds = dd[theirs]
        for col in (facts["image_column"], facts["label_column"]):
            if col not in ds.column_names:
                raise ValueError(
                    f"{source.location}[{theirs}] has no column {col!r} ({ds.column_names})"
                )
        label = ds.features[facts["label_column"]]
        n_cls = len(facts["classnames"])
        if isinstance(label, datasets.ClassLabel) and label.num_classes != n_cls:
            raise ValueError(
                f"{source.location}[{theirs}] has {label.num_classes} classes but the task-vectors "
                f"class names of {source.task} are {n_cls}: not the dataset this task expects"
            )
        out[ours] = ds
    return out


def split_indices(
    n_train: int,
    n_test: int,
    val_fraction: float,
    val_seed: int,
    max_per_split: int | None = None,
    subset_seed: int = 0,
) -> dict[str, tuple[str, np.ndarray]]:
    """{split: (dataset split it reads, sorted row indices)} for train / val / test.

    val: the last ``int(n_train * val_fraction)`` entries of
    ``torch.randperm(n_train, generator=torch.Generator().manual_seed(val_seed))``, train the
    rest (= ``torch.utils.data.random_split`` as FusionBench uses it); test: all rows. With
    ``max_per_split`` each split keeps a ``default_rng([subset_seed, i])`` random subset.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    n_val = int(n_train * val_fraction)
    if n_val < 1 or n_train - n_val < 1:
        raise ValueError(f"a train split of {n_train} rows leaves no val or no train rows")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(val_seed))).numpy()
    parts = {
        "train": ("train", perm[: n_train - n_val]),
        "val": ("train", perm[n_train - n_val :]),
        "test": ("test", np.arange(n_test)),
    }
    out = {}
    for i, s in enumerate(SPLITS):
        src, idx = parts[s]
        if max_per_split is not None and len(idx) > max_per_split:
            rng = np.random.default_rng([int(subset_seed), i])
            idx = rng.choice(idx, size=int(max_per_split), replace=False)
        out[s] = (src, np.sort(idx).astype(np.int64))
    return out


_DECODE: tuple[Any, str, int] | None = None  # (dataset, image column, size) in a worker


def _init_decoder(ds, column: str, size: int) -> None:
    global _DECODE
    _DECODE = (ds.select_columns([column]), column, size)


def _decode_chunk(rows: np.ndarray) -> np.ndarray:
    ds, column, size = _DECODE
    images = ds[[int(r) for r in rows]][column]
    return np.stack([preprocess_pil(im, size) for im in images])


def write_images(
    ds,
    column: str,
    rows: np.ndarray,
    size: int,
    out_file: Path,
    num_workers: int = 1,
    desc: str = "",
    progress: bool = False,
    chunk: int = _CHUNK,
) -> None:
    """Decode ``ds[rows][column]`` with :func:`pipeline.suite.preprocess_pil` into ``out_file``.

    Written chunk by chunk into a memory-mapped ``.npy`` of uint8 (N, 3, size, size), the same
    file ``pipeline.suite.write_split`` writes, without holding the split in memory; decoding
    runs in ``num_workers`` processes (``chunk`` images per task) when > 1.
    """
    arr = np.lib.format.open_memmap(
        out_file, mode="w+", dtype=np.uint8, shape=(len(rows), 3, size, size)
    )
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc, unit="img")
    pool = None
    if num_workers > 1 and len(chunks) > 1:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(min(num_workers, len(chunks)), _init_decoder, (ds, column, size))
        blocks = pool.imap(_decode_chunk, chunks)
    else:
        _init_decoder(ds, column, size)
        blocks = map(_decode_chunk, chunks)
    try:
        pos = 0
        for block in blocks:
            arr[pos : pos + len(block)] = block
            pos += len(block)
            if bar is not None:
                bar.update(len(block))
        arr.flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    del arr


def _num_workers(value) -> int:
    if value in (None, "auto"):
        return min(os.cpu_count() or 1, 16)
    return int(value)


def make_images(
    out: Path, source: DataSource, image_size: int, cfg: DictConfig, progress: bool
) -> dict:
    """The ``paper8_images`` unit: train / val / test folders of one task."""
    facts = task_facts()[source.task]
    splits = load_splits(source)
    n_cls = len(facts["classnames"])
    plan = split_indices(
        len(splits["train"]),
        len(splits["test"]),
        float(cfg.val_fraction),
        int(cfg.val_seed),
        cfg.get("max_per_split"),
        int(cfg.get("subset_seed", 0)),
    )
    sizes, full = {}, {k: len(v) for k, v in splits.items()}
    for split, (src, rows) in plan.items():
        ds = splits[src]
        labels = np.asarray(
            ds.select_columns([facts["label_column"]]).with_format("numpy")[facts["label_column"]],
            dtype=np.int64,
        )[rows]
        if len(labels) and (labels.min() < 0 or labels.max() >= n_cls):
            raise ValueError(f"{source.location}[{src}] has labels outside 0..{n_cls - 1}")
        d = out / split
        d.mkdir(parents=True)
        write_images(
            ds,
            facts["image_column"],
            rows,
            image_size,
            d / "images.npy",
            _num_workers(cfg.get("num_workers")),
            f"{source.task}/{split}",
            progress,
        )
        np.save(d / "labels.npy", labels)
        np.save(d / "source_index.npy", rows)
        sizes[split] = int(len(rows))
    if full["test"] != facts["test_size"]:
        log.warning(
            "%s: the test split has %d images, the paper's has %d",
            source.task,
            full["test"],
            facts["test_size"],
        )
    return {"sizes": sizes, "full_sizes": full, "source": dataclasses.asdict(source)}


# ====================================================================== validation / sources
def validate(cfg, backbone=None) -> None:
    """Config checks that need no files and no network; ValueError names the bad key."""
    cfg = _as_config(cfg, backbone)
    facts = task_facts()
    tasks = list(cfg.tasks)
    if not tasks:
        raise ValueError(f"suite.tasks is empty; choose from {list(facts)}")
    unknown = [t for t in tasks if t not in facts]
    if unknown:
        raise ValueError(f"suite.tasks has unknown tasks {unknown}; choose from {list(facts)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"suite.tasks lists a task twice: {tasks}")
    if not 0 < float(cfg.val_fraction) < 1:
        raise ValueError(f"suite.val_fraction must be in (0, 1); got {cfg.val_fraction}")
    m = cfg.get("max_per_split")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"suite.max_per_split must be a positive int or null; got {m!r}")
    nw = cfg.get("num_workers", "auto")
    if nw != "auto" and (not isinstance(nw, int) or nw < 0):
        raise ValueError(f"suite.num_workers must be 'auto' or an int >= 0; got {nw!r}")
    if "backbone" not in cfg:
        raise ValueError("the paper8 suite needs a backbone config (backbone=vit_b32, ...)")
    resolve_backbone(cfg.backbone)
    checkpoint_refs(cfg)


def sources(cfg) -> list[Resource]:
    """Every file and hub entry a from-scratch build of ``cfg`` reads."""
    cfg = _as_config(cfg)
    pre, experts = checkpoint_refs(cfg)
    out = [resolve_backbone(cfg.backbone).resource()]
    out += [data_source(cfg, t).resource() for t in cfg.tasks]
    out += [r.resource() for r in ([pre] if pre else []) + list(experts.values())]
    return out


def check_sources(cfg, only: list[Resource] | None = None) -> None:
    """Raise one ``MissingResourceError`` naming every missing source of ``cfg`` (or ``only``)."""
    resources = sources(cfg) if only is None else only
    unique = list(dict.fromkeys(resources))
    ckpt.check_resources(unique, context=f"the {_as_config(cfg).get('name', 'paper8')} suite")


# ====================================================================== build
@dataclasses.dataclass
class _Plan:
    stage: str
    material: dict[str, Any]
    compute: Callable[[Path], dict | None]
    resources: list[Resource]

    @property
    def key(self) -> str:  # the key Cache.unit gives (stage + material)
        return stable_hash({"stage": self.stage, "material": self.material})


class _ClipHolder:
    """Loads the pretrained open_clip model once, on first use."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self._model = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            t = time.perf_counter()
            self._model = load_clip(self.backbone)
            log.info("loaded the pretrained CLIP in %.1f s", time.perf_counter() - t)
        return self._model


def build(cfg, cache: Cache, progress: bool = True) -> Suite:
    """Build (or load from ``cache``) the paper8 suite of ``cfg`` (suite node + ``backbone``)."""
    cfg = _as_config(cfg)
    validate(cfg)
    t0 = time.perf_counter()
    tasks = list(cfg.tasks)
    facts = {t: task_facts()[t] for t in tasks}
    backbone = resolve_backbone(cfg.backbone)
    pre_ref, expert_refs = checkpoint_refs(cfg)
    holder = _ClipHolder(backbone)
    from ..features import resolve_device

    device = resolve_device(str(cfg.get("device", "auto")))
    plans: dict[str, _Plan] = {}

    # ------------------------------------------------------------ images
    for task in tasks:
        src = data_source(cfg, task)
        plans[f"images/{task}"] = _Plan(
            "paper8_images",
            {
                "code": CODE_VERSIONS["images"],
                "source": src.material(),
                "facts": {k: facts[task][k] for k in ("splits", "image_column", "label_column")},
                "classes": len(facts[task]["classnames"]),
                "image_size": backbone.image_size,
                "val_fraction": float(cfg.val_fraction),
                "val_seed": int(cfg.val_seed),
                "max_per_split": cfg.get("max_per_split"),
                "subset_seed": int(cfg.get("subset_seed", 0)),
            },
            functools.partial(
                make_images, source=src, image_size=backbone.image_size, cfg=cfg, progress=progress
            ),
            [src.resource()],
        )

    # ------------------------------------------------------------ backbone (open_clip)
    def make_backbone(out: Path) -> dict:
        model = holder.model
        meta = {
            "logit_scale": float(model.logit_scale.exp().item()),
            "mean": list(backbone.tag.get("mean", OPENAI_MEAN)),
            "std": list(backbone.tag.get("std", OPENAI_STD)),
        }
        save_state(
            out / "visual.safetensors",
            model.visual.state_dict(),
            {
                "role": "pretrained (open_clip)",
                "model_config": backbone.model_config,
                "pretrained": backbone.pretrained,
            },
        )
        (out / "meta.json").write_text(json.dumps(meta))
        return meta

    plans["backbone"] = _Plan(
        "paper8_backbone",
        {"code": CODE_VERSIONS["backbone"], "backbone": backbone.material()},
        make_backbone,
        [backbone.resource()],
    )
    loaded: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def load(plan: _Plan, name: str) -> dict[str, torch.Tensor]:
        """A file of an already built unit, read (and checksum-verified) once per build."""
        if (plan.key, name) not in loaded:
            loaded[(plan.key, name)] = _load(cache, plan, name)
        return loaded[(plan.key, name)]

    def backbone_visual() -> dict[str, torch.Tensor]:
        return load(plans["backbone"], "visual.safetensors")

    # ------------------------------------------------------------ pretrained tower
    if pre_ref is not None:

        def make_pretrained(out: Path) -> dict:
            state, info = ckpt.load_checkpoint(pre_ref, backbone_visual(), backbone.quick_gelu)
            save_state(out / "pretrained.safetensors", state, {"role": "pretrained", **info})
            return info

        plans["pretrained"] = _Plan(
            "paper8_pretrained",
            {
                "code": CODE_VERSIONS["pretrained"],
                "ref": pre_ref.material(),
                "backbone": plans["backbone"].key,
            },
            make_pretrained,
            [pre_ref.resource()],
        )
        pre_plan, pre_file = plans["pretrained"], "pretrained.safetensors"
    else:
        pre_plan, pre_file = plans["backbone"], "visual.safetensors"

    # ------------------------------------------------------------ experts
    for task in tasks:
        ref = expert_refs[task]

        def make_expert(out: Path, ref=ref, task=task) -> dict:
            reference = load(pre_plan, pre_file)
            state, info = ckpt.load_checkpoint(ref, reference, backbone.quick_gelu)
            save_state(out / "expert.safetensors", state, {"role": "expert", "task": task, **info})
            return info

        plans[f"expert/{task}"] = _Plan(
            "paper8_expert",
            {
                "code": CODE_VERSIONS["expert"],
                "task": task,
                "ref": ref.material(),
                "pretrained": pre_plan.key,
                "quick_gelu": backbone.quick_gelu,
            },
            make_expert,
            [ref.resource()],
        )

    # ------------------------------------------------------------ zero-shot heads
    from .. import zeroshot

    for task in tasks:

        def make_head(out: Path, task=task) -> dict:
            head = zeroshot.zeroshot_head(
                holder.model,
                zeroshot.tokenizer_for(backbone.model_config),
                facts[task]["classnames"],
                facts[task]["templates"],
                device,
                int(cfg.get("text_batch_size", 256)),
            )
            save_state(out / "head.safetensors", {"head": head}, {"task": task})
            return {"classes": int(head.shape[0]), "dim": int(head.shape[1])}

        plans[f"head/{task}"] = _Plan(
            "paper8_head",
            {
                "code": CODE_VERSIONS["head"],
                "backbone": backbone.material(),
                "classnames": facts[task]["classnames"],
                "templates": facts[task]["templates"],
            },
            make_head,
            [backbone.resource()],
        )

    def make_heads(out: Path) -> None:
        heads = {t: _load(cache, plans[f"head/{t}"], "head.safetensors")["head"] for t in tasks}
        save_state(
            out / "heads.safetensors",
            heads,
            {
                "kind": "CLIP zero-shot heads (task-vectors templates)",
                "classnames": {t: facts[t]["classnames"] for t in tasks},
            },
        )

    plans["heads"] = _Plan(
        "paper8_heads",
        {"code": CODE_VERSIONS["heads"], "heads": {t: plans[f"head/{t}"].key for t in tasks}},
        make_heads,
        [],
    )

    # ------------------------------------------------------------ sources, then compute
    todo = [p for p in plans.values() if cache.lookup(p.stage, p.key) is None]
    if todo:
        check_sources(cfg, only=[r for p in todo for r in p.resources])
    units: dict[str, Unit] = {}
    for name, plan in plans.items():
        units[name] = cache.unit(plan.stage, plan.material, plan.compute)
        if units[name].key != plan.key:  # Cache.unit's key recipe changed
            raise RuntimeError(f"cache key mismatch for {name}: update _Plan.key")
    holder._model = None  # release the CLIP (and the loaded state dicts)
    loaded.clear()

    manifests = {name: cache.manifest(u) for name, u in units.items()}
    meta = json.loads(units["backbone"].file("meta.json").read_text())
    info = {
        "backbone": {
            "model_config": backbone.model_config,
            "pretrained": backbone.pretrained,
            "quick_gelu": backbone.quick_gelu,
            "image_size": backbone.image_size,
        },
        "pretrained": dataclasses.asdict(pre_ref) if pre_ref else "open_clip weights",
        "pretrained_tower": describe_pretrained(pre_ref, backbone),
        "experts": {
            t: {**dataclasses.asdict(expert_refs[t]), **manifests[f"expert/{t}"]["extra"]}
            for t in tasks
        },
        "data": {t: manifests[f"images/{t}"]["extra"] for t in tasks},
        "split_sizes": {t: manifests[f"images/{t}"]["extra"]["sizes"] for t in tasks},
        "unit_keys": {name: u.key for name, u in units.items()},
        "build_seconds": {name: round(m["seconds"], 2) for name, m in manifests.items()},
    }
    log.info("paper8 suite ready in %.1f s", time.perf_counter() - t0)
    return Suite(
        name=str(cfg.get("name", "paper8")),
        tasks=tasks,
        classnames={t: list(facts[t]["classnames"]) for t in tasks},
        model_config=backbone.model_config,
        mean=tuple(float(v) for v in meta["mean"]),
        std=tuple(float(v) for v in meta["std"]),
        logit_scale=float(meta["logit_scale"]),
        pretrained_path=units["pretrained" if pre_ref else "backbone"].file(pre_file),
        expert_paths={t: units[f"expert/{t}"].file("expert.safetensors") for t in tasks},
        heads_path=units["heads"].file("heads.safetensors"),
        data_dirs={t: {s: units[f"images/{t}"].path / s for s in SPLITS} for t in tasks},
        key=stable_hash({"suite": "paper8", "units": {n: u.key for n, u in units.items()}}),
        info=info,
    )


def _load(cache: Cache, plan: _Plan, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    unit = cache.lookup(plan.stage, plan.key)
    if unit is None:
        raise RuntimeError(f"{plan.stage} unit {plan.key} should have been built first")
    return load_file(str(unit.file(name)))
