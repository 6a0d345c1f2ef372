"""Reference bound, not a method: the best linear map of final embeddings trained WITH labels.

ReACT fits its maps without labels (merged features toward expert features). To bound what a
linear correction of the merged embeddings can do on a suite, this fits W (D x D) by
minimising the cross entropy of the frozen heads on the corrected embeddings,

    L(W) = sum_t w_t * mean_i CE( s * normalize(W z_ti) @ H_t^T, y_ti ),

full batch, with L-BFGS from W = I (``tasks weights`` w_t = 1/T: one map shared by all tasks,
the bound for the equal preference; a single task: the bound for its one-hot preference).
Fitted on the evaluation images themselves it is an oracle: report it as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def supervised_linear_map(
    features: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    heads: Sequence[torch.Tensor],
    logit_scale: float,
    steps: int = 100,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """W (D, D) minimising the weighted head cross entropy of normalize(W z) (see module)."""
    if not (len(features) == len(labels) == len(heads)) or not features:
        raise ValueError(
            f"need one (features, labels, head) per task; got {len(features)}, {len(labels)}, "
            f"{len(heads)}"
        )
    D = features[0].shape[1]
    for t, (z, y, h) in enumerate(zip(features, labels, heads, strict=True)):
        if z.ndim != 2 or z.shape[1] != D or h.shape[1] != D or len(y) != len(z):
            raise ValueError(
                f"task {t}: features {tuple(z.shape)}, labels {tuple(y.shape)}, head "
                f"{tuple(h.shape)} do not fit one D = {D}"
            )
    w = (
        torch.full((len(features),), 1.0 / len(features))
        if weights is None
        else torch.tensor([float(v) for v in weights])
    )
    feats = [z.detach().double() for z in features]
    hs = [h.detach().double() for h in heads]
    ys = [y.long() for y in labels]
    W = torch.eye(D, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(
            wt * F.cross_entropy(logit_scale * F.normalize(z @ W.T, dim=-1) @ h.T, y)
            for wt, z, h, y in zip(w.tolist(), feats, hs, ys, strict=True)
        )
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().to(features[0].dtype)
