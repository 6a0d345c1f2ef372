"""CLIP zero-shot classification heads from class names and prompt templates.

For class c with name n_c and templates t_1..t_J (strings with ``{c}``):

    e_cj = f_text(t_j(n_c)) / ||f_text(t_j(n_c))||      (L2-normalised text embedding)
    w_c  = mean_j e_cj / ||mean_j e_cj||                 (re-normalised mean)

The head is W = [w_1; ...; w_C] (C x D, unit rows); logits = logit_scale * cos(z, w_c), as in
the task-vectors protocol (mlfoundations/task_vectors ``src/heads.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import compat  # noqa: F401


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: ``[t_1(n_1), ..., t_J(n_1), t_1(n_2), ...]``."""
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs a '{{c}}' placeholder; got {list(templates)}")
    if not classnames:
        raise ValueError("no class names given")
    return [t.replace("{c}", name) for name in classnames for t in templates]


@torch.no_grad()
def zeroshot_head(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """The (C, D) float32 head of unit rows for ``classnames`` (see the module docstring).

    ``model`` is an open_clip CLIP (its ``encode_text`` is used) and ``tokenizer`` its
    tokenizer (``open_clip.get_tokenizer``). Prompts are encoded in batches of ``batch_size``.
    """
    prompts = fill_templates(classnames, templates)
    model = model.to(device).eval()
    chunks = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        e = model.encode_text(tokens).float()
        chunks.append(e / e.norm(dim=-1, keepdim=True))
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    w = emb.mean(dim=1)
    return (w / w.norm(dim=-1, keepdim=True)).cpu()


def tokenizer_for(model_config: dict) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for a suite model config.

    ``{"model_name": ...}``: ``open_clip.get_tokenizer(model_name)``; ``{"clip_kwargs": ...}``:
    the CLIP BPE tokenizer with the config's text context length (vocab_size must be 49408).
    """
    import open_clip

    if "model_name" in model_config:
        return open_clip.get_tokenizer(model_config["model_name"])
    text = dict(model_config["clip_kwargs"].get("text_cfg", {}))
    vocab = int(text.get("vocab_size", 49408))
    if vocab != 49408:
        raise ValueError(
            f"zero-shot heads need the CLIP BPE vocabulary (text_cfg.vocab_size 49408); got {vocab}"
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(text.get("context_length", 77)))
