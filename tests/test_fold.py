"""Folding W_p into open_clip's visual projection: the folded model's image embedding equals
react.apply(W_p, original embedding), for models, state dicts and the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from correction import fold, react

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
)


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(**CFG).eval()


def images(n=5, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def random_map(D=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)


def load_script():
    spec = importlib.util.spec_from_file_location(
        "fold_checkpoint", ROOT / "scripts" / "fold_checkpoint.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def test_fold_into_clip_equals_apply():
    model, x, W = tiny_clip(), images(), random_map()
    z = model.encode_image(x, normalize=False)
    folded = fold.fold_into_clip(model, W)
    torch.testing.assert_close(
        folded.encode_image(x, normalize=False), react.apply(W, z), rtol=1e-5, atol=1e-5
    )
    # normalised embeddings also match the normalised corrected features
    torch.testing.assert_close(
        folded.encode_image(x, normalize=True),
        torch.nn.functional.normalize(react.apply(W, z), dim=-1),
        rtol=1e-5,
        atol=1e-5,
    )
    # the original is untouched (deep copy), text tower unchanged
    torch.testing.assert_close(model.encode_image(x), z, rtol=0, atol=0)
    tokens = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(
        folded.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=0
    )


@torch.no_grad()
def test_fold_inplace_and_bare_visual():
    model, x, W = tiny_clip(), images(), random_map()
    z = model.encode_image(x)
    same = fold.fold_into_clip(model, W, inplace=True)
    assert same is model
    torch.testing.assert_close(model.encode_image(x), react.apply(W, z), rtol=1e-5, atol=1e-5)
    visual = tiny_clip().visual
    z = visual(x)
    torch.testing.assert_close(
        fold.fold_into_clip(visual, W)(x), react.apply(W, z), rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
def test_fold_real_preference_map():
    """End to end with statistics fitted on the model's own embeddings."""
    model, expert = tiny_clip(0), tiny_clip(5)
    x = images(40, seed=3)
    stats = [
        react.task_statistics(
            model.encode_image(x[i::2]), expert.encode_image(x[i::2]), task=f"t{i}"
        )
        for i in range(2)
    ]
    W = react.preference_map(stats, [0.3, 0.7])
    folded = fold.fold_into_clip(model, W)
    torch.testing.assert_close(
        folded.encode_image(x), react.apply(W, model.encode_image(x)), rtol=1e-5, atol=1e-5
    )


def test_fold_state_dict_full_and_visual_keys():
    model, W = tiny_clip(), random_map().double()
    sd = model.state_dict()
    before = sd["visual.proj"].clone()
    out = fold.fold_state_dict(sd, W)
    expect = sd["visual.proj"].double() @ W.T
    torch.testing.assert_close(out["visual.proj"], expect.float(), rtol=1e-6, atol=1e-6)
    assert out["visual.proj"].dtype == sd["visual.proj"].dtype
    assert torch.equal(sd["visual.proj"], before)  # input not modified
    assert all(out[k] is sd[k] for k in sd if k != "visual.proj")
    vis = model.visual.state_dict()
    out_v = fold.fold_state_dict(vis, W)
    torch.testing.assert_close(out_v["proj"], out["visual.proj"], rtol=0, atol=0)
    custom = fold.fold_state_dict({"head": sd["visual.proj"]}, W, key="head")
    torch.testing.assert_close(custom["head"], out["visual.proj"], rtol=0, atol=0)


def test_fold_errors():
    model, W = tiny_clip(), random_map()
    sd = model.state_dict()
    with pytest.raises(ValueError, match="no 'visual.proj' entry"):
        fold.fold_state_dict({"a": torch.zeros(2)}, W)
    with pytest.raises(ValueError, match="embedding D=16.*8 x 8"):
        fold.fold_state_dict(sd, torch.eye(8))
    with pytest.raises(ValueError, match=r"one \(D, D\) map"):
        fold.fold_state_dict(sd, torch.eye(16).expand(2, 16, 16))
    with pytest.raises(ValueError, match="non-finite"):
        fold.fold_state_dict(sd, torch.full((16, 16), float("nan")))
    with pytest.raises(ValueError, match="embedding D=16"):
        fold.fold_into_clip(model, torch.eye(4))
    model.visual.proj = None
    with pytest.raises(ValueError, match="no 'proj' matrix"):
        fold.fold_into_clip(model, W)


@pytest.fixture
def cli_files(tmp_path):
    """A tiny CLIP checkpoint, its config, and 3 tasks' statistics (names a, b, c)."""
    model = tiny_clip()
    ckpt = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(CFG))
    g = torch.Generator().manual_seed(7)
    stats = []
    for t in range(3):
        m = torch.randn(30, 16, generator=g)
        stats.append(react.task_statistics(m, m @ random_map(seed=10 + t).T))
    stats_path = tmp_path / "stats.safetensors"
    react.save_statistics(stats, stats_path, task_names=["a", "b", "c"])
    return dict(model=model, ckpt=ckpt, cfg=cfg, stats=stats, stats_path=stats_path, tmp=tmp_path)


@torch.no_grad()
def test_cli_full_checkpoint_by_name(cli_files):
    f = cli_files
    out = f["tmp"] / "folded.safetensors"
    rc = load_script().main(
        [
            "--stats",
            str(f["stats_path"]),
            "--checkpoint",
            str(f["ckpt"]),
            "--model-config",
            str(f["cfg"]),
            "--tasks",
            "c,a",
            "--preference",
            "0.7,0.3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    W = react.preference_map(f["stats"], [0.3, 0.0, 0.7])
    fresh = open_clip.CLIP(**CFG).eval()
    fresh.load_state_dict(load_file(str(out)), strict=True)  # plain open_clip loads it
    x = images()
    torch.testing.assert_close(
        fresh.encode_image(x), react.apply(W, f["model"].encode_image(x)), rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
def test_cli_pt_visual_checkpoint_and_model_name(cli_files, tmp_path):
    f = cli_files
    # a registered open_clip model name (tiny config) and a visual-only .pt checkpoint
    reg = tmp_path / "cfgs"
    reg.mkdir()
    (reg / "TinyFoldTest.json").write_text(json.dumps(CFG))
    open_clip.add_model_config(reg)
    ckpt = tmp_path / "visual.pt"
    torch.save({"state_dict": f["model"].visual.state_dict()}, ckpt)
    out = tmp_path / "folded_visual.safetensors"
    rc = load_script().main(
        [
            "--stats",
            str(f["stats_path"]),
            "--checkpoint",
            str(ckpt),
            "--model",
            "TinyFoldTest",
            "--preference",
            "2,1,1",
            "--normalize",
            "--aggregation",
            "naive",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    W = react.preference_map(f["stats"], [0.5, 0.25, 0.25], aggregation="naive")
    fresh = open_clip.create_model("TinyFoldTest", pretrained=None).eval()
    fresh.visual.load_state_dict(load_file(str(out)), strict=True)
    x = images()
    torch.testing.assert_close(
        fresh.encode_image(x), react.apply(W, f["model"].encode_image(x)), rtol=1e-5, atol=1e-5
    )


def test_cli_errors(cli_files, capsys):
    f = cli_files
    base = [
        "--stats",
        str(f["stats_path"]),
        "--checkpoint",
        str(f["ckpt"]),
        "--model-config",
        str(f["cfg"]),
        "--out",
        str(f["tmp"] / "x.safetensors"),
    ]
    main = load_script().main
    cases = [
        (["--preference", "0.5,0.5"], "2 weights but the statistics hold 3 tasks"),
        (["--tasks", "a,zzz", "--preference", "0.5,0.5"], "unknown task"),
        (["--preference", "0.5,0.6,0.2"], "sum to 1"),
        (["--preference", "a,b,c"], "comma-separated numbers"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    wrong = f["tmp"] / "wrong.json"
    cfg = json.loads(json.dumps(CFG))
    cfg["vision_cfg"]["layers"] = 2
    wrong.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        main(base[:4] + ["--model-config", str(wrong), "--out", "x", "--preference", "1,0,0"])
    err = capsys.readouterr().err
    assert (
        f"does not match --model-config {wrong}: 12 missing keys (first 'visual.transformer.resblocks.1."
        in err
    )
    assert len(err.strip().splitlines()) == 1
    # another width: one line naming both widths and the flag that fixes it
    cfg["vision_cfg"].update(layers=1, width=48)
    wrong.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        main(base[:4] + ["--model-config", str(wrong), "--out", "x", "--preference", "1,0,0"])
    err = capsys.readouterr().err
    assert (
        "has width 32 and embedding 16, but --model-config" in err
        and "width 48 and embedding 16" in err
    )
    assert (
        "--model-config, named in the run's artifacts.json" in err
        and len(err.strip().splitlines()) == 1
    )
    # the advice names the CLI flag, not the library keyword
    with pytest.raises(SystemExit):
        main(base + ["--preference", "1,1,1"])
    err = capsys.readouterr().err
    assert "pass --normalize" in err and "normalize=True" not in err


def test_cli_subprocess(cli_files):
    f = cli_files
    out = f["tmp"] / "sub.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "fold_checkpoint.py"),
            "--stats",
            str(f["stats_path"]),
            "--checkpoint",
            str(f["ckpt"]),
            "--model-config",
            str(f["cfg"]),
            "--preference",
            "0,1,0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=f["tmp"],
    )
    assert r.returncode == 0, r.stderr
    folded = load_file(str(out))
    expect = f["model"].visual.proj.double() @ react.task_map(f["stats"][1]).double().T
    torch.testing.assert_close(folded["visual.proj"], expect.float(), rtol=1e-6, atol=1e-6)
