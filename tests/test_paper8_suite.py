"""The paper8 suite builder on tiny local stand-ins: a custom open_clip CLIP with a local
checkpoint, three tasks as save_to_disk datasets, and one expert in each format (transformers
folder, task-vectors whole-module pickle, safetensors state dict), all written here."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from pipeline import checkpoints as ckpt
from pipeline.cache import Cache
from pipeline.suite import preprocess_pil
from pipeline.suites import paper8

ROOT = Path(__file__).resolve().parent.parent
CLIP_KWARGS = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=8, mlp_ratio=2.0, patch_size=8),
    text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=4, layers=1),
    quick_gelu=True,
)
TASKS = ["MNIST", "EuroSAT", "SVHN"]
N_TRAIN, N_TEST, MAX = 30, 12, 20


def tiny_clip(seed: int) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def write_dataset(path: Path, seed: int) -> dict:
    """A DatasetDict with train/test of odd-sized RGB and greyscale PIL images, 10 classes."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    parts, raw = {}, {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        imgs = []
        for i in range(n):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            shape = (h, w, 3) if i % 3 else (h, w)
            imgs.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
        labels = rng.integers(0, 10, n)
        parts[split] = datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)
        raw[split] = (imgs, labels)
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return raw


def save_task_vectors_like(path: Path, clip) -> None:
    pkg, mod = types.ModuleType("src"), types.ModuleType("src.modeling")
    pkg.modeling = mod

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    mod.ImageEncoder = ImageEncoder
    sys.modules["src"], sys.modules["src.modeling"] = pkg, mod
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ImageEncoder(copy.deepcopy(clip)), path)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


def hf_expert(path: Path, seed: int):
    """A transformers CLIPVisionModel (no projection, like the FusionBench experts)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = CLIP_KWARGS["vision_cfg"]
    torch.manual_seed(seed)
    model = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_act="quick_gelu",
        )
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_clip(path: Path, seed: int):
    """A whole transformers CLIPModel (with projection, like openai/clip-vit-base-patch32),
    its vision tower shaped as ``hf_expert``'s."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=32),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8,
                               hidden_act="quick_gelu"),
            projection_dim=CLIP_KWARGS["embed_dim"],
        )
    ).eval()  # fmt: skip
    model.save_pretrained(path)
    return model


def make_cfg(root: Path, **over) -> dict:
    cfg = {
        "name": "paper8",
        "tasks": list(TASKS),
        "data_root": str(root / "data"),
        "hub_ids": {},
        "val_fraction": 0.1,
        "val_seed": 0,
        "max_per_split": MAX,
        "subset_seed": 0,
        "num_workers": 2,
        "device": "cpu",
        "text_batch_size": 7,
        "backbone": {
            "name": "tiny",
            "model_name": None,
            "clip_kwargs": CLIP_KWARGS,
            "pretrained": str(root / "pretrained.safetensors"),
            "experts": {
                "source": "hf",
                "pretrained": None,
                "hf": {
                    "template": str(root / "hf" / "{task}"),
                    "pretrained": None,
                    "revision": None,
                },
                "task_vectors": {"root": None},
                "state_dict": {"template": None},
                "overrides": {
                    "EuroSAT": {
                        "source": "task_vectors",
                        "location": str(root / "tv" / "EuroSAT" / "finetuned.pt"),
                    },
                    "SVHN": {
                        "source": "state_dict",
                        "location": str(root / "sd" / "SVHN.safetensors"),
                    },
                },
            },
        },
    }
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(over))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper8")
    clip = tiny_clip(0)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()},
        str(root / "pretrained.safetensors"),
    )
    raw = {t: write_dataset(root / "data" / t, seed) for seed, t in enumerate(TASKS)}
    experts = {
        "MNIST": hf_expert(root / "hf" / "MNIST", 1),
        "EuroSAT": tiny_clip(2),
        "SVHN": tiny_clip(3),
    }
    save_task_vectors_like(root / "tv" / "EuroSAT" / "finetuned.pt", experts["EuroSAT"])
    (root / "sd").mkdir()
    save_file(
        {k: v.contiguous() for k, v in experts["SVHN"].state_dict().items()},  # whole CLIP
        str(root / "sd" / "SVHN.safetensors"),
    )
    cfg = make_cfg(root)
    cache = Cache(root / "cache")
    suite = paper8.build(cfg, cache, progress=False)
    return types.SimpleNamespace(
        root=root, clip=clip, raw=raw, experts=experts, cfg=cfg, cache=cache, suite=suite
    )


# ---------------------------------------------------------------------- the built suite
def test_suite_fields(world):
    s, facts = world.suite, paper8.task_facts()
    assert s.tasks == TASKS
    assert s.classnames == {t: facts[t]["classnames"] for t in TASKS}
    assert s.model_config == {"clip_kwargs": CLIP_KWARGS}
    assert s.logit_scale == pytest.approx(float(world.clip.logit_scale.detach().exp()))
    assert s.mean == paper8.OPENAI_MEAN and s.std == paper8.OPENAI_STD
    visual = s.build_visual()
    visual.load_state_dict(s.pretrained_state())  # strict
    for k, v in world.clip.visual.state_dict().items():
        assert torch.equal(s.pretrained_state()[k], v), k


def test_images_are_the_preprocessed_rows_of_the_right_splits(world):
    s = world.suite
    expected = paper8.split_indices(N_TRAIN, N_TEST, 0.1, 0, MAX, 0)
    gen = torch.Generator().manual_seed(0)  # FusionBench's train_validation_split
    _, val_subset = torch.utils.data.random_split(range(N_TRAIN), [27, 3], generator=gen)
    assert sorted(val_subset.indices) == expected["val"][1].tolist()
    assert [len(expected[x][1]) for x in ("train", "val", "test")] == [MAX, 3, N_TEST]
    for task in TASKS:
        for split in ("train", "val", "test"):
            images, labels = s.split(task, split)
            src, rows = expected[split]
            assert np.array_equal(np.load(s.data_dirs[task][split] / "source_index.npy"), rows)
            imgs, labs = world.raw[task][src]
            assert images.shape == (len(rows), 3, 32, 32) and images.dtype == np.uint8
            assert np.array_equal(labels, labs[rows])
            want = np.stack([preprocess_pil(imgs[r], 32) for r in rows])
            assert np.array_equal(np.asarray(images), want), (task, split)
    assert not set(expected["train"][1]) & set(expected["val"][1])


def test_experts_of_every_format(world):
    s = world.suite
    x = s.preprocess(torch.from_numpy(np.array(s.split("MNIST", "test")[0])))
    visual = s.build_visual().eval()
    # transformers CLIPVisionModel: pooled output times the pretrained projection
    visual.load_state_dict(s.expert_state("MNIST"))
    with torch.no_grad():
        ref = world.experts["MNIST"](pixel_values=x).pooler_output @ world.clip.visual.proj
        assert torch.allclose(visual(x), ref, atol=1e-5)
    assert "pretrained" in s.info["experts"]["MNIST"]["projection"]
    for task in ("EuroSAT", "SVHN"):  # task-vectors pickle, safetensors whole-CLIP keys
        got, exp = s.expert_state(task), world.experts[task].visual.state_dict()
        assert set(got) == set(exp) and all(torch.equal(got[k], exp[k]) for k in exp), task
    assert s.info["experts"]["EuroSAT"]["kind"] == "task_vectors"


def test_heads_are_unit_rows_equal_to_a_direct_recomputation(world):
    heads, facts = world.suite.heads(), paper8.task_facts()
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    for task in TASKS:
        h = heads[task]
        assert h.shape == (10, 16)
        assert torch.allclose(h.norm(dim=1), torch.ones(10), atol=1e-6)
        rows = []
        with torch.no_grad():
            for name in facts[task]["classnames"]:  # one class at a time, row by row
                e = world.clip.encode_text(
                    tok([t.replace("{c}", name) for t in facts[task]["templates"]])
                )
                m = torch.stack([row / row.norm() for row in e]).mean(0)
                rows.append(m / m.norm())
        assert torch.allclose(h, torch.stack(rows), atol=1e-5), task


def test_rebuild_is_all_cache_hits_without_checking_sources(world, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("sources checked although everything is cached")

    monkeypatch.setattr(ckpt, "check_resources", boom)
    cache = Cache(world.root / "cache")
    again = paper8.build(world.cfg, cache, progress=False)
    assert again.key == world.suite.key
    assert cache.events and all(e[2] == "hit" for e in cache.events)


def test_activation_mismatch_with_a_transformers_expert_is_refused(world):
    kwargs = {**CLIP_KWARGS, "quick_gelu": False}
    cfg = make_cfg(world.root)
    cfg.backbone.clip_kwargs = kwargs
    with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
        paper8.build(cfg, Cache(world.root / "cache"), progress=False)


# ---------------------------------------------------------------------- sources and configs
@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Hub access off and empty hub / datasets caches (hermetic even where real ones exist)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")


@pytest.mark.reliability
def test_missing_sources_raise_one_error_before_any_work(world, tmp_path, empty_hf_cache):
    cfg = make_cfg(world.root, data_root=str(tmp_path / "nodata"))
    cfg.backbone.experts.hf.template = "tanganke/clip-vit-base-patch32_{suffix}"
    cache_root = tmp_path / "cache"
    with pytest.raises(ckpt.MissingResourceError) as err:
        paper8.build(cfg, Cache(cache_root), progress=False)
    msg = str(err.value)
    assert len(err.value.missing) == 4  # 3 datasets + the MNIST hub expert
    assert str(tmp_path / "nodata" / "SVHN") in msg and "save_to_disk" in msg
    assert "load_dataset('ufldl-stanford/svhn', 'cropped_digits')" in msg
    assert "hf download tanganke/clip-vit-base-patch32_mnist" in msg
    assert list(cache_root.glob("*/*/manifest.json")) == []


def test_real_backbones_resolve_to_quickgelu_and_name_the_hub(empty_hf_cache):
    suite_cfg = OmegaConf.load(ROOT / "configs" / "suite" / "paper8.yaml")
    hf_names = {
        "SUN397": "sun397",
        "Cars": "stanford-cars",
        "RESISC45": "resisc45",
        "EuroSAT": "eurosat",
        "SVHN": "svhn",
        "GTSRB": "gtsrb",
        "MNIST": "mnist",
        "DTD": "dtd",
    }
    assert list(suite_cfg.tasks) == list(hf_names)
    for file, name, arch in (
        ("vit_b32", "ViT-B-32", "clip-vit-base-patch32"),
        ("vit_b16", "ViT-B-16", "clip-vit-base-patch16"),
        ("vit_l14", "ViT-L-14", "clip-vit-large-patch14"),
    ):
        bcfg = OmegaConf.load(ROOT / "configs" / "backbone" / f"{file}.yaml")
        paper8.validate(suite_cfg, bcfg)
        b = paper8.resolve_backbone(bcfg)
        assert b.model_config == {"model_name": f"{name}-quickgelu"} and b.quick_gelu
        assert open_clip.get_model_config(b.model_config["model_name"])["quick_gelu"] is True
        assert b.image_size == 224
        cfg = paper8._as_config(suite_cfg, bcfg)
        pre, refs = paper8.checkpoint_refs(cfg)
        # the pretrained tower: by default the hub weights the experts were fine-tuned from
        assert (pre.kind, pre.location) == ("hf", f"openai/{arch}")
        assert {t: r.location for t, r in refs.items()} == {
            t: f"tanganke/{arch}_{s}" for t, s in hf_names.items()
        }
        with pytest.raises(ckpt.MissingResourceError) as err:
            paper8.check_sources(cfg)
        assert (
            len(err.value.missing) == 18
        )  # open_clip weights + hub tower + 8 datasets + 8 experts
        assert f"open_clip.create_model('{name}-quickgelu', pretrained='openai')" in str(err.value)
        assert f"hf download openai/{arch}" in str(err.value)
        cfg.backbone.experts.pretrained = "open_clip"  # the other choice
        assert paper8.checkpoint_refs(cfg)[0] is None
    # the task-vectors release layout
    cfg = paper8._as_config(
        suite_cfg,
        OmegaConf.merge(
            OmegaConf.load(ROOT / "configs" / "backbone" / "vit_b32.yaml"),
            {"experts": {"source": "task_vectors", "task_vectors": {"root": "/ckpt/ViT-B-32"}}},
        ),
    )
    pre, refs = paper8.checkpoint_refs(cfg)
    assert pre.location == "/ckpt/ViT-B-32/zeroshot.pt" and pre.kind == "task_vectors"
    assert refs["Cars"].location == "/ckpt/ViT-B-32/Cars/finetuned.pt"


def test_suite_build_clip_reproduces_quickgelu_for_openai_weights():
    from pipeline.suite import build_clip

    model = build_clip(
        paper8.resolve_backbone({"model_name": "ViT-B-32", "pretrained": "openai"}).model_config
    )
    assert isinstance(
        model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU
    )


def test_hydra_composes_suite_paper8_with_each_backbone():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        for b in ("vit_b32", "vit_b16", "vit_l14"):
            cfg = compose("config", overrides=["suite=paper8", f"backbone={b}"])
            paper8.validate(cfg.suite, cfg.backbone)
            assert cfg.suite.name == "paper8" and cfg.backbone.name == b


def test_suite_paper8_on_the_default_backbone_says_which_backbone_to_add(tmp_path):
    """`react-merging suite=paper8` (backbone=offline, the default) names the fix."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["suite=paper8"])
    with pytest.raises(ValueError, match=r"needs a CLIP backbone.*add backbone=vit_b32"):
        paper8.validate(cfg.suite, cfg.backbone)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": ["MNIST", "Imagenet"]}, "unknown tasks"),
        ({"max_per_split": 0}, "max_per_split"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"backbone": {"model_name": "ViT-B-32"}}, "exactly one of model_name"),
        ({"backbone": {"experts": {"source": "zip"}}}, "experts.source"),
        ({"backbone": {"experts": {"source": "task_vectors"}}}, "task_vectors.root"),
        ({"backbone": {"experts": {"overrides": {"MNIST": {"source": "hf"}}}}}, "overrides.MNIST"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        paper8.validate(make_cfg(tmp_path, **change))


def test_split_indices_subsets_are_seeded_subsets_of_the_full_splits():
    full = paper8.split_indices(1000, 300, 0.1, 0)
    small = paper8.split_indices(1000, 300, 0.1, 0, max_per_split=50, subset_seed=1)
    assert [len(full[s][1]) for s in ("train", "val", "test")] == [900, 100, 300]
    for s in ("train", "val", "test"):
        assert len(small[s][1]) == 50 and set(small[s][1]) <= set(full[s][1])
        assert np.array_equal(small[s][1], paper8.split_indices(1000, 300, 0.1, 0, 50, 1)[s][1])
    assert not np.array_equal(
        small["test"][1], paper8.split_indices(1000, 300, 0.1, 0, 50, 2)["test"][1]
    )
    assert sorted(np.concatenate([full["train"][1], full["val"][1]])) == list(range(1000))


def test_parallel_decoding_equals_inline_decoding(world, tmp_path):
    import datasets

    ds = datasets.load_from_disk(str(world.root / "data" / "MNIST"))["train"]
    rows = np.array([0, 3, 4, 7, 8, 11, 12, 20, 29])
    paper8.write_images(ds, "image", rows, 32, tmp_path / "par.npy", num_workers=2, chunk=2)
    paper8.write_images(ds, "image", rows, 32, tmp_path / "seq.npy", num_workers=1, chunk=4)
    par, seq = np.load(tmp_path / "par.npy"), np.load(tmp_path / "seq.npy")
    want = np.stack([preprocess_pil(world.raw["MNIST"]["train"][0][r], 32) for r in rows])
    assert np.array_equal(par, want) and np.array_equal(seq, want)


def test_task_vectors_source_takes_the_pretrained_tower_from_zeroshot_pt(world):
    zeroshot = tiny_clip(5)  # a different tower from the open_clip backbone weights
    save_task_vectors_like(world.root / "tv" / "zeroshot.pt", zeroshot)
    cfg = make_cfg(world.root)
    cfg.backbone.experts.source = "task_vectors"
    cfg.backbone.experts.task_vectors.root = str(world.root / "tv")
    cfg.backbone.experts.overrides.MNIST = {
        "source": "hf",
        "location": str(world.root / "hf" / "MNIST"),
    }
    cache = Cache(world.root / "cache")
    s = paper8.build(cfg, cache, progress=False)
    exp = zeroshot.visual.state_dict()
    assert all(torch.equal(s.pretrained_state()[k], v) for k, v in exp.items())
    assert torch.equal(
        s.expert_state("MNIST")["proj"], zeroshot.visual.proj
    )  # completes the HF expert
    assert s.info["pretrained"]["location"].endswith("zeroshot.pt")
    computed = {stage for stage, _, what in cache.events if what == "computed"}
    assert computed == {"paper8_pretrained", "paper8_expert"}  # images, backbone, heads reused


def test_hf_source_takes_the_pretrained_tower_from_the_experts_hub_family(world):
    """experts.source=hf, experts.pretrained=null: theta_0 is experts.hf.pretrained (a whole
    transformers CLIP, mapped to open_clip keys), which also completes the experts' missing
    projection; experts.pretrained=open_clip gives the open_clip weights instead."""
    hub = hf_clip(world.root / "hf_pretrained", seed=7)
    cfg = make_cfg(world.root)
    cfg.backbone.experts.hf.pretrained = str(world.root / "hf_pretrained")
    s = paper8.build(cfg, Cache(world.root / "cache"), progress=False)
    x = s.preprocess(torch.from_numpy(np.array(s.split("MNIST", "test")[0])))
    visual = s.build_visual().eval()
    visual.load_state_dict(s.pretrained_state())
    with torch.no_grad():
        assert torch.allclose(
            visual(x),
            hub.visual_projection(hub.vision_model(pixel_values=x).pooler_output),
            atol=1e-5,
        )
        proj = hub.visual_projection.weight.t()
        assert torch.equal(s.pretrained_state()["proj"], proj)
        assert torch.equal(s.expert_state("MNIST")["proj"], proj)  # completes the HF expert
        visual.load_state_dict(s.expert_state("MNIST"))
        ref = world.experts["MNIST"](pixel_values=x).pooler_output @ proj
        assert torch.allclose(visual(x), ref, atol=1e-5)
    assert s.info["pretrained_tower"].startswith(str(world.root / "hf_pretrained"))
    assert "transformers CLIP checkpoint" in s.info["pretrained_tower"]
    cfg.backbone.experts.pretrained = "open_clip"
    other = paper8.build(cfg, Cache(world.root / "cache"), progress=False)
    assert all(
        torch.equal(other.pretrained_state()[k], v)
        for k, v in world.clip.visual.state_dict().items()
    )
    assert other.info["pretrained_tower"].startswith("open_clip")


@pytest.mark.slow
def test_make_table1_paper8_vit_b32_on_local_stand_ins(world, tmp_path):
    """`make table1 SUITE=paper8 BACKBONE=vit_b32` (the Makefile's own command line) on tiny
    stand-ins of the real sources: FusionBench-like CLIPVisionModel experts (no projection)
    and a whole transformers CLIP as the hub pretrained tower, with the config's defaults
    (pretrained tower from the experts' hub family, the original TIES conventions)."""
    import json
    import os
    import subprocess

    from safetensors import safe_open
    from test_make_targets import make_command

    import merging

    for seed, task in enumerate(TASKS):
        hf_expert(tmp_path / "hf" / task, 20 + seed)
    hub = hf_clip(tmp_path / "hub_pretrained", seed=21)
    v, t = CLIP_KWARGS["vision_cfg"], CLIP_KWARGS["text_cfg"]
    kwargs = (
        f"{{embed_dim:{CLIP_KWARGS['embed_dim']},quick_gelu:true,"
        f"vision_cfg:{{{','.join(f'{k}:{x}' for k, x in v.items())}}},"
        f"text_cfg:{{{','.join(f'{k}:{x}' for k, x in t.items())}}}}}"
    )
    args = [
        "logger=disabled", "progress=false", "num_threads=1", "device=cpu", "++merge.steps=2",
        f"suite.tasks=[{','.join(TASKS)}]", f"suite.data_root={world.root / 'data'}",
        f"suite.max_per_split={MAX}", "suite.num_workers=0", "suite.device=cpu",
        "suite.text_batch_size=7", "backbone.model_name=null", f"backbone.clip_kwargs={kwargs}",
        f"backbone.pretrained={world.root / 'pretrained.safetensors'}",
        f"backbone.experts.hf.template='{tmp_path / 'hf' / '{task}'}'",
        f"backbone.experts.hf.pretrained={tmp_path / 'hub_pretrained'}",
        f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cmd = make_command("table1", args, ("SUITE=paper8", "BACKBONE=vit_b32"))
    assert "suite=paper8" in cmd and "backbone=vit_b32" in cmd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    (sweep,) = (tmp_path / "out" / "multirun" / "table1").iterdir()
    summaries = {}
    for job in sorted(sweep.glob("[0-9]*/summary.json")):
        summary = json.loads(job.read_text())
        summaries[summary["merge"]["name"]] = (summary, (job.parent / "report.md").read_text())
    table1 = OmegaConf.load(ROOT / "configs" / "experiment" / "table1.yaml")
    assert set(summaries) == set(table1.hydra.sweeper.params.merge.split(","))
    assert {"ties", "adamerging_pp"} <= set(summaries)
    assert (sweep / "collected.md").is_file()
    for name, (summary, report) in summaries.items():
        assert summary["backbone"] == "vit_b32" and summary["tasks"] == TASKS
        assert summary["pretrained_tower"].startswith(str(tmp_path / "hub_pretrained"))
        assert f"Pretrained tower: {summary['pretrained_tower']}" in report
        if name in ("ties", "adamerging_pp"):
            assert (summary["merge"]["keep_rule"], summary["merge"]["zero_sign"]) == (
                "floor_plus_one",
                "majority",
            )
            assert "int(0.2 N) + 1" in summary["merge_conventions"]
            assert "majority sign" in summary["merge_conventions"]
            assert f"Merge: {summary['merge_conventions']}" in report
        else:
            assert summary["merge_conventions"] is None and "Merge:" not in report

    # the cached tower and experts: theta_0 is the hub CLIP's tower, whose projection also
    # completes the experts; the TIES job merged exactly merging.ties with the defaults
    def only(stage: str, file: str) -> list[Path]:
        return sorted((tmp_path / "cache" / stage).glob(f"*/{file}"))

    (pre_file,) = only("paper8_pretrained", "pretrained.safetensors")
    pre = load_file(str(pre_file))
    proj = hub.visual_projection.weight.detach().t()
    assert torch.equal(pre["proj"], proj)
    experts = {}
    for f in only("paper8_expert", "expert.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            experts[json.loads(h.metadata()["task"])] = load_file(str(f))
    assert sorted(experts) == sorted(TASKS)
    assert all(torch.equal(e["proj"], proj) for e in experts.values())
    merged = {}
    for f in only("merge", "merged.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            merged[json.loads(h.metadata()["merge"])["name"]] = load_file(str(f))
    want = merging.ties(pre, [experts[t] for t in TASKS], scale=0.3, density=0.2)
    assert all(torch.equal(merged["ties"][k], want[k]) for k in want)
    assert torch.equal(merged["ties"]["proj"], proj)  # no task vector: not merged, not counted
