"""Batched image-embedding extraction from the preprocessed uint8 cache.

Images are read from memory-mapped uint8 arrays (decoded and resized once per suite), moved
to the device as uint8 (4x less traffic than float), normalised there, and encoded under
bf16 autocast on CUDA. On CPU the loop runs in fp32. The result is float32 (N, D).
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch
from tqdm.auto import tqdm

from .suite import normalize_images


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA device is visible; use device=cpu")
    return torch.device(name)


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of ``images[idx]`` as a uint8 tensor (read by DataLoader workers)."""

    def __init__(self, images: np.ndarray, idx: np.ndarray, batch_size: int):
        self.images, self.idx, self.batch_size = images, idx, batch_size

    def __len__(self) -> int:
        return (len(self.idx) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        sel = self.idx[i * self.batch_size : (i + 1) * self.batch_size]
        return torch.from_numpy(np.ascontiguousarray(self.images[sel]))


def _pooled_token_block_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
    """open_clip's ResidualAttentionBlock.forward, with the MLP half on the class token only
    (``self._token_dim``: 1 batch-first, 0 sequence-first): the attention still reads every
    token, and nothing after this block reads another token."""
    x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
    x = x.narrow(self._token_dim, 0, 1)
    return x + self.ls_2(self.mlp(self.ln_2(x)))


def _last_block_if_pooled_token(visual: torch.nn.Module):
    """The last block of an open_clip ``VisionTransformer`` whose output is its class token
    (``pool_type='tok'``, no attentional pooler, no token output), else None."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if (
        not blocks
        or getattr(visual, "pool_type", None) != "tok"
        or getattr(visual, "attn_pool", True) is not None
        or getattr(visual, "output_tokens", True)
    ):
        return None
    last = blocks[-1]
    if type(last).__name__ != "ResidualAttentionBlock" or hasattr(last, "ln_1_kv"):
        return None
    return last


@contextlib.contextmanager
def pooled_token_only(visual: torch.nn.Module):
    """Inference of a CLIP ViT whose embedding is its class token: inside, the last block
    computes its MLP on the class token alone (its attention still reads every token). The
    skipped rows are ones nothing reads, so the embeddings are the same math at 8/12 of the
    last block's matmuls less per other token (``make bench``:
    bench/results_preference_models.md). They are equal up to float rounding: bit-identical
    for batches of 64 and more on the CPUs tested, a few ulps apart where the smaller matrix
    takes another BLAS kernel (a batch of one row) - which is why the pipeline uses it only
    for the model-producing baselines' sweeps (``pipeline.methods.models_accuracies``) and
    not for the cached features ReACT is fitted on. Any other encoder runs as is. For
    inference only: under autograd the weight gradients would sum fewer rows, in another
    order. Yields whether the shortcut applies."""
    last = _last_block_if_pooled_token(visual)
    if last is None or "forward" in vars(last):  # not this shortcut, or already inside one
        yield last is not None and hasattr(last, "_token_dim")
        return
    last._token_dim = 1 if getattr(visual.transformer, "batch_first", False) else 0
    last.forward = types.MethodType(_pooled_token_block_forward, last)
    try:
        yield True
    finally:
        del last.forward, last._token_dim


@torch.no_grad()
def extract_features(
    visual: torch.nn.Module,
    images: np.ndarray,
    mean,
    std,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    autocast: bool = True,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Embeddings (N, D) float32 on CPU of ``images[indices]`` through ``visual``.

    With ``num_workers`` > 0, DataLoader worker processes gather the next batches from the
    memory-mapped cache (into pinned memory on CUDA) while the device encodes the current
    one; the workers are forked, so the memory map is shared, not copied. The pipeline asks
    for workers on CUDA only: on a CPU they would compete with the forward pass for cores.
    """
    device = torch.device(device)
    visual = visual.to(device).eval()
    idx = np.arange(images.shape[0]) if indices is None else np.asarray(indices)
    out: list[torch.Tensor] = []
    use_amp = autocast and device.type == "cuda"
    on_gpu = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _Batches(images, idx, batch_size),
        batch_size=None,
        num_workers=int(num_workers),
        pin_memory=on_gpu,
    )
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = normalize_images(batch.to(device, non_blocking=True), mean, std)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            z = visual(x)
        out.append(z.float().cpu())
    if not out:
        raise ValueError(f"{desc}: no images to encode (empty index set)")
    feats = torch.cat(out)
    if not torch.isfinite(feats).all():
        bad = int((~torch.isfinite(feats)).any(dim=1).sum())
        raise FloatingPointError(
            f"{desc}: {bad} of {len(feats)} embeddings are not finite (NaN/inf); the model "
            "weights are probably broken (check the merge / checkpoint)"
        )
    return feats


def logits(features: torch.Tensor, head: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP head: logit_scale * cosine(features, head rows). Works batched over leading dims."""
    z = torch.nn.functional.normalize(features, dim=-1)
    return logit_scale * z @ head.to(z.dtype).T


def accuracy_from_features(features, head, labels, logit_scale=100.0) -> torch.Tensor:
    """Top-1 accuracy; features (..., N, D) -> (...)."""
    pred = logits(features, head, logit_scale).argmax(-1)
    return (pred == labels.to(pred.device)).double().mean(-1)
