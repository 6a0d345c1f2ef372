"""The labelled linear-map bound (correction/supervised.py) against second computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from correction.supervised import supervised_linear_map


def loop_loss(W, feats, labels, heads, s, weights):
    """The objective written sample by sample (a second computation)."""
    total = 0.0
    for w, Z, Y, H in zip(weights, feats, labels, heads, strict=True):
        per = []
        for z, y in zip(Z, Y, strict=True):
            u = W @ z
            logits = s * (u / u.norm()) @ H.T
            per.append(torch.logsumexp(logits, 0) - logits[y])
        total = total + w * torch.stack(per).mean()
    return total


def problem(seed=0, D=6, n=60, T=2, C=3):
    g = torch.Generator().manual_seed(seed)
    heads = [
        F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(T)
    ]
    labels = [torch.randint(C, (n,), generator=g) for _ in range(T)]
    clean = [
        h[y] + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
        for h, y in zip(heads, labels, strict=False)
    ]
    A = torch.eye(D, dtype=torch.float64) + 0.6 * torch.randn(
        D, D, generator=g, dtype=torch.float64
    )
    return [x @ A.T for x in clean], labels, heads, A


def test_fitted_map_is_a_stationary_point_lower_than_identity_and_the_inverse_distortion():
    feats, labels, heads, A = problem()
    W = supervised_linear_map(feats, labels, heads, logit_scale=10.0, steps=200)
    w = [0.5, 0.5]
    Wr = W.clone().requires_grad_(True)
    loss = loop_loss(Wr, feats, labels, heads, 10.0, w)
    (grad,) = torch.autograd.grad(loss, Wr)
    assert grad.norm() < 1e-4
    eye = torch.eye(6, dtype=torch.float64)
    assert loss < loop_loss(eye, feats, labels, heads, 10.0, w)
    assert loss <= loop_loss(torch.linalg.inv(A), feats, labels, heads, 10.0, w) + 1e-9


def test_single_task_weights_fit_that_task_only():
    feats, labels, heads, _ = problem(seed=1)
    W0 = supervised_linear_map(feats, labels, heads, 10.0, steps=200, weights=[1.0, 0.0])
    Wr = W0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loop_loss(Wr, feats[:1], labels[:1], heads[:1], 10.0, [1.0]), Wr)
    assert g.norm() < 1e-4


def test_mismatched_inputs_are_named():
    feats, labels, heads, _ = problem()
    with pytest.raises(ValueError, match="task 1"):
        supervised_linear_map([feats[0], feats[1][:, :5]], labels, heads, 10.0)
    with pytest.raises(ValueError, match="one \\(features, labels, head\\) per task"):
        supervised_linear_map(feats, labels[:1], heads, 10.0)
