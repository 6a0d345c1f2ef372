"""Text side of the embedded mini-CLIP: a closed word vocabulary, weak captions, prompts.

Captions (the mini-CLIP's "alt-text"). Each pretraining image of task t with class c gets
one caption, drawn once with a seeded generator (so a config gives the same captions):

- with probability ``name_prob``: a *named* caption, ``NAMED[k]`` with ``{c}`` the class's
  text name and ``{d}`` the task's domain phrase, k uniform: "a photo of a seven";
- with probability ``wrong_prob``: the same with the name of another class of the same task,
  drawn uniformly (partly wrong alt-text): "a house number of a three" under a 5;
- otherwise a *coarse* caption that names the domain only, ``COARSE[k]``: "a road sign".

So the class names are supervised by only a share of the pretraining images, and some of
that supervision is wrong, as web alt-text is for CLIP.

Zero-shot heads (CLIP's recipe): for each class, the L2-normalised text embeddings of the
class name under each of ``PROMPTS`` (``{c}`` the name, ``{d}`` the domain), averaged and
L2-normalised again.

Tokenizer: lower-case words split on white space (commas are words), ids ``1`` = start,
``2 .. V - 2`` = the sorted vocabulary of every source's names, domains and the templates'
words, ``V - 1`` = end (the largest id, so open_clip's argmax pooling reads the end token as
CLIP's does), ``0`` = padding.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

NAMED = ("{c}", "a photo of a {c}", "a {d} of a {c}", "a {c} , {d}", "the {c}")
COARSE = ("a {d}", "a photo of a {d}", "{d}", "an image")
PROMPTS = ("a photo of a {c}", "a {d} of a {c}", "the {c}", "a {c} , {d}")
PAD, START = 0, 1


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " , ").split()


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Sorted words of every source's class names and domain and of all templates."""
    from .offline_data import SOURCES

    words: set[str] = set()
    for src in SOURCES.values():
        for name in src.words:
            words.update(_words(name))
        words.update(_words(src.domain))
    for template in NAMED + COARSE + PROMPTS:
        words.update(_words(template.replace("{c}", "").replace("{d}", "")))
    return tuple(sorted(words))


def vocab_size() -> int:
    return len(vocabulary()) + 3  # padding, start, end


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """(len(texts), context_length) int64 token ids; raises on an unknown word or overflow."""
    ids = {w: i + 2 for i, w in enumerate(vocabulary())}
    end = vocab_size() - 1
    out = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    for row, text in enumerate(texts):
        words = _words(text)
        unknown = [w for w in words if w not in ids]
        if unknown:
            raise ValueError(f"caption {text!r} has words outside the vocabulary: {unknown}")
        tokens = [START, *(ids[w] for w in words), end]
        if len(tokens) > context_length:
            raise ValueError(
                f"caption {text!r} needs {len(tokens)} tokens; suite.model.text.context_length "
                f"is {context_length}"
            )
        out[row, : len(tokens)] = torch.tensor(tokens)
    return out


def captions(
    labels: np.ndarray,
    names: tuple[str, ...],
    domain: str,
    name_prob: float,
    wrong_prob: float,
    rng: np.random.Generator,
) -> tuple[list[str], np.ndarray]:
    """One weak caption per label (see module docstring) and its kind per row:
    0 = coarse, 1 = named correctly, 2 = named wrongly."""
    if not (0 <= name_prob and 0 <= wrong_prob and name_prob + wrong_prob <= 1):
        raise ValueError(
            f"suite.captions needs name_prob, wrong_prob >= 0 with sum <= 1; got "
            f"{name_prob}, {wrong_prob}"
        )
    n, k = len(labels), len(names)
    u = rng.random(n)
    kind = np.where(u < name_prob, 1, np.where(u < name_prob + wrong_prob, 2, 0))
    other = (labels + 1 + rng.integers(0, max(1, k - 1), n)) % k  # uniform over other classes
    which = rng.integers(0, 1 << 30, n)
    out = []
    for i in range(n):
        if kind[i] == 0:
            out.append(COARSE[which[i] % len(COARSE)].format(d=domain))
        else:
            c = names[labels[i] if kind[i] == 1 else other[i]]
            out.append(NAMED[which[i] % len(NAMED)].format(c=c, d=domain))
    return out, kind


def prompts(name: str, domain: str) -> list[str]:
    return [p.format(c=name, d=domain) for p in PROMPTS]
