"""LOT Merging: closed forms against lstsq / hand computation, recorded layer inputs against
the layers' real outputs (out_proj included), and feature drift below Task Arithmetic on a
tiny open_clip ViT."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import merging
from merging.lot import layer_inputs, linear_closed_form, lot_units

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers


def stacked_lstsq(xs, ts):
    """Solve [X_1; ...; X_K] T^T = [X_1 T_1^T; ...] (minimum norm, SVD-based driver)."""
    a = torch.cat(xs)
    b = torch.cat([x @ t.T for x, t in zip(xs, ts, strict=True)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T


def tiny_vit():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    )
    return model.visual.eval()


def vit_problem(n_tasks=3, n_exemplars=12, noise=0.05, seed=0):
    enc = tiny_vit()
    g = torch.Generator().manual_seed(seed)
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + noise * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        for _ in range(n_tasks)
    ]
    # tasks see differently distributed images, as real tasks do
    exemplars = [
        torch.randn(n_exemplars, 3, 16, 16, generator=g) * (1 + k) + k for k in range(n_tasks)
    ]
    return enc, pre, experts, exemplars


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("rows", [[9, 7, 11], [2, 1, 3]], ids=["full-rank", "rank-deficient"])
def test_linear_closed_form_equals_stacked_lstsq(rows):
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 8, 5
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in rows]
    ts = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in rows]
    got = linear_closed_form(ts, [x.T @ x for x in xs])
    torch.testing.assert_close(got, stacked_lstsq(xs, ts), atol=1e-9, rtol=1e-9)


def test_single_linear_layer_end_to_end():
    g = torch.Generator().manual_seed(1)
    enc = nn.Linear(6, 4).double()
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pre.items()}
        for _ in range(3)
    ]
    # token-shaped exemplars (n, L, d): rows are n * L; task 1 has a rank-deficient input
    exemplars = [torch.randn(3, 2, 6, generator=g, dtype=torch.float64), torch.randn(1, 2, 6, generator=g, dtype=torch.float64),
                 torch.randn(4, 2, 6, generator=g, dtype=torch.float64)]  # fmt: skip
    out = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, batch_size=2, progress=False)
    xs = [x.reshape(-1, 6) for x in exemplars]
    ts = [e["weight"] - pre["weight"] for e in experts]
    torch.testing.assert_close(
        out["weight"] - pre["weight"], stacked_lstsq(xs, ts), atol=1e-9, rtol=1e-9
    )
    counts = [6, 2, 8]
    bias = sum(n * (e["bias"] - pre["bias"]) for n, e in zip(counts, experts, strict=True)) / 16
    torch.testing.assert_close(out["bias"] - pre["bias"], bias, atol=1e-12, rtol=0)
    scaled = merging.lot_merging(pre, experts, enc, exemplars, scale=1.5, progress=False)
    for key in pre:
        torch.testing.assert_close(
            scaled[key] - pre[key], 1.5 * (out[key] - pre[key]), atol=1e-9, rtol=0
        )


def test_layernorm_scale_and_shift_rules_hand_computed():
    g = torch.Generator().manual_seed(2)
    enc = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)).double()
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pre.items()}
        for _ in range(2)
    ]
    exemplars = [torch.randn(5, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3, 0.5, 2]),
                 torch.randn(3, 4, generator=g, dtype=torch.float64) + 2]  # fmt: skip
    out = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, progress=False)

    def normalise(row):  # by hand, per row: (x - mean) / sqrt(var + eps), biased variance
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / len(row)
        return [(v - mean) / (var + 1e-5) ** 0.5 for v in row]

    xhat = [[normalise(r) for r in x.tolist()] for x in exemplars]
    tw = [(e["0.weight"] - pre["0.weight"]).tolist() for e in experts]
    tb = [(e["0.bias"] - pre["0.bias"]).tolist() for e in experts]
    for d in range(4):
        energy = [sum(r[d] ** 2 for r in xh) for xh in xhat]
        want = sum(energy[k] * tw[k][d] for k in range(2)) / sum(energy)
        assert float(out["0.weight"][d] - pre["0.weight"][d]) == pytest.approx(want, abs=1e-9)
        want_shift = (5 * tb[0][d] + 3 * tb[1][d]) / 8
        assert float(out["0.bias"][d] - pre["0.bias"][d]) == pytest.approx(want_shift, abs=1e-12)
    # the Linear after it sees each expert's own LayerNorm output
    xs = [
        torch.tensor(xh, dtype=torch.float64) * e["0.weight"] + e["0.bias"]
        for xh, e in zip(xhat, experts, strict=True)
    ]
    ts = [e["1.weight"] - pre["1.weight"] for e in experts]
    torch.testing.assert_close(
        out["1.weight"] - pre["1.weight"], stacked_lstsq(xs, ts), atol=1e-8, rtol=1e-8
    )


# ----------------------------------------------------------------------------- recorded inputs


def test_recorded_inputs_reproduce_each_layer_output():
    enc, _, experts, exemplars = vit_problem()
    state, x = experts[1], exemplars[1][:5]
    rec = layer_inputs(enc, state, x)
    model = copy.deepcopy(enc)
    model.load_state_dict(state)
    seen = {}

    def keep(name):
        def hook(mod, args, output):
            seen[name] = (args, output)

        return hook

    blocks = model.transformer.resblocks
    for i, blk in enumerate(blocks):
        blk.attn.register_forward_hook(keep(f"attn{i}"))
        blk.ln_1.register_forward_hook(keep(f"ln1_{i}"))
        blk.ln_2.register_forward_hook(keep(f"ln2_{i}"))
        blk.mlp.c_fc.register_forward_hook(keep(f"fc{i}"))
    model.conv1.register_forward_hook(keep("conv1"))
    with torch.no_grad():
        z = model(x)
    n, tokens, width = 5, 5, 32
    for i, blk in enumerate(blocks):
        p = f"transformer.resblocks.{i}."
        # out_proj never runs as a module: its recorded input must reproduce the MHA output
        out_in = rec[p + "attn[out_proj_input]"]
        assert out_in.shape == (n * tokens, width)
        mha_out = seen[f"attn{i}"][1][0]
        torch.testing.assert_close(
            F.linear(out_in, blk.attn.out_proj.weight, blk.attn.out_proj.bias).reshape(
                n, tokens, width
            ),
            mha_out,
            atol=1e-5,
            rtol=1e-5,
        )
        for r in ("query", "key", "value"):
            torch.testing.assert_close(
                rec[p + f"attn[{r}]"], seen[f"ln1_{i}"][1].reshape(-1, width)
            )
        ln2 = rec[p + "ln_2"] * blk.ln_2.weight + blk.ln_2.bias  # normalised input, then affine
        torch.testing.assert_close(
            ln2, seen[f"ln2_{i}"][1].reshape(-1, width), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(rec[p + "mlp.c_fc"], seen[f"fc{i}"][0][0].reshape(-1, width))
    # proj: pooled @ proj is the encoder's output
    torch.testing.assert_close(rec["proj"] @ model.proj, z, atol=1e-5, rtol=1e-5)
    # conv1: unfolded patches times the reshaped kernel reproduce the convolution
    conv = rec["conv1"] @ model.conv1.weight.reshape(width, -1).T
    conv_out = seen["conv1"][1]
    torch.testing.assert_close(
        conv.reshape(n, 4, width),
        conv_out.reshape(n, width, 4).transpose(1, 2),
        atol=1e-5,
        rtol=1e-5,
    )
    # the three Q/K/V blocks are separate units of in_proj_weight
    units = [u for u in lot_units(enc) if u.key == "transformer.resblocks.0.attn.in_proj_weight"]
    assert [u.rows for u in units] == [(0, 32), (32, 64), (64, 96)]


class CrossAttention(nn.Module):
    """MHA with kdim/vdim != embed_dim (separate q/k/v projection weights)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)

    def forward(self, x):
        return self.attn(x[..., :8], x[..., 8:14], x[..., 14:19], need_weights=False)[0]


def test_cross_attention_inputs_and_query_projection():
    torch.manual_seed(3)
    enc = CrossAttention().double().eval()
    x = torch.randn(4, 3, 19, dtype=torch.float64)
    rec = layer_inputs(enc, enc.state_dict(), x)
    with torch.no_grad():
        out = enc(x)
    torch.testing.assert_close(
        F.linear(
            rec["attn[out_proj_input]"], enc.attn.out_proj.weight, enc.attn.out_proj.bias
        ).reshape(4, 3, 8),
        out,
    )
    assert rec["attn[key]"].shape == (12, 6) and rec["attn[value]"].shape == (12, 5)
    g = torch.Generator().manual_seed(4)
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pre.items()}
        for _ in range(2)
    ]
    exemplars = [torch.randn(3, 3, 19, generator=g, dtype=torch.float64) for _ in range(2)]
    merged = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, progress=False)
    for w, sl in (
        ("q_proj_weight", slice(0, 8)),
        ("k_proj_weight", slice(8, 14)),
        ("v_proj_weight", slice(14, 19)),
    ):
        xs = [ex[..., sl].reshape(-1, sl.stop - sl.start) for ex in exemplars]
        ts = [e["attn." + w] - pre["attn." + w] for e in experts]
        torch.testing.assert_close(
            merged["attn." + w] - pre["attn." + w], stacked_lstsq(xs, ts), atol=1e-8, rtol=1e-8
        )


# ----------------------------------------------------------------------------- the whole ViT


def bias_of(u, sd):
    """The bias (or norm shift) tensor acting together with unit u's weight, or 0."""
    if u.key == "proj":
        return 0.0
    key = (
        u.key.replace("in_proj_weight", "in_proj_bias")
        if "in_proj" in u.key
        else u.key[: -len("weight")] + "bias"
    )
    if key not in sd:
        return 0.0
    return sd[key][slice(*u.rows) if u.rows else slice(None)].double()


def unit_drifts(merged, pre, experts, recs, enc, with_bias=True):
    """Per unit, sum_k ||unit(X_k; merged) - unit(X_k; expert k)||^2 on expert k's inputs
    X_k (``recs[k]``); the layer's full output (weight and bias / scale and shift), or the
    weight / scale term alone (``with_bias=False``, LOT's per-unit objective)."""
    drift = {}
    units = lot_units(enc)
    for e, rec in zip(experts, recs, strict=True):
        for u in units:
            if u.kind not in ("linear", "norm_scale"):
                continue
            x = rec[u.source].double()
            ys = []
            for sd in (merged, e):
                b = bias_of(u, sd) if with_bias else 0.0
                if u.kind == "norm_scale":
                    ys.append(x * sd[u.key].double() + b)
                    continue
                w = sd[u.key].double()
                w = (
                    w.T
                    if u.layout == "in_out"
                    else w[slice(*u.rows) if u.rows else slice(None)].reshape(-1, x.shape[1])
                )
                ys.append(x @ w.T + b)
            name = u.key + (f"{list(u.rows)}" if u.rows else "")
            drift[name] = drift.get(name, 0.0) + float(((ys[0] - ys[1]) ** 2).sum())
    return drift


def test_lot_feature_drift_below_task_arithmetic_on_every_layer():
    enc, pre, experts, exemplars = vit_problem()
    lot = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, batch_size=5, progress=False)
    ta = merging.task_arithmetic(pre, experts, scale=0.3)
    mean = merging.task_arithmetic(pre, experts, scale=1 / 3)
    recs = [layer_inputs(enc, e, ex) for e, ex in zip(experts, exemplars, strict=True)]
    d_lot, d_ta = (
        unit_drifts(lot, pre, experts, recs, enc),
        unit_drifts(ta, pre, experts, recs, enc),
    )
    # conv1, ln_pre, per block (ln_1, Q, K, V, out_proj, ln_2, c_fc, c_proj), ln_post, proj
    assert len(d_lot) == 1 + 1 + 2 * 8 + 1 + 1
    for name in d_lot:
        assert d_lot[name] < d_ta[name], name
    # each unit's own term (weight / scale alone) is LOT's objective: below any other merge
    u_lot = unit_drifts(lot, pre, experts, recs, enc, with_bias=False)
    u_mean = unit_drifts(mean, pre, experts, recs, enc, with_bias=False)
    for name in u_lot:
        assert u_lot[name] < u_mean[name], name


def test_lot_linear_units_satisfy_the_normal_equations():
    """At T*, sum_k (T* - T_k) X_k^T X_k = 0, with X_k recorded independently per expert."""
    enc, pre, experts, exemplars = vit_problem(n_exemplars=6)
    lot = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, progress=False)
    recs = [layer_inputs(enc, e, ex) for e, ex in zip(experts, exemplars, strict=True)]
    for u in lot_units(enc):
        if u.kind != "linear":
            continue
        sl = slice(*u.rows) if u.rows else slice(None)

        def tv(sd, u=u, sl=sl):
            t = (sd[u.key] - pre[u.key]).double()[sl]
            return t.T if u.layout == "in_out" else t.reshape(t.shape[0], -1)

        t_star = tv(lot)
        grad = sum(
            (t_star - tv(e)) @ (r[u.source].double().T @ r[u.source].double())
            for e, r in zip(experts, recs, strict=True)
        )
        scale = sum(
            (tv(e) @ (r[u.source].double().T @ r[u.source].double())).abs().max()
            for e, r in zip(experts, recs, strict=True)
        )
        assert float(grad.abs().max()) < 1e-5 * float(scale), u


def test_other_tensors_get_the_mean_task_vector_and_batching_does_not_matter():
    enc, pre, experts, exemplars = vit_problem(n_exemplars=7)
    a = merging.lot_merging(pre, experts, enc, exemplars, scale=1.2, batch_size=3, progress=False)
    b = merging.lot_merging(pre, experts, enc, exemplars, scale=1.2, batch_size=64, progress=False)
    for key in pre:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    for key in ("class_embedding", "positional_embedding"):
        mean = sum(e[key] - pre[key] for e in experts) / 3
        torch.testing.assert_close(a[key], pre[key] + 1.2 * mean, atol=1e-6, rtol=0)


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)
        self.register_buffer("count", torch.tensor([1, 2]))

    def forward(self, x):
        return self.used(x)


def test_unreached_layer_falls_back_to_mean_and_inputs_are_untouched():
    torch.manual_seed(5)
    enc = WithUnusedLayer()
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + torch.randn_like(v) if v.is_floating_point() else v + 1 for k, v in pre.items()}
        for _ in range(2)
    ]
    exemplars = [torch.randn(6, 3), torch.randn(4, 3)]
    keep = copy.deepcopy((pre, experts, exemplars, enc.state_dict()))
    with pytest.warns(UserWarning, match="no inputs were recorded"):
        out = merging.lot_merging(pre, experts, enc, exemplars, scale=1.0, progress=False)
    for key in ("unused.weight", "unused.bias"):
        torch.testing.assert_close(
            out[key], pre[key] + (experts[0][key] + experts[1][key] - 2 * pre[key]) / 2
        )
    assert torch.equal(out["count"], pre["count"])
    for a, b in zip(keep[:3], (pre, experts, exemplars), strict=True):
        for x, y in zip(
            a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True
        ):
            for k in x if isinstance(x, dict) else range(len(x)):
                assert torch.equal(x[k], y[k])
    for k, v in enc.state_dict().items():
        assert torch.equal(v, keep[3][k])
    assert not enc.used._forward_pre_hooks and "_pool" not in enc.__dict__


def test_bad_inputs_are_refused():
    enc, pre, experts, exemplars = vit_problem(n_exemplars=2)
    with pytest.raises(ValueError, match="one exemplar set per expert"):
        merging.lot_merging(pre, experts, enc, exemplars[:2], progress=False)
    with pytest.raises(TypeError, match="pass prepare="):
        merging.lot_merging(
            pre, experts, enc, [e.to(torch.uint8) for e in exemplars], progress=False
        )
    with pytest.raises(ValueError, match="encoder has no state-dict entry 'extra'"):
        merging.lot_merging(
            {**pre, "extra": torch.zeros(1)},
            [{**e, "extra": torch.zeros(1)} for e in experts],
            enc,
            exemplars,
            progress=False,
        )
    with pytest.raises(ValueError, match="expert 0: key 'ln_pre.weight' is missing"):
        merging.lot_merging(
            pre,
            [{k: v for k, v in e.items() if k != "ln_pre.weight"} for e in experts],
            enc,
            exemplars,
        )
    with pytest.raises(ValueError, match="rcond must be >= 0"):
        merging.lot_merging(pre, experts, enc, exemplars, rcond=-1.0, progress=False)
