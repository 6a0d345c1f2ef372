"""The embedded offline suites: the project's default demo, built on a laptop CPU in minutes.

Real image classification tasks from PyPI wheels (see ``offline_data``), a small open_clip
model pretrained here as the shared "pretrained CLIP", frozen zero-shot heads, and one fully
fine-tuned expert per task (see ``offline_train``). Two recipes, chosen by
``suite.pretrain.method``:

- ``clip`` (the default suite, ``configs/suite/offline.yaml``): a mini-CLIP, both towers
  trained contrastively on weakly captioned images of a pretraining pool disjoint from every
  evaluated image (``offline_text``), and zero-shot heads from the text tower under prompt
  templates, as CLIP's;
- ``simclr`` (the first suite, ``configs/suite/offline4.yaml``): the image tower trained with
  SimCLR on the tasks' train images, and class-prototype heads of the pretrained encoder.

Everything is a cache unit, so it is built once and reused:

    offline_dataset[task]  wheel arrays -> pretraining pool + split DatasetDict (save_to_disk)
    offline_images[task]   DatasetDict -> uint8 (N, 3, H, W) npy per split
    offline_pretrained     mini-CLIP (or SimCLR) pretraining
    offline_heads          zero-shot text heads (or prototypes), one (C, D) per task
    offline_expert[task]   fine-tuned image tower under the task's frozen head

Each unit's key material is its own config subtree, the keys of the units it reads and the
code version of the modules that compute it (``pipeline.codeversion``), so e.g. a new
``finetune.steps`` rebuilds the experts only, and an edit of ``offline_text.py`` rebuilds
the mini-CLIP and everything after it.

Entry point: ``build(cfg, cache, progress=True) -> Suite`` with ``cfg`` the ``suite`` config
node (``configs/suite/offline.yaml``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..cache import Cache, Unit, stable_hash
from ..codeversion import code_version
from ..suite import Suite, save_state, write_model_config
from . import offline_data, offline_text, offline_train

log = logging.getLogger(__name__)

# Code version of each unit: a hash of the source of the modules that compute it (plus this
# builder), part of the cache key, so editing one recomputes exactly the units it produces.
_UNIT_CODE = {
    "dataset": ("pipeline.suites.offline_data", "pipeline.suites.offline_sources"),
    "images": ("pipeline.suites.offline_data", "pipeline.suite"),
    "pretrained": ("pipeline.suites.offline_train", "pipeline.suite"),
    "heads": ("pipeline.suites.offline_train", "pipeline.suite"),
    "clip": ("pipeline.suites.offline_train", "pipeline.suites.offline_text", "pipeline.suite"),
    "text_heads": ("pipeline.suites.offline_train", "pipeline.suites.offline_text"),
    "expert": ("pipeline.suites.offline_train", "pipeline.suite"),
}
CODE_VERSIONS = {k: code_version(__name__, *mods) for k, mods in _UNIT_CODE.items()}


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# Every setting of the suite is a number, null or a list of numbers but these (checked by
# pipeline.validation.validate_config before validate() below)
TEXT_KEYS = ("name", "tasks", "figure_pairs", "pretrain.method", "finetune.trainable")


def validate(cfg: DictConfig, backbone: DictConfig | None = None) -> None:
    """Raise ValueError naming the bad key before any expensive work.

    ``backbone`` (the pipeline's backbone config node, optional): the offline suite trains
    its own ViT, so only ``backbone=offline`` is meaningful with it.
    """
    if backbone is not None and backbone.get("name", "offline") != "offline":
        raise ValueError(
            f"suite=offline trains its own small ViT and cannot use backbone="
            f"{backbone.get('name')!r}; use backbone=offline (or suite=paper8 for real CLIP)"
        )
    tasks = list(cfg.tasks)
    if not tasks:
        raise ValueError("suite.tasks is empty; list some of " + str(sorted(offline_data.SOURCES)))
    unknown = [t for t in tasks if t not in offline_data.SOURCES]
    if unknown:
        raise ValueError(
            f"suite.tasks has unknown offline tasks {unknown}; choose from "
            f"{sorted(offline_data.SOURCES)}"
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"suite.tasks lists a task twice: {tasks}")
    sp = cfg.split
    vf, tf = float(sp.val_fraction), float(sp.test_fraction)
    pf = float(sp.get("pretrain_fraction", 0))
    if not 0 <= pf < 1:
        raise ValueError(f"suite.split.pretrain_fraction must be in [0, 1); got {pf}")
    if not (vf > 0 and tf > 0 and vf + tf < 1):
        raise ValueError(
            f"suite.split needs val_fraction > 0, test_fraction > 0 and their sum < 1; got "
            f"val_fraction={vf} test_fraction={tf}"
        )
    if sp.get("max_per_split") is not None and int(sp.max_per_split) < 1:
        raise ValueError(f"suite.split.max_per_split must be null or >= 1; got {sp.max_per_split}")
    m = cfg.model
    if int(m.image_size) % int(m.vision.patch_size):
        raise ValueError(
            f"suite.model.image_size {m.image_size} is not a multiple of "
            f"suite.model.vision.patch_size {m.vision.patch_size}"
        )
    if int(m.vision.width) % int(m.vision.head_width):
        raise ValueError(
            f"suite.model.vision.width {m.vision.width} is not a multiple of head_width "
            f"{m.vision.head_width}"
        )
    method = cfg.pretrain.get("method", "simclr")
    if method not in ("simclr", "clip"):
        raise ValueError(f"suite.pretrain.method must be clip or simclr; got {method!r}")
    if method == "clip":
        cap = cfg.get("captions")
        if cap is None:
            raise ValueError("suite.pretrain.method=clip needs a suite.captions section")
        name_p, wrong_p = float(cap.name_prob), float(cap.wrong_prob)
        if not (0 <= name_p and 0 <= wrong_p and name_p + wrong_p <= 1):
            raise ValueError(
                f"suite.captions needs name_prob >= 0, wrong_prob >= 0 and their sum <= 1; "
                f"got name_prob={name_p} wrong_prob={wrong_p}"
            )
        if float(cfg.split.get("pretrain_fraction", 0)) <= 0:
            raise ValueError(
                "suite.pretrain.method=clip pretrains on a pool held out from the tasks: set "
                "suite.split.pretrain_fraction > 0"
            )
    ssl = cfg.pretrain.get("ssl")
    weight = 0.0 if ssl is None else float(ssl.weight)
    if weight < 0 or (weight > 0 and method != "clip"):
        raise ValueError(
            "suite.pretrain.ssl (SLIP's SimCLR term) needs suite.pretrain.method=clip and "
            f"weight >= 0; got method={method!r} weight={weight}"
        )
    if weight > 0 and (float(ssl.temperature) <= 0 or int(ssl.hidden) < 1):
        raise ValueError(
            "suite.pretrain.ssl needs temperature > 0 and hidden >= 1; got "
            f"temperature={ssl.temperature} hidden={ssl.hidden}"
        )
    for section in ("pretrain", "finetune"):
        c = cfg[section]
        if int(c.steps) < 1 or int(c.batch_size) < 2 or float(c.lr) <= 0:
            raise ValueError(
                f"suite.{section} needs steps >= 1, batch_size >= 2 and lr > 0; got "
                f"steps={c.steps} batch_size={c.batch_size} lr={c.lr}"
            )
    offline_train.check_trainable(cfg.finetune.get("trainable", "all"))
    for key in ("train_threads", "data_workers"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"suite.{key} must be null or an integer >= 1; got {v!r}")
    if float(cfg.logit_scale) <= 0:
        raise ValueError(f"suite.logit_scale must be > 0; got {cfg.logit_scale}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(
            f"suite.mean / suite.std need 3 values (std > 0); got {cfg.mean} {cfg.std}"
        )


@contextlib.contextmanager
def _datasets_bars(enabled: bool):
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _dataset_material(cfg, task: str) -> dict:
    return {
        "code": CODE_VERSIONS["dataset"],
        "task": task,
        "source": offline_data.source_version(task),
        "split": _plain(cfg.split),
    }


def _images_material(cfg, task: str) -> dict:
    return {
        "code": CODE_VERSIONS["images"],
        "dataset": Cache.key("offline_dataset", _dataset_material(cfg, task)),
        "image_size": int(cfg.model.image_size),
    }


def _images_unit(cfg, cache: Cache, task: str) -> Unit:
    """The task's uint8 image arrays (``offline_images``), built from its split dataset
    (``offline_dataset``), which is read (and checksummed) only when the images are built."""

    def make_dataset(out):
        with _datasets_bars(False):  # quiet: a cold build would print a dozen bars
            return offline_data.write_dataset(task, cfg.split, out / "dataset")

    def make_images(out):
        dataset = cache.unit("offline_dataset", _dataset_material(cfg, task), make_dataset)
        return offline_data.write_images(dataset.file("dataset"), int(cfg.model.image_size), out)

    return cache.unit("offline_images", _images_material(cfg, task), make_images)


def _images_worker(cfg: dict, root: str, task: str) -> None:
    _images_unit(OmegaConf.create(cfg), Cache(root), task)


def _prefetch_images(cfg, cache: Cache, tasks: list[str]) -> None:
    """Build the tasks' missing image units ``suite.data_workers`` at a time in worker
    processes (a cold build: loading, splitting and rendering is single-threaded Python, about
    50 s for the eight tasks in one process). Each unit is deterministic and written through
    the cache's locks, so the result is the same files as a one-process build; if a worker
    fails, the caller's one-process loop builds the unit again and raises its error there."""
    missing = [
        t
        for t in tasks
        if cache.lookup("offline_images", Cache.key("offline_images", _images_material(cfg, t)))
        is None
    ]
    workers = min(len(missing), int(cfg.get("data_workers") or 1), os.cpu_count() or 1)
    if workers < 2 or not cache.writable:
        return
    log.info("offline suite: building the data of %d tasks in %d processes", len(missing), workers)
    plain = _plain(cfg)
    context = multiprocessing.get_context("spawn")  # the parent may hold torch/arrow threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = {t: pool.submit(_images_worker, plain, str(cache.root), t) for t in missing}
        for task, job in jobs.items():
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 - rebuilt (and raised) in this process
                log.warning(
                    "offline suite: the data worker of %s failed (%s); building it here", task, e
                )


def _load_safetensors(unit: Unit, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(unit.file(name)))


def _split(unit: Unit, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = unit.path / name
    return np.load(d / "images.npy"), np.load(d / "labels.npy")


def _pretrained_material(cfg, model_config, tasks, images_u, code: str) -> dict:
    return {
        "code": code,
        "model_config": model_config,
        "pretrain": _plain(cfg.pretrain),
        "mean": tuple(float(v) for v in cfg.mean),
        "std": tuple(float(v) for v in cfg.std),
        "images": [images_u[t].key for t in tasks],
        "threads": cfg.get("train_threads"),  # the experts and heads read this unit's key
    }


def _simclr_units(cfg, cache: Cache, tasks, images_u, model_config, progress) -> tuple[Unit, Unit]:
    """First suite: SimCLR image tower on the train images, class-prototype heads."""
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)

    def make_pretrained(out):
        pools = [_split(images_u[t], "train")[0] for t in tasks]
        state, stats = offline_train.pretrain(
            model_config, pools, cfg.pretrain, mean, std, progress=progress
        )
        write_model_config(out, model_config)
        save_state(
            out / "pretrained.safetensors",
            state,
            {
                "suite": "offline",
                "role": "pretrained",
                "model_config": model_config,
                "pretrain": _plain(cfg.pretrain),
                "tasks": tasks,
                "stats": stats,
            },
        )
        return stats

    material = _pretrained_material(cfg, model_config, tasks, images_u, CODE_VERSIONS["pretrained"])
    material["pretrain"] = {k: v for k, v in material["pretrain"].items() if k != "method"}
    pretrained_u = cache.unit("offline_pretrained", material, make_pretrained)
    classnames = {t: list(offline_data.SOURCES[t].classnames) for t in tasks}

    def make_heads(out):
        from ..suite import build_visual

        visual = build_visual(model_config)
        visual.load_state_dict(_load_safetensors(pretrained_u, "pretrained.safetensors"))
        heads = {}
        for t in tasks:
            x, y = _split(images_u[t], "train")
            feats = offline_train.encode(visual, x, mean, std)
            heads[t] = offline_train.class_prototypes(
                feats, torch.from_numpy(y), len(classnames[t])
            )
        save_state(
            out / "heads.safetensors",
            heads,
            {
                "suite": "offline",
                "role": "heads",
                "kind": "class prototypes of the pretrained encoder on the train split",
                "classnames": classnames,
            },
        )

    heads_u = cache.unit(
        "offline_heads",
        {
            "code": CODE_VERSIONS["heads"],
            "pretrained": pretrained_u.key,
            "images": {t: images_u[t].key for t in tasks},
            "classnames": classnames,
        },
        make_heads,
    )
    return pretrained_u, heads_u


def _mini_clip_units(
    cfg, cache: Cache, tasks, images_u, model_config, progress
) -> tuple[Unit, Unit]:
    """Default suite: mini-CLIP on weakly captioned pretraining images, text zero-shot heads."""
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    context = int(cfg.model.text.context_length)
    sources = {t: offline_data.SOURCES[t] for t in tasks}

    def make_pretrained(out):
        rng = np.random.default_rng(int(cfg.captions.seed))
        pools, tokens, kinds, examples = [], [], {}, {}
        for t in tasks:
            x, y = _split(images_u[t], offline_data.POOL)
            text, kind = offline_text.captions(
                y,
                sources[t].words,
                sources[t].domain,
                float(cfg.captions.name_prob),
                float(cfg.captions.wrong_prob),
                rng,
            )
            pools.append(x)
            tokens.append(offline_text.tokenize(text, context))
            kinds[t] = {
                "images": int(len(y)),
                "named": int((kind == 1).sum()),
                "wrong": int((kind == 2).sum()),
                "coarse": int((kind == 0).sum()),
            }
            examples[t] = text[:3]
        state, stats = offline_train.pretrain_clip(
            model_config, pools, tokens, cfg.pretrain, mean, std, progress=progress
        )
        stats = {**stats, "captions": kinds, "caption_examples": examples}
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        write_model_config(out, model_config)
        meta = {
            "suite": "offline",
            "model_config": model_config,
            "pretrain": _plain(cfg.pretrain),
            "tasks": tasks,
            "stats": stats,
        }
        save_state(out / "pretrained.safetensors", visual, {**meta, "role": "pretrained"})
        save_state(out / "clip.safetensors", state, {**meta, "role": "mini-CLIP, both towers"})
        return stats

    material = _pretrained_material(cfg, model_config, tasks, images_u, CODE_VERSIONS["clip"])
    material["captions"] = _plain(cfg.captions)
    material["vocabulary"] = list(offline_text.vocabulary())
    material["caption_templates"] = [offline_text.NAMED, offline_text.COARSE]
    material["text"] = [(t, sources[t].words, sources[t].domain) for t in tasks]
    pretrained_u = cache.unit("offline_pretrained", material, make_pretrained)
    prompts = {
        t: [offline_text.prompts(c, sources[t].domain) for c in sources[t].words] for t in tasks
    }

    def make_heads(out):
        from ..suite import build_clip

        model = build_clip(model_config)
        model.load_state_dict(_load_safetensors(pretrained_u, "clip.safetensors"))
        heads = offline_train.text_heads(model, prompts, context)
        save_state(
            out / "heads.safetensors",
            heads,
            {
                "suite": "offline",
                "role": "heads",
                "kind": "zero-shot text heads of the mini-CLIP (mean of normalised prompt embeddings)",
                "classnames": {t: list(sources[t].classnames) for t in tasks},
                "prompts": prompts,
            },
        )

    heads_u = cache.unit(
        "offline_heads",
        {"code": CODE_VERSIONS["text_heads"], "pretrained": pretrained_u.key, "prompts": prompts},
        make_heads,
    )
    return pretrained_u, heads_u


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's CPU threads set to ``n`` inside the block (None: left as they are). The thread
    count changes the summation order of every matmul, training amplifies those last bits, so
    the suite's weights (and every number computed from them) depend on it."""
    if n is None:
        yield
        return
    was = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(was)


def build(cfg: DictConfig, cache: Cache, progress: bool = True) -> Suite:
    """Build (or load from ``cache``) the offline suite described by ``cfg``; the training
    runs on ``suite.train_threads`` torch threads whatever the machine."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    validate(cfg)
    with _torch_threads(cfg.get("train_threads")):
        return _build(cfg, cache, progress)


def _build(cfg: DictConfig, cache: Cache, progress: bool) -> Suite:
    t0 = time.perf_counter()
    tasks = list(cfg.tasks)
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    logit_scale = float(cfg.logit_scale)
    model_config = {"clip_kwargs": offline_train.clip_kwargs(cfg.model)}

    # ---------------------------------------------------------------- data
    _prefetch_images(cfg, cache, tasks)
    images_u = {task: _images_unit(cfg, cache, task) for task in tasks}

    def split(task: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        return _split(images_u[task], name)

    classnames = {t: list(offline_data.SOURCES[t].classnames) for t in tasks}
    if cfg.pretrain.get("method", "simclr") == "clip":
        pretrained_u, heads_u = _mini_clip_units(
            cfg, cache, tasks, images_u, model_config, progress
        )
    else:
        pretrained_u, heads_u = _simclr_units(cfg, cache, tasks, images_u, model_config, progress)

    # ---------------------------------------------------------------- experts
    expert_u: dict[str, Unit] = {}
    for task in tasks:

        def make_expert(out, task=task):
            x, y = split(task, "train")
            state, stats = offline_train.finetune(
                model_config,
                _load_safetensors(pretrained_u, "pretrained.safetensors"),
                _load_safetensors(heads_u, "heads.safetensors")[task],
                x,
                y,
                cfg.finetune,
                logit_scale,
                mean,
                std,
                desc=task,
                progress=progress,
            )
            save_state(
                out / "expert.safetensors",
                state,
                {
                    "suite": "offline",
                    "role": "expert",
                    "task": task,
                    "model_config": model_config,
                    "finetune": _plain(cfg.finetune),
                    "logit_scale": logit_scale,
                    "stats": stats,
                },
            )
            return stats

        expert_u[task] = cache.unit(
            "offline_expert",
            {
                "code": CODE_VERSIONS["expert"],
                "task": task,
                "finetune": _plain(cfg.finetune),
                "logit_scale": logit_scale,
                "pretrained": pretrained_u.key,
                "heads": heads_u.key,
                "images": images_u[task].key,
            },
            make_expert,
        )

    units = {
        "pretrained": pretrained_u,
        "heads": heads_u,
        **{f"images/{t}": u for t, u in images_u.items()},
        **{f"expert/{t}": u for t, u in expert_u.items()},
    }
    manifests = {name: cache.manifest(u) for name, u in units.items()}
    info = {
        "sources": {t: offline_data.SOURCES[t].description for t in tasks},
        "split_sizes": {t: manifests[f"images/{t}"]["extra"]["sizes"] for t in tasks},
        "split": _plain(cfg.split),
        "unit_keys": {name: u.key for name, u in units.items()},
        "build_seconds": {name: round(m["seconds"], 2) for name, m in manifests.items()},
        "pretrain_stats": manifests["pretrained"]["extra"],
        "expert_stats": {t: manifests[f"expert/{t}"]["extra"] for t in tasks},
    }
    suite = Suite(
        name=str(cfg.name),
        tasks=tasks,
        classnames=classnames,
        model_config=model_config,
        mean=mean,
        std=std,
        logit_scale=logit_scale,
        pretrained_path=pretrained_u.file("pretrained.safetensors"),
        expert_paths={t: expert_u[t].file("expert.safetensors") for t in tasks},
        heads_path=heads_u.file("heads.safetensors"),
        data_dirs={t: {s: images_u[t].path / s for s in ("train", "val", "test")} for t in tasks},
        key=stable_hash({"suite": "offline", "units": {n: u.key for n, u in units.items()}}),
        info=info,
    )
    computed = [name for name, u in units.items() if u.computed]
    log.info(
        "offline suite %s ready in %.2f s (%s)",
        suite.key,
        time.perf_counter() - t0,
        f"built {', '.join(computed)}" if computed else "all cached",
    )
    return suite
