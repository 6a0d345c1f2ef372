"""Training of the offline suite's models: a small open_clip ViT and one expert per task.

Pretrained encoder (stands in for CLIP's pretrained image tower). Trained here from scratch
with SimCLR (no labels, none of the tasks' objectives) on the pooled *train* images of all
tasks, drawn task-balanced: two augmented views x', x'' of each image, embeddings
z = normalize(visual(x)), and the NT-Xent loss over the 2B views of a batch,

    l_i = -log( exp(z_i . z_j(i) / T) / sum_{k != i} exp(z_i . z_k / T) ),

j(i) the other view of the same image.

Heads (stand in for CLIP's zero-shot text heads). For task t and class c, the L2-normalised
mean of the L2-normalised pretrained embeddings of the class's train images:
h_c = normalize(mean_i normalize(f_0(x_i))). Frozen from then on.

Experts. For each task, the whole image tower is fine-tuned from the pretrained encoder
with cross-entropy on logits = logit_scale * normalize(f(x)) @ H_t^T with H_t frozen, as
CLIP experts are fine-tuned under frozen zero-shot heads.

Determinism: model init under ``torch.manual_seed(seed)``, and every random draw (batch
indices, augmentations) from a ``torch.Generator`` seeded from the config, so one config
gives bit-identical weights on one machine and thread count (the safetensors files can
differ in bytes only because safetensors writes metadata keys in hash-map order).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..suite import build_visual, normalize_images


def clip_kwargs(model_cfg) -> dict[str, Any]:
    """open_clip.CLIP kwargs of the suite's model. ``text.vocab_size: null`` means the mini-CLIP
    word vocabulary (:mod:`.offline_text`); the SimCLR suite's text tower is tiny and unused."""
    from . import offline_text

    v, t = model_cfg.vision, model_cfg.text
    vocab = offline_text.vocab_size() if t.vocab_size is None else int(t.vocab_size)
    return {
        "embed_dim": int(model_cfg.embed_dim),
        "vision_cfg": {
            "image_size": int(model_cfg.image_size),
            "patch_size": int(v.patch_size),
            "width": int(v.width),
            "layers": int(v.layers),
            "head_width": int(v.head_width),
            "mlp_ratio": float(v.mlp_ratio),
        },
        "text_cfg": {
            "context_length": int(t.context_length),
            "vocab_size": vocab,
            "width": int(t.width),
            "heads": int(t.heads),
            "layers": int(t.layers),
        },
    }


# ---------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, gen: torch.Generator, aug) -> torch.Tensor:
    """Random affine (rotation, scale, shift) and brightness/contrast jitter, batched.

    ``x`` is float in [0, 1], (N, C, H, W); the border fills with 0 (black). Returns a new
    tensor in [0, 1].
    """
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    rot = float(aug.rotate_deg)
    ang = uniform(-rot, rot) * (math.pi / 180.0)
    scale = uniform(float(aug.scale[0]), float(aug.scale[1]))
    sh = float(aug.translate)
    tx, ty = uniform(-sh, sh), uniform(-sh, sh)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # (N, 2, 3): output pixel -> input pixel
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    j = float(aug.jitter)
    if j > 0:
        contrast = uniform(1 - j, 1 + j).view(-1, 1, 1, 1)
        bright = uniform(-j / 2, j / 2).view(-1, 1, 1, 1)
        x = x * contrast + bright
    return x.clamp_(0.0, 1.0)


def _to_input(x01: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] images (N, 3, H, W) -> normalised model input."""
    return normalize_images(x01.mul(255.0), mean, std)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=(0.9, 0.98)
    )


def _unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float [0, 1] (N, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views (B, D) each (rows need not be normalised)."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    b = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def ssl_projection(dim: int, hidden: int) -> torch.nn.Module:
    """SimCLR's projection head: Linear(dim, hidden) -> ReLU -> Linear(hidden, dim)."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim)
    )


# ---------------------------------------------------------------------------- pretraining
def _balanced_training(
    params, pools, cfg, gen, desc: str, progress: bool, loss_of, after_step=None
):
    """The loop both pretraining recipes share: ``cfg.steps`` optimizer steps (warmup-cosine
    LR, gradient clipping) on task-balanced batches (a task uniformly, then one of its images
    uniformly, drawn with ``gen``). ``loss_of(x, idx)`` is the loss of uint8 images ``x`` at
    flat indices ``idx`` into the concatenated pools. Returns the per-step losses."""
    params = list(params)
    data = [_unit(p) for p in pools]
    sizes = torch.tensor([len(d) for d in data])
    flat = torch.cat(data)
    offsets = torch.cumsum(sizes, 0) - sizes
    opt = _optimizer(params, cfg)
    steps, bs = int(cfg.steps), int(cfg.batch_size)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, float(cfg.lr), int(cfg.warmup_steps))
        task = torch.randint(len(data), (bs,), generator=gen)
        idx = offsets[task] + (torch.rand(bs, generator=gen) * sizes[task]).long()
        loss = loss_of(flat[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _loss_stats(losses: list[float]) -> dict[str, float]:
    return {"loss_first": losses[0], "loss_last_10": float(np.mean(losses[-10:]))}


def pretrain(
    model_config: dict[str, Any],
    pools: list[np.ndarray],
    cfg,
    mean,
    std,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """SimCLR on the task-balanced pool of unlabeled images. Returns (visual state, stats)."""
    torch.manual_seed(int(cfg.seed))
    visual = build_visual(model_config).train()
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def loss_of(x, idx):
        v1 = _to_input(augment(x, gen, cfg.augment), mean, std)
        v2 = _to_input(augment(x, gen, cfg.augment), mean, std)
        z1, z2 = visual(torch.cat([v1, v2])).chunk(2)
        return nt_xent(z1, z2, float(cfg.temperature))

    desc = "offline suite: pretraining (SimCLR)"
    losses = _balanced_training(visual.parameters(), pools, cfg, gen, desc, progress, loss_of)
    return _state(visual), _loss_stats(losses)


def pretrain_clip(
    model_config: dict[str, Any],
    pools: list[np.ndarray],
    tokens: list[torch.Tensor],
    cfg,
    mean,
    std,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Contrastive image-caption pretraining of both towers (CLIP's symmetric InfoNCE).

    ``pools[t]`` uint8 (N_t, 3, H, W) images and ``tokens[t]`` (N_t, L) their caption ids;
    batches are drawn task-balanced. Loss: mean of the image->text and text->image cross
    entropies of ``exp(s) * normalize(f(x)) @ normalize(g(y))^T`` with CLIP's learnable
    temperature s (clamped at log 100). Returns (whole CLIP state dict, stats).

    With ``cfg.ssl.weight`` w > 0 the recipe is SLIP's (Mu et al., ECCV 2022): each image is
    augmented twice, the caption loss above is taken on the first view, and w times SimCLR's
    NT-Xent (temperature ``cfg.ssl.temperature``) of the two views' image embeddings, each
    through a 2-layer MLP projection (``cfg.ssl.hidden`` units, trained here and discarded),
    is added. w = 0 (or no ``ssl`` section) is the plain CLIP loss, bit for bit.
    """
    from ..suite import build_clip

    torch.manual_seed(int(cfg.seed))
    model = build_clip(model_config).train()
    ssl = cfg.get("ssl")
    ssl_weight = 0.0 if ssl is None else float(ssl.weight)
    params = list(model.parameters())
    if ssl_weight > 0:
        ssl_head = ssl_projection(int(model.visual.output_dim), int(ssl.hidden))
        params += list(ssl_head.parameters())
    gen = torch.Generator().manual_seed(int(cfg.seed))
    flat_tokens = torch.cat(tokens)
    target = torch.arange(int(cfg.batch_size))

    def view(x):
        return x if cfg.augment is None else augment(x, gen, cfg.augment)

    def loss_of(x, idx):
        v1 = view(x)
        if ssl_weight > 0:
            e1, e2 = model.encode_image(_to_input(torch.cat([v1, view(x)]), mean, std)).chunk(2)
        else:
            e1 = model.encode_image(_to_input(v1, mean, std))
        img = F.normalize(e1, dim=-1)
        txt = model.encode_text(flat_tokens[idx], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        if ssl_weight > 0:
            loss = loss + ssl_weight * nt_xent(ssl_head(e1), ssl_head(e2), float(ssl.temperature))
        return loss

    @torch.no_grad()
    def clamp_temperature():
        model.logit_scale.clamp_(0, math.log(100.0))

    desc = "offline suite: pretraining mini-CLIP" + (" + SimCLR (SLIP)" if ssl_weight > 0 else "")
    losses = _balanced_training(params, pools, cfg, gen, desc, progress, loss_of, clamp_temperature)
    stats = {**_loss_stats(losses), "logit_scale": float(model.logit_scale.detach().exp())}
    return _state(model), stats


@torch.no_grad()
def text_heads(
    model: torch.nn.Module, prompts: dict[str, list[list[str]]], context_length: int
) -> dict[str, torch.Tensor]:
    """CLIP zero-shot heads: ``prompts[task][c]`` the prompts of class c; per class the mean
    of the L2-normalised text embeddings, L2-normalised again -> (C, D) per task."""
    from .offline_text import tokenize

    model.eval()
    heads = {}
    for task, per_class in prompts.items():
        rows = [
            F.normalize(model.encode_text(tokenize(p, context_length)), dim=-1).mean(0)
            for p in per_class
        ]
        heads[task] = F.normalize(torch.stack(rows), dim=-1)
    return heads


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- heads
@torch.no_grad()
def encode(
    visual: torch.nn.Module, images: np.ndarray, mean, std, batch_size: int = 512
) -> torch.Tensor:
    """Embeddings (N, D) float32 of uint8 (N, 3, H, W) images, in eval mode."""
    visual.eval()
    out = [
        visual(normalize_images(torch.from_numpy(np.array(images[i : i + batch_size])), mean, std))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, D): h_c = normalize(mean_{i: y_i = c} normalize(z_i))."""
    z = F.normalize(features, dim=-1)
    counts = torch.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        missing = torch.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes {missing} have no train images; cannot build their prototypes")
    sums = torch.zeros(n_classes, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)
    return F.normalize(sums / counts[:, None].to(z.dtype), dim=-1)


# ---------------------------------------------------------------------------- experts
TRAINABLE = ("all", "attention")


def check_trainable(which) -> None:
    """Raise ValueError unless ``which`` is a ``suite.finetune.trainable`` value."""
    if which not in TRAINABLE:
        raise ValueError(f"suite.finetune.trainable must be one of {TRAINABLE}; got {which!r}")


def trainable_parameters(visual: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The parameters an expert's fine-tuning updates (``which`` in ``TRAINABLE``); the others
    get ``requires_grad=False``."""
    check_trainable(which)
    out = []
    for name, p in visual.named_parameters():
        p.requires_grad_(which == "all" or ".attn." in name)
        if p.requires_grad:
            out.append(p)
    if not out:
        raise ValueError(f"suite.finetune.trainable={which}: the image tower has no such weights")
    return out


def finetune(
    model_config: dict[str, Any],
    pretrained: dict[str, torch.Tensor],
    head: torch.Tensor,
    images: np.ndarray,
    labels: np.ndarray,
    cfg,
    logit_scale: float,
    mean,
    std,
    desc: str = "expert",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune the image tower under a frozen head. Returns (visual state, stats).

    ``cfg.trainable``: ``all`` (the whole tower, the task-vectors protocol) or ``attention``
    (only the attention modules' weights, every ``.attn.`` parameter, the rest frozen at the
    pretrained values: the recipe of Jin et al., ICLR 2025, reported to make task vectors
    more weight-disentangled)."""
    torch.manual_seed(int(cfg.seed))
    visual = build_visual(model_config)
    visual.load_state_dict(pretrained)
    visual.train()
    params = trainable_parameters(visual, str(cfg.get("trainable", "all")))
    head = head.detach().clone().requires_grad_(False)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    x_all = _unit(images)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n = len(y_all)
    opt = _optimizer(params, cfg)
    steps, bs = int(cfg.steps), min(int(cfg.batch_size), n)
    order, pos = torch.randperm(n, generator=gen), 0
    losses, correct, seen = [], 0, 0
    bar = tqdm(range(steps), desc=f"offline suite: fine-tuning {desc}", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, float(cfg.lr), int(cfg.warmup_steps))
        if pos + bs > n:  # next epoch
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        x = x_all[idx]
        if cfg.augment is not None:
            x = augment(x, gen, cfg.augment)
        logits = logit_scale * F.normalize(visual(_to_input(x, mean, std)), dim=-1) @ head.T
        loss = F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
        opt.step()
        losses.append(loss.item())
        if step >= steps - 20:
            correct += int((logits.argmax(-1) == y_all[idx]).sum())
            seen += len(idx)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    stats = {**_loss_stats(losses), "train_acc_last_20_steps": correct / max(1, seen)}
    return _state(visual), stats
