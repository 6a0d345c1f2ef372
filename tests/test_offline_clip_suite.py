"""The default embedded suite (mini-CLIP, eight tasks), built in its tiny setting.

Checks against second computations written here: the generated tasks are deterministic,
balanced and need no network; pretraining crops come only from the left columns of each
source image and never overlap an evaluated crop; the pretraining pool is disjoint from every
split; captions follow their probabilities and never name the true class when they are
marked wrong; the tokenizer puts the end token at the largest id (open_clip's argmax pooling);
the zero-shot heads equal CLIP's recipe recomputed prompt by prompt from the saved towers.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from pipeline.cache import Cache
from pipeline.suite import build_clip
from pipeline.suites import build_suite, offline_data, offline_sources, offline_text

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["photos", "textures", "svhn", "signs"]


def suite_cfg(name: str = "offline_tiny", overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=[f"suite={name}", *overrides]).suite


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("clip_cache"))
    cfg = suite_cfg(overrides=["suite.tasks=[mnist,faces,photos,textures,svhn,signs]"])
    return cfg, cache, build_suite(cfg, cache, progress=False)


# ------------------------------------------------------------------ generated tasks
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a data loader tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("task", GENERATED)
def test_generated_tasks_are_deterministic_balanced_and_offline(task, no_network):
    src = offline_data.SOURCES[task]
    x, y, pool = src.load(0, 3)
    x2, y2, pool2 = src.load(0, 3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(pool, pool2)
    assert not np.array_equal(src.load(1, 3)[0], x)
    k = len(src.classnames)
    assert x.dtype == np.uint8 and x.shape[1:3] == (32, 32) and len(x) == len(y) == len(pool)
    assert x.ndim == (3 if task == "textures" else 4)
    # 3 task images per class, pretraining images in the default proportion (150 per 300/400)
    assert np.array_equal(np.bincount(y[~pool], minlength=k), np.full(k, 3))
    assert np.array_equal(np.bincount(y[pool], minlength=k), np.full(k, np.bincount(y[pool])[0]))
    assert x.std() > 10  # real content, not a constant image


def test_pretraining_crops_come_from_the_left_columns_only():
    w = 200
    img = np.zeros((100, w, 3), dtype=np.uint8)
    img[:, int(offline_sources.PRETRAIN_COLUMNS * w) :] = 255  # right part white
    rng = np.random.default_rng(0)
    pre = [offline_sources.random_crop(img, rng, True) for _ in range(50)]
    ev = [offline_sources.random_crop(img, rng, False) for _ in range(50)]
    assert max(int(c.max()) for c in pre) == 0 and min(int(c.min()) for c in ev) == 255


def test_signs_and_digits_differ_by_class():
    rng = np.random.default_rng(0)
    # mean colour of a stop sign is red-dominant, of a parking sign blue-dominant
    stop = np.mean([offline_sources.render_sign(0, rng) for _ in range(20)], axis=0)
    park = np.mean([offline_sources.render_sign(7, rng) for _ in range(20)], axis=0)
    assert stop[..., 0].mean() > stop[..., 2].mean() and park[..., 2].mean() > park[..., 0].mean()


# ------------------------------------------------------------------ text
def test_tokenizer_puts_the_end_token_at_the_largest_id():
    tok = offline_text.tokenize(["a photo of a seven", "zebra"], 12)
    vocab = offline_text.vocabulary()
    end = offline_text.vocab_size() - 1
    assert tok.shape == (2, 12) and tok[0, 0] == offline_text.START
    words = [vocab[i - 2] for i in tok[0, 1:6].tolist()]
    assert words == ["a", "photo", "of", "a", "seven"]
    assert tok.argmax(-1).tolist() == [6, 2] and (tok.max(-1).values == end).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        offline_text.tokenize(["a photo of a unicorn"], 12)
    with pytest.raises(ValueError, match="context_length"):
        offline_text.tokenize(["a photo of a " + "seven " * 12], 12)


def test_captions_follow_their_probabilities():
    rng = np.random.default_rng(0)
    names = offline_data.SOURCES["animals"].words
    labels = rng.integers(0, 10, 20000)
    text, kind = offline_text.captions(labels, names, "animal silhouette", 0.3, 0.1, rng)
    share = np.bincount(kind, minlength=3) / len(kind)
    assert abs(share[1] - 0.3) < 0.015 and abs(share[2] - 0.1) < 0.01
    for t, k, y in zip(text[:3000], kind[:3000], labels[:3000], strict=True):
        named = [n for n in names if n in t.split()]
        if k == 0:
            assert named == []
        elif k == 1:
            assert named == [names[y]]
        else:
            assert len(named) == 1 and named[0] != names[y]


# ------------------------------------------------------------------ built tiny suite
def test_pretraining_pool_is_disjoint_from_every_split(built):
    cfg, cache, suite = built
    for task in suite.tasks:
        folder = suite.data_dirs[task]["test"].parent
        idx = {
            s: set(np.load(folder / s / "source_index.npy").tolist())
            for s in ("train", "val", "test", offline_data.POOL)
        }
        assert idx[offline_data.POOL], task
        for a in idx:
            for b in idx:
                if a < b:
                    assert not idx[a] & idx[b], (task, a, b)


def test_heads_are_clip_zero_shot_heads_recomputed_prompt_by_prompt(built):
    cfg, cache, suite = built
    folder = suite.pretrained_path.parent
    model = build_clip(suite.model_config).eval()
    model.load_state_dict(load_file(str(folder / "clip.safetensors")))
    heads = suite.heads()
    ctx = int(cfg.model.text.context_length)
    for task in suite.tasks:
        src = offline_data.SOURCES[task]
        rows = []
        for name in src.words:
            embs = []
            for prompt in offline_text.prompts(name, src.domain):
                with torch.no_grad():
                    e = model.encode_text(offline_text.tokenize([prompt], ctx))[0]
                embs.append(e / e.norm())
            m = torch.stack(embs).mean(0)
            rows.append(m / m.norm())
        torch.testing.assert_close(heads[task], torch.stack(rows), rtol=1e-5, atol=1e-5)
    # the pretrained image tower is the mini-CLIP's visual tower
    visual = load_file(str(suite.pretrained_path))
    for k, v in visual.items():
        assert torch.equal(v, model.state_dict()["visual." + k])


def test_zero_shot_logits_use_the_text_heads(built):
    cfg, cache, suite = built
    visual = suite.build_visual().eval()
    visual.load_state_dict(suite.pretrained_state())
    x, y = suite.split(suite.tasks[0], "test")
    with torch.no_grad():
        z = F.normalize(visual(suite.preprocess(torch.from_numpy(np.array(x[:8])))), dim=-1)
    logits = suite.logit_scale * z @ suite.heads()[suite.tasks[0]].T
    assert logits.shape == (8, len(suite.classnames[suite.tasks[0]]))
    assert logits.abs().max() <= suite.logit_scale + 1e-4


def test_caption_statistics_are_recorded(built):
    cfg, cache, suite = built
    meta = suite.info["pretrain_stats"]["captions"]
    assert set(meta) == set(suite.tasks)
    for task in suite.tasks:
        m = meta[task]
        assert m["named"] + m["wrong"] + m["coarse"] == m["images"] > 0


def test_second_build_is_a_cache_hit_with_identical_heads(built):
    cfg, cache, suite = built
    again = build_suite(cfg, cache, progress=False)
    assert again.key == suite.key
    for t in suite.tasks:
        assert torch.equal(again.heads()[t], suite.heads()[t])


@pytest.mark.parametrize(
    "override, match",
    [
        ("suite.captions.name_prob=0.95", "sum <= 1"),
        ("suite.split.pretrain_fraction=0", "pretrain_fraction > 0"),
        ("suite.pretrain.method=byol", "clip or simclr"),
        ("suite.tasks=[mnist,unicorns]", "unknown offline tasks"),
        ("suite.train_threads=0", "train_threads must be null or an integer >= 1"),
        ("suite.data_workers=two", "data_workers must be null or an integer >= 1"),
        ("suite.finetune.trainable=mlp", "trainable must be one of"),
        ("suite.pretrain.ssl.weight=-1", "weight >= 0"),
        ("suite.pretrain.ssl.temperature=0", "temperature > 0"),
    ],
)
def test_bad_config_is_rejected_before_work(tmp_path, override, match):
    extra = ["suite.pretrain.ssl.weight=1"] if "ssl.temperature" in override else []
    cfg = suite_cfg(overrides=[override, *extra])
    with pytest.raises(ValueError, match=match):
        build_suite(cfg, Cache(tmp_path), progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("trainable", ["all", "attention"])
def test_finetune_updates_exactly_the_trainable_weights(built, trainable):
    """``suite.finetune.trainable=attention`` moves every attention weight and nothing else;
    ``all`` moves every weight of the tower."""
    from omegaconf import OmegaConf

    from pipeline.suites import offline_train

    cfg, _, suite = built
    ft = OmegaConf.merge(cfg.finetune, {"steps": 3, "trainable": trainable, "warmup_steps": 1})
    x, y = suite.split("mnist", "train")
    pre = suite.pretrained_state()
    state, _ = offline_train.finetune(
        suite.model_config,
        pre,
        suite.heads()["mnist"],
        x,
        y,
        ft,
        suite.logit_scale,
        suite.mean,
        suite.std,
        progress=False,
    )
    assert state.keys() == pre.keys()
    for key in pre:
        moved = not torch.equal(state[key], pre[key])
        assert moved == (trainable == "all" or ".attn." in key), key


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_pretraining_loss_is_clip_plus_weighted_simclr(built, monkeypatch, weight):
    """The pretraining loss of one batch, recomputed here from the same initial towers and
    projection head: CLIP's symmetric cross-entropy of the first view plus ``weight`` times
    NT-Xent of the two views (written out with log-softmax); weight 0 is CLIP alone and
    the returned state holds the two towers only (the projection head is discarded)."""
    from omegaconf import OmegaConf

    from pipeline.suites import offline_train

    cfg, _, suite = built
    pre = OmegaConf.merge(cfg.pretrain, {"steps": 1, "augment": None, "ssl": {"weight": weight}})
    x = torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8).numpy()
    tokens = offline_text.tokenize(["a photo of a seven"] * 4 + ["a handwritten digit"] * 4, 12)
    seen = {}
    real = offline_train._balanced_training

    def capture(params, pools, c, gen, desc, progress, loss_of, after_step=None):
        batch = torch.from_numpy(pools[0]).float().div(255.0)
        seen["loss"] = loss_of(batch, torch.arange(8)).item()
        return real(params, pools, c, gen, desc, progress, loss_of, after_step)

    monkeypatch.setattr(offline_train, "_balanced_training", capture)
    pre.batch_size = 8
    state, _ = offline_train.pretrain_clip(
        suite.model_config, [x], [tokens], pre, suite.mean, suite.std, progress=False
    )
    assert state.keys() == build_clip(suite.model_config).state_dict().keys()

    torch.manual_seed(int(pre.seed))
    model = build_clip(suite.model_config)
    head = offline_train.ssl_projection(model.visual.output_dim, int(pre.ssl.hidden))
    with torch.no_grad():
        m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (suite.mean, suite.std))
        inp = (torch.from_numpy(x).float() / 255.0 - m) / s
        e = model.visual(inp)
        img, txt = F.normalize(e, dim=-1), F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        diag = torch.arange(8)
        clip = (
            -(logits.log_softmax(1)[diag, diag].mean() + logits.log_softmax(0)[diag, diag].mean())
            / 2
        )
        z = F.normalize(head(e), dim=-1).repeat(2, 1)  # the two views are equal (no augmentation)
        sim = z @ z.T / float(pre.ssl.temperature)
        sim.fill_diagonal_(float("-inf"))
        partner = torch.cat([diag + 8, diag])
        simclr = -sim.log_softmax(1)[torch.arange(16), partner].mean()
    expected = clip + weight * simclr
    assert seen["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_merge_pretrained_is_theta_0(built, tmp_path):
    from omegaconf import OmegaConf

    from pipeline.merge import load_merged, run_merge

    cfg, cache, suite = built
    unit = run_merge(
        OmegaConf.create({"name": "pretrained"}), suite, cache, torch.device("cpu"), progress=False
    )
    merged, pre = load_merged(unit), suite.pretrained_state()
    assert merged.keys() == pre.keys() and all(torch.equal(merged[k], pre[k]) for k in pre)


def test_data_workers_write_the_same_units_as_one_process(built, tmp_path, caplog):
    """A cold build's data in two worker processes = the one-process build's units, file for
    file (the fixture built them in this process: the tiny suite sets data_workers=1)."""
    import logging

    from pipeline.suites import offline

    cfg, cache, _ = built
    two = suite_cfg(overrides=["suite.tasks=[faces,svhn,signs]", "suite.data_workers=2"])
    other = Cache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="pipeline.suites.offline"):
        offline._prefetch_images(two, other, list(two.tasks))
    assert "building the data of 3 tasks in 2 processes" in caplog.text
    for t in two.tasks:
        key = Cache.key("offline_images", offline._images_material(two, t))
        mine, theirs = other.lookup("offline_images", key), cache.lookup("offline_images", key)
        assert mine is not None and theirs is not None, t
        assert other.manifest(mine)["files"] == cache.manifest(theirs)["files"], t
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.suites.offline"):
        offline._prefetch_images(two, other, list(two.tasks))  # nothing missing: no workers
    assert "processes" not in caplog.text


def test_training_runs_on_train_threads_and_restores_them(tmp_path, monkeypatch):
    from pipeline.suites import offline_train

    seen = []
    real = offline_train.finetune

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(offline_train, "finetune", spy)
    before = torch.get_num_threads()
    cfg = suite_cfg(overrides=["suite.tasks=[digits,faces]", "suite.train_threads=1"])
    build_suite(cfg, Cache(tmp_path), progress=False)
    assert seen == [1, 1] and torch.get_num_threads() == before
    # the thread count is part of the recipe: another count is another suite
    three = suite_cfg(overrides=["suite.tasks=[digits,faces]", "suite.train_threads=3"])
    monkeypatch.setattr(offline_train, "pretrain_clip", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a cache miss: it starts training again
        build_suite(three, Cache(tmp_path), progress=False)
    assert torch.get_num_threads() == before  # restored after a failure too
