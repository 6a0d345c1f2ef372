"""Checkpoint readers: the safe task-vectors unpickler, the transformers -> open_clip mapping,
local state dicts, and the missing-resource error. Tiny models written by the tests."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipeline import checkpoints as ckpt

ROOT = Path(__file__).resolve().parent.parent

CLIP_KWARGS = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=8, mlp_ratio=2.0, patch_size=8),
    text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=4, layers=1),
    quick_gelu=True,
)


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_KWARGS)
    with torch.no_grad():  # open_clip zero-inits some tensors; make every entry distinctive
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------- task-vectors pickles
def save_task_vectors_like(path: Path, clip: open_clip.CLIP, monkeypatch) -> None:
    """torch.save a whole `src.modeling.ImageEncoder` wrapping `clip`, as the release does."""
    pkg, mod = types.ModuleType("src"), types.ModuleType("src.modeling")
    pkg.modeling = mod

    class ImageEncoder(torch.nn.Module):  # the shape of task_vectors' src/modeling.py class
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = open_clip.image_transform(32, is_train=True)
            self.val_preprocess = open_clip.image_transform(32, is_train=False)
            self.cache_dir = None
            delattr(self.model, "transformer")  # keep_lang=False, as in task_vectors

        def forward(self, images):
            return self.model.encode_image(images)

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    mod.ImageEncoder = ImageEncoder
    with monkeypatch.context() as m:  # importable only while saving
        m.setitem(sys.modules, "src", pkg)
        m.setitem(sys.modules, "src.modeling", mod)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ImageEncoder(copy.deepcopy(clip)), path)


def test_task_vectors_pickle_gives_the_visual_state_without_importing_its_classes(
    tmp_path, monkeypatch
):
    clip = tiny_clip(1)
    path = tmp_path / "Cars" / "finetuned.pt"
    save_task_vectors_like(path, clip, monkeypatch)
    assert "src.modeling" not in sys.modules
    state = ckpt.load_task_vectors_visual(path)
    expected = clip.visual.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert "src.modeling" not in sys.modules  # the file's class was never imported
    obj = ckpt.safe_torch_load(path)
    assert (
        isinstance(obj, ckpt.PickledObject) and obj._pickled_global == "src.modeling.ImageEncoder"
    )
    # and the tower it describes computes what the original computes
    visual = open_clip.CLIP(**CLIP_KWARGS).visual.eval()
    visual.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(visual(x), clip.visual(x), atol=1e-6)


def test_plain_pickled_state_dict_loads_too(tmp_path):
    clip = tiny_clip(2)
    path = tmp_path / "sd.pt"
    torch.save(clip.state_dict(), path)
    state = ckpt.load_task_vectors_visual(path)
    assert set(state) == set(clip.visual.state_dict())
    assert torch.equal(state["proj"], clip.visual.proj)


class _Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, kind):
    target = tmp_path / "pwned"
    cmd = f"echo pwned > {target}"
    fn, args, name = {
        "os.system": (os.system, (cmd,), "system"),
        "builtins.eval": (eval, (f"__import__('os').system({cmd!r})",), "eval"),
        "subprocess.call": (subprocess.call, (cmd,), "call"),
    }[kind]
    path = tmp_path / "finetuned.pt"
    torch.save({"weights": torch.ones(2), "payload": _Evil(fn, args)}, path)
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load the global \S*{name}"):
        ckpt.load_task_vectors_visual(path)
    with pytest.raises(pickle.UnpicklingError):  # the weights_only reader refuses it too
        ckpt.load_state_file(path)
    assert not target.exists()


@pytest.mark.reliability
def test_non_zip_and_truncated_files_get_clear_errors(tmp_path):
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(pickle.UnpicklingError, match="not a torch zip checkpoint"):
        ckpt.safe_torch_load(raw)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good)
    import zipfile

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            zout.writestr(item, data[:100] if "/data/" in item else data)
    with pytest.raises(pickle.UnpicklingError, match="truncated or corrupted"):
        ckpt.safe_torch_load(bad)


def test_converter_script_writes_the_visual_state_dicts(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import convert_task_vectors
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    zs, cars = tiny_clip(3), tiny_clip(4)
    src = tmp_path / "src"
    save_task_vectors_like(src / "zeroshot.pt", zs, monkeypatch)
    save_task_vectors_like(src / "Cars" / "finetuned.pt", cars, monkeypatch)
    assert convert_task_vectors.main([str(src), str(tmp_path / "dst")]) == 0
    from safetensors.torch import load_file

    for name, clip in (("zeroshot", zs), ("Cars", cars)):
        got = load_file(str(tmp_path / "dst" / f"{name}.safetensors"))
        exp = clip.visual.state_dict()
        assert set(got) == set(exp) and all(torch.equal(got[k], exp[k]) for k in exp)
    with pytest.raises(FileNotFoundError, match="DTD"):
        convert_task_vectors.convert(src, tmp_path / "dst2", ["DTD"])


# ---------------------------------------------------------------------- transformers CLIP
def hf_config(act: str = "quick_gelu"):
    from transformers import CLIPVisionConfig

    v = CLIP_KWARGS["vision_cfg"]
    return CLIPVisionConfig(
        hidden_size=v["width"],
        intermediate_size=int(v["width"] * v["mlp_ratio"]),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v["head_width"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        projection_dim=CLIP_KWARGS["embed_dim"],
        hidden_act=act,
        layer_norm_eps=1e-5,
    )


def random_hf(seed: int = 0, projection: bool = True, act: str = "quick_gelu"):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    model = cls(hf_config(act)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_hf_mapping_gives_the_same_image_embeddings():
    hf = random_hf(5)
    state = ckpt.hf_vision_to_open_clip(hf.state_dict())
    visual = open_clip.CLIP(**CLIP_KWARGS).visual.eval()
    visual.load_state_dict(state)  # strict: every key mapped, none left over
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).image_embeds
        got = visual(x)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # q, k, v rows are stacked in that order
    w = hf.state_dict()
    assert torch.equal(
        state["transformer.resblocks.1.attn.in_proj_weight"][32:64],
        w["vision_model.encoder.layers.1.self_attn.k_proj.weight"],
    )
    # the mapping is not vacuous: a GELU tower gives different embeddings
    gelu = open_clip.CLIP(**{**CLIP_KWARGS, "quick_gelu": False}).visual.eval()
    gelu.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(gelu(x), ref, atol=1e-3)


def test_hf_mapping_rejects_leftover_and_missing_keys():
    state = dict(random_hf(6).state_dict())
    with pytest.raises(ValueError, match="unmapped"):
        ckpt.hf_vision_to_open_clip({**state, "vision_model.extra.weight": torch.ones(1)})
    state.pop("vision_model.encoder.layers.0.self_attn.v_proj.bias")
    with pytest.raises(ValueError, match="v_proj.bias"):
        ckpt.hf_vision_to_open_clip(state)


def test_load_hf_folder_with_and_without_projection(tmp_path):
    with_proj = random_hf(7)
    with_proj.save_pretrained(tmp_path / "wp")
    state, info = ckpt.load_hf_visual(str(tmp_path / "wp"), quick_gelu=True)
    assert torch.equal(state["proj"], with_proj.visual_projection.weight.t())
    assert "from the checkpoint" in info["projection"]

    bare = random_hf(8, projection=False)  # a CLIPVisionModel, like the FusionBench experts
    bare.save_pretrained(tmp_path / "bare")
    pretrained_proj = torch.randn(32, 16)
    state, info = ckpt.load_hf_visual(
        str(tmp_path / "bare"), fallback_proj=pretrained_proj, quick_gelu=True
    )
    assert torch.equal(state["proj"], pretrained_proj)
    assert "pretrained" in info["projection"]
    assert torch.equal(state["conv1.weight"], bare.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="no visual_projection"):
        ckpt.load_hf_visual(str(tmp_path / "bare"), quick_gelu=True)
    with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
        ckpt.load_hf_visual(str(tmp_path / "wp"), quick_gelu=False)


# ---------------------------------------------------------------------- local state dicts
def test_state_files_full_clip_or_visual_safetensors_and_weights_only_pt(tmp_path):
    clip = tiny_clip(9)
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(full))
    vis = tmp_path / "vis.pt"
    torch.save({"state_dict": clip.visual.state_dict()}, vis)
    for path in (full, vis):
        state = ckpt.load_state_file(path)
        exp = clip.visual.state_dict()
        assert set(state) == set(exp) and all(torch.equal(state[k], exp[k]) for k in exp)
    text_only = tmp_path / "text.safetensors"
    save_file({"token_embedding.weight": torch.ones(2, 2)}, str(text_only))
    with pytest.raises(ValueError, match="no CLIP image tower"):
        ckpt.load_state_file(text_only)


def test_check_visual_state_names_bad_keys_and_casts():
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    out = ckpt.check_visual_state(
        {"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(4)}, ref, "x"
    )
    assert out["a"].dtype == torch.float32 and torch.equal(out["a"], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        ckpt.check_visual_state({"a": torch.ones(2, 3)}, ref, "x")
    with pytest.raises(ValueError, match=r"a has shape \(3, 2\)"):
        ckpt.check_visual_state({"a": torch.ones(3, 2), "b": torch.ones(4)}, ref, "x")


# ---------------------------------------------------------------------- missing resources
@pytest.mark.reliability
def test_missing_resources_are_reported_together_with_fixes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    refs = [
        ckpt.CheckpointRef("expert GTSRB", "hf", "tanganke/clip-vit-base-patch32_gtsrb"),
        ckpt.CheckpointRef(
            "expert Cars", "task_vectors", str(tmp_path / "tv" / "Cars" / "finetuned.pt")
        ),
        ckpt.CheckpointRef("expert DTD", "state_dict", str(tmp_path / "DTD.safetensors")),
    ]
    (tmp_path / "DTD.safetensors").write_bytes(b"")  # present: not reported
    with pytest.raises(ckpt.MissingResourceError) as err:
        ckpt.check_resources([r.resource() for r in refs], "the test suite")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and len(err.value.missing) == 2
    assert "tanganke/clip-vit-base-patch32_gtsrb" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download tanganke/clip-vit-base-patch32_gtsrb" in msg
    assert str(tmp_path / "tv" / "Cars" / "finetuned.pt") in msg and ckpt.TASK_VECTORS_URL in msg
    assert "DTD" not in msg


def test_whole_transformers_clipmodel_folder_gives_its_vision_tower(tmp_path):
    """e.g. experts.pretrained=openai/clip-vit-base-patch32 (a CLIPModel checkpoint)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    torch.manual_seed(10)
    text = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        projection_dim=16,
    )
    cfg = CLIPConfig(
        text_config=text.to_dict(), vision_config=hf_config().to_dict(), projection_dim=16
    )
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    state, info = ckpt.load_hf_visual(str(tmp_path / "clip"), quick_gelu=True)
    visual = open_clip.CLIP(**CLIP_KWARGS).visual.eval()
    visual.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
        assert torch.allclose(visual(x), ref, atol=1e-5)
    assert "from the checkpoint" in info["projection"]


@pytest.mark.reliability
def test_unreachable_hub_is_asked_once_then_reported_for_every_hub_entry(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    calls = []

    def no_network(self, repo_id, **kw):
        calls.append(repo_id)
        raise ConnectionError("network is down")

    monkeypatch.setattr(HfApi, "repo_info", no_network)
    res = [
        ckpt.Resource("a", "hub_model", "org/a", "fix a"),
        ckpt.Resource("b", "hub_dataset", "org/b", "fix b"),
    ]
    missing = ckpt.missing_resources(res)
    assert calls == ["org/a"]
    assert [r.location for r, _ in missing] == ["org/a", "org/b"]
    assert all(
        why.startswith(ckpt.HUB_UNREACHABLE) and "network is down" in why for _, why in missing
    )
