"""pipeline.features.extract_features against plain per-image loops.

CPU (always): the batched extraction from the uint8 cache equals a per-image fp32 loop that
normalises each image independently with numpy, to 1e-5, for an unsorted index subset and a
batch size that does not divide it; on CPU the ``autocast`` flag changes nothing.

CUDA (skipped without a GPU): bf16 autocast extraction against the fp32 extraction of the
same random open_clip ViTs. Stated tolerance, per image: cosine similarity > 0.999 and
relative L2 error ||z_bf16 - z_fp32|| / ||z_fp32|| < 0.05; over the batch, max |z_bf16 -
z_fp32| < 0.05 * max |z_fp32|. Where the bound comes from: the same comparison under CPU bf16
autocast (torch.autocast("cpu", torch.bfloat16), bf16 matmuls with fp32 accumulation as on
CUDA) gives min cosine 0.99994 and max relative L2 error 0.011 for random ViT-B/32 and 0.009
for the small ViT below, so 0.05 leaves a 4-5x margin. The CUDA numbers themselves were not
measured in the session that wrote this test (no GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features import extract_features

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def small_visual(
    seed: int = 0, image_size: int = 32, layers: int = 2, width: int = 64
) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "image_size": image_size,
            "patch_size": 8,
            "width": width,
            "layers": layers,
            "head_width": 32,
            "mlp_ratio": 2.0,
        },
        text_cfg={"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1},
    )
    return model.visual.eval()


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


@torch.no_grad()
def plain_loop(visual, imgs: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """One image at a time, normalised in numpy (float64), fp32 forward."""
    mean, std = np.array(MEAN).reshape(3, 1, 1), np.array(STD).reshape(3, 1, 1)
    rows = []
    for i in idx:
        x = (imgs[i].astype(np.float64) / 255.0 - mean) / std
        rows.append(visual(torch.from_numpy(x).float()[None])[0])
    return torch.stack(rows)


def test_cpu_extraction_equals_plain_loop(tmp_path):
    torch.set_num_threads(1)
    visual = small_visual()
    imgs = images(23, 32)
    idx = np.array([7, 3, 22, 0, 11, 5, 19, 1, 14, 9, 2])  # unsorted subset, 11 = 2 * 5 + 1
    got = extract_features(
        visual, imgs, MEAN, STD, indices=idx, batch_size=5, device="cpu", autocast=True
    )
    want = plain_loop(visual, imgs, idx)
    assert got.dtype == torch.float32 and got.shape == (11, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # whole split (indices=None), autocast off: the same numbers (autocast is ignored on CPU)
    full = extract_features(visual, imgs, MEAN, STD, batch_size=8, device="cpu", autocast=False)
    torch.testing.assert_close(full[idx], got, atol=1e-6, rtol=1e-6)
    assert full.shape == (23, 32)
    # DataLoader worker processes reading the memory-mapped cache: same rows, same order
    path = tmp_path / "images.npy"
    np.save(path, imgs)
    mapped = np.load(path, mmap_mode="r")
    workers = extract_features(
        visual, mapped, MEAN, STD, indices=idx, batch_size=5, device="cpu", num_workers=2
    )
    torch.testing.assert_close(workers, got, atol=0, rtol=0)


def test_cpu_extraction_rejects_empty_and_nonfinite():
    visual = small_visual(layers=1)
    imgs = images(4, 32)
    with pytest.raises(ValueError, match="no images"):
        extract_features(
            visual, imgs, MEAN, STD, indices=np.array([], dtype=np.int64), device="cpu"
        )
    with torch.no_grad():
        visual.proj.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        extract_features(visual, imgs, MEAN, STD, device="cpu")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _compare(visual, imgs) -> dict[str, float]:
    fp32 = extract_features(visual, imgs, MEAN, STD, batch_size=16, device="cuda", autocast=False)
    bf16 = extract_features(visual, imgs, MEAN, STD, batch_size=16, device="cuda", autocast=True)
    assert bf16.dtype == torch.float32 and bf16.device.type == "cpu"
    cos = torch.nn.functional.cosine_similarity(bf16, fp32, dim=-1)
    rel = (bf16 - fp32).norm(dim=-1) / fp32.norm(dim=-1)
    return {
        "min_cos": float(cos.min()),
        "max_rel_l2": float(rel.max()),
        "max_abs_over_scale": float((bf16 - fp32).abs().max() / fp32.abs().max()),
        "differs": bool((bf16 != fp32).any()),
    }


@cuda
@pytest.mark.parametrize("kind", ["small", "ViT-B-32"])
def test_cuda_bf16_autocast_matches_fp32(kind):
    if kind == "small":
        visual, size = small_visual(image_size=64, layers=4, width=192), 64
    else:
        import open_clip

        torch.manual_seed(0)
        visual, size = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval(), 224
    imgs = images(48, size, seed=1)
    # the fp32 CUDA path agrees with the CPU (loosely: cuDNN may run the patch-embedding
    # convolution in TF32 by default)
    cpu = extract_features(visual, imgs[:8], MEAN, STD, device="cpu")
    gpu = extract_features(visual.cuda(), imgs[:8], MEAN, STD, device="cuda", autocast=False)
    assert float(((gpu - cpu).norm(dim=-1) / cpu.norm(dim=-1)).max()) < 1e-2
    r = _compare(visual, imgs)
    assert r["differs"], "autocast=True changed nothing: bf16 was not used on CUDA"
    assert r["min_cos"] > 0.999, r
    assert r["max_rel_l2"] < 0.05, r
    assert r["max_abs_over_scale"] < 0.05, r
