"""AdaMerging / AdaMerging++: coefficient application by hand, entropy descent checked with
an independent entropy computation (load_state_dict, no functional_call), the first Adam
step against finite differences, AdaMerging++ == AdaMerging on TIES-processed vectors,
save/load round trip."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import merging

N_TASKS = 3


def tiny_vit(dtype=torch.float32):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    )
    return model.visual.eval().to(dtype)


def setup_problem(dtype=torch.float32, n_images=12, seed=0):
    encoder = tiny_vit(dtype)
    g = torch.Generator().manual_seed(seed)
    pre = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = [
        {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in pre.items()}
        for _ in range(N_TASKS)
    ]
    heads = [
        F.normalize(torch.randn(4, 16, generator=g, dtype=dtype), dim=-1) for _ in range(N_TASKS)
    ]
    data = [torch.randn(n_images, 3, 16, 16, generator=g, dtype=dtype) for _ in range(N_TASKS)]
    return encoder, pre, experts, heads, data


def independent_entropy(encoder, state, heads, data, logit_scale):
    """Mean over tasks of the mean prediction entropy, with the merged weights loaded."""
    model = copy.deepcopy(encoder)
    model.load_state_dict(state)
    total = 0.0
    with torch.no_grad():
        for head, x in zip(heads, data, strict=True):
            logits = logit_scale * F.normalize(model(x), dim=-1) @ head.T
            p = logits.double().softmax(-1)
            total += float(-(p * p.log()).sum(-1).mean())
    return total / len(heads)


def float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- coefficient application


def tiny_states():
    g = torch.Generator().manual_seed(1)
    pre = {
        "a": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "n": torch.tensor([3, 4]),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
    }
    experts = [
        {
            k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in pre.items()
        }
        for _ in range(2)
    ]
    return pre, experts


def test_apply_coefficients_task_and_layer_match_hand_computation():
    pre, experts = tiny_states()
    tvs = merging.task_vectors(pre, experts)
    lam_task = torch.tensor([0.25, 0.7])
    out = merging.apply_adamerging_coefficients(pre, tvs, lam_task, "task")
    lam_layer = torch.tensor(
        [[0.1, 0.9], [0.6, 0.3]]
    )  # columns: keys "a", "b" (float keys in order)
    out_l = merging.apply_adamerging_coefficients(pre, tvs, lam_layer, "layer")
    for key, col in (("a", 0), ("b", 1)):
        for idx in range(pre[key].numel()):
            p = pre[key].reshape(-1)[idx].item()
            e = [x[key].reshape(-1)[idx].item() for x in experts]
            want_task = p + sum(float(lam_task[t]) * (e[t] - p) for t in range(2))
            want_layer = p + sum(float(lam_layer[t, col]) * (e[t] - p) for t in range(2))
            assert out[key].reshape(-1)[idx].item() == pytest.approx(want_task, abs=1e-12)
            assert out_l[key].reshape(-1)[idx].item() == pytest.approx(want_layer, abs=1e-12)
    assert torch.equal(out["n"], pre["n"]) and torch.equal(out_l["n"], pre["n"])
    # columns can be named in another order
    out_r = merging.apply_adamerging_coefficients(
        pre, tvs, lam_layer[:, [1, 0]], "layer", keys=["b", "a"]
    )
    for key in pre:
        assert torch.equal(out_r[key], out_l[key])
    with pytest.raises(ValueError, match=r"layer-wise coefficients must have shape \(2, 2\)"):
        merging.apply_adamerging_coefficients(pre, tvs, lam_task, "layer")
    with pytest.raises(ValueError, match="exactly once"):
        merging.apply_adamerging_coefficients(pre, tvs, lam_layer, "layer", keys=["a", "a"])


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_entropy_decreases_full_batch(granularity):
    encoder, pre, experts, heads, data = setup_problem()
    res = merging.adamerging(
        pre, experts, encoder, heads, data, granularity=granularity, steps=25, lr=0.02,
        batch_size=len(data[0]), logit_scale=5.0, progress=False,
    )  # fmt: skip
    keys = float_keys(pre)
    assert res.keys == keys
    assert res.coefficients.shape == ((N_TASKS,) if granularity == "task" else (N_TASKS, len(keys)))
    assert len(res.entropy_history) == 25
    start = independent_entropy(
        encoder, merging.task_arithmetic(pre, experts, 0.3), heads, data, 5.0
    )
    end = independent_entropy(encoder, res.state_dict, heads, data, 5.0)
    # full batch: the first recorded objective is the entropy at init (Task Arithmetic, 0.3)
    assert res.entropy_history[0] == pytest.approx(start, rel=1e-5)
    assert end < start - 0.05
    assert res.entropy_history[-1] < res.entropy_history[0]
    assert res.coefficients.min() >= 0 and res.coefficients.max() <= 1


def test_first_adam_step_follows_finite_difference_gradient():
    encoder, pre, experts, heads, data = setup_problem(dtype=torch.float64)
    res = merging.adamerging(
        pre, experts, encoder, heads, data, granularity="task", steps=1, lr=1e-3,
        batch_size=len(data[0]), logit_scale=5.0, progress=False,
    )  # fmt: skip
    h = 1e-4
    for t in range(N_TASKS):
        w_plus, w_minus = [0.3] * N_TASKS, [0.3] * N_TASKS
        w_plus[t] += h
        w_minus[t] -= h
        f_plus = independent_entropy(
            encoder, merging.weighted_task_arithmetic(pre, experts, w_plus), heads, data, 5.0
        )
        f_minus = independent_entropy(
            encoder, merging.weighted_task_arithmetic(pre, experts, w_minus), heads, data, 5.0
        )
        grad = (f_plus - f_minus) / (2 * h)
        assert abs(grad) > 1e-4  # a clear direction
        # Adam's first step is lr * g / (|g| + eps) = lr * sign(g)
        assert float(res.coefficients[t]) == pytest.approx(
            0.3 - 1e-3 * (1 if grad > 0 else -1), abs=1e-7
        )


def test_adamerging_pp_equals_adamerging_on_ties_processed_vectors():
    encoder, pre, experts, heads, data = setup_problem(dtype=torch.float64)
    processed = merging.ties_process(merging.task_vectors(pre, experts), density=0.3)
    processed_experts = [merging.apply(pre, v) for v in processed]
    kw = dict(
        granularity="layer", steps=6, lr=0.01, batch_size=5, logit_scale=5.0, seed=3, progress=False
    )
    pp = merging.adamerging_pp(pre, experts, encoder, heads, data, density=0.3, **kw)
    plain = merging.adamerging(pre, processed_experts, encoder, heads, data, ties=False, **kw)
    assert pp.ties and not plain.ties
    torch.testing.assert_close(pp.coefficients, plain.coefficients, atol=1e-9, rtol=0)
    for key in pre:
        torch.testing.assert_close(pp.state_dict[key], plain.state_dict[key], atol=1e-9, rtol=0)
    assert pp.entropy_history == pytest.approx(plain.entropy_history, rel=1e-9)
    # and the TIES processing matters
    unprocessed = merging.adamerging(pre, experts, encoder, heads, data, **kw)
    assert (unprocessed.coefficients - pp.coefficients).abs().max() > 1e-4


def test_saved_coefficients_reload_to_the_same_merged_model(tmp_path):
    encoder, pre, experts, heads, data = setup_problem()
    res = merging.adamerging_pp(
        pre,
        experts,
        encoder,
        heads,
        data,
        steps=3,
        lr=0.01,
        batch_size=4,
        logit_scale=5.0,
        progress=False,
    )
    path = tmp_path / "coefficients.safetensors"
    merging.save_coefficients(path, res)
    loaded = merging.load_coefficients(path)
    assert torch.equal(loaded.coefficients, res.coefficients)
    assert (
        loaded.keys == res.keys
        and loaded.granularity == "layer"
        and loaded.ties
        and loaded.density == 0.2
    )
    assert loaded.entropy_history == pytest.approx(res.entropy_history, rel=0, abs=0)
    again = merging.adamerging_pp(
        pre, experts, None, None, None, coefficients=loaded, progress=False
    )
    assert again.entropy_history == []
    for key in pre:
        assert torch.equal(again.state_dict[key], res.state_dict[key]), key
    with pytest.raises(ValueError, match="granularity='layer', ties=True"):
        merging.adamerging(pre, experts, None, None, None, coefficients=loaded)
    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bogus))
    with pytest.raises(ValueError, match="not an AdaMerging coefficients file"):
        merging.load_coefficients(bogus)


def test_coefficients_are_clamped_to_unit_interval():
    encoder, pre, experts, heads, data = setup_problem()
    res = merging.adamerging(
        pre,
        experts,
        encoder,
        heads,
        data,
        steps=3,
        lr=5.0,
        batch_size=4,
        logit_scale=5.0,
        progress=False,
    )
    c = res.coefficients
    assert c.min() >= 0 and c.max() <= 1
    assert ((c == 0) | (c == 1)).float().mean() > 0.9  # steps of 5 land on the bounds


def test_seeded_sampling_is_reproducible():
    encoder, pre, experts, heads, data = setup_problem()
    kw = dict(steps=4, lr=0.01, batch_size=3, logit_scale=5.0, progress=False)
    a = merging.adamerging(pre, experts, encoder, heads, data, seed=0, **kw)
    b = merging.adamerging(pre, experts, encoder, heads, data, seed=0, **kw)
    c = merging.adamerging(pre, experts, encoder, heads, data, seed=1, **kw)
    assert a.entropy_history == b.entropy_history
    assert torch.equal(a.coefficients, b.coefficients)
    assert a.entropy_history != c.entropy_history


class BufferedEncoder(nn.Module):
    """An encoder with a float buffer (not a parameter) and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("shift", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.norm(self.lin(x)) + self.shift


def test_buffers_and_uint8_inputs_with_prepare():
    torch.manual_seed(0)
    enc = BufferedEncoder()
    pre = {k: v.clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + torch.randn_like(v) if v.is_floating_point() else v + 5 for k, v in pre.items()}
        for _ in range(2)
    ]
    heads = [F.normalize(torch.randn(3, 4), dim=-1) for _ in range(2)]
    data = [torch.randint(0, 256, (10, 6), dtype=torch.uint8) for _ in range(2)]
    with pytest.raises(TypeError, match="pass prepare="):
        merging.adamerging(pre, experts, enc, heads, data, steps=1, progress=False)
    res = merging.adamerging(
        pre, experts, enc, heads, data, steps=15, lr=0.05, batch_size=10, logit_scale=5.0,
        prepare=lambda b: b.float() / 255.0, progress=False,
    )  # fmt: skip
    assert res.keys == float_keys(pre) and set(res.keys) == {
        "lin.weight",
        "lin.bias",
        "norm.weight",
        "norm.bias",
        "shift",
    }
    assert res.coefficients.shape == (2, 5)
    assert torch.equal(res.state_dict["calls"], pre["calls"])
    assert res.entropy_history[-1] < res.entropy_history[0]


def test_bad_inputs_are_refused_before_training():
    encoder, pre, experts, heads, data = setup_problem()
    with pytest.raises(ValueError, match="one head per expert"):
        merging.adamerging(pre, experts, encoder, heads[:2], data, progress=False)
    with pytest.raises(ValueError, match="one unlabeled set per expert"):
        merging.adamerging(pre, experts, encoder, heads, data[:1], progress=False)
    with pytest.raises(ValueError, match="granularity must be one of"):
        merging.adamerging(pre, experts, encoder, heads, data, granularity="block", progress=False)
    with pytest.raises(ValueError, match="init must be in"):
        merging.adamerging(pre, experts, encoder, heads, data, init=1.5, progress=False)
    with pytest.raises(ValueError, match="encoder has no state-dict entry 'extra'"):
        merging.adamerging(
            {**pre, "extra": torch.zeros(1)},
            [{**e, "extra": torch.zeros(1)} for e in experts],
            encoder,
            heads,
            data,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"task-wise coefficients must have shape \(3,\)"):
        merging.adamerging(
            pre, experts, None, None, None, granularity="task", coefficients=torch.zeros(2)
        )
    with pytest.raises(ValueError, match="expert 2: key 'proj' has shape"):
        merging.adamerging(
            pre, experts[:2] + [{**experts[2], "proj": torch.zeros(3)}], encoder, heads, data
        )


def test_converged_compares_consecutive_windows():
    assert not merging.adamerging_converged([3.0, 2.0, 1.0], tol=1e-3, window=2)  # too short
    assert not merging.adamerging_converged([4.0, 4.0, 2.0, 2.0], tol=0.1, window=2)  # -50%
    assert merging.adamerging_converged([2.0, 2.0, 1.99, 1.99], tol=0.01, window=2)  # -0.5%
    assert not merging.adamerging_converged([2.0, 2.0, 1.99, 1.99], tol=0.001, window=2)


def test_training_stops_when_the_entropy_has_converged():
    """A learning rate of 1e-12 leaves the entropy flat: with a tolerance the loop stops after two
    windows and reports it through the history's length; the same steps give the same model."""
    encoder, pre, experts, heads, data = setup_problem()
    kw = dict(
        granularity="task", lr=1e-12, batch_size=len(data[0]), logit_scale=5.0, progress=False
    )
    stopped = merging.adamerging(
        pre, experts, encoder, heads, data, steps=40, tol=1e-3, window=5, **kw
    )
    assert len(stopped.entropy_history) == 10
    full = merging.adamerging(pre, experts, encoder, heads, data, steps=10, **kw)
    for key in pre:
        torch.testing.assert_close(stopped.state_dict[key], full.state_dict[key], rtol=0, atol=0)
    every = merging.adamerging(pre, experts, encoder, heads, data, steps=12, tol=None, **kw)
    assert len(every.entropy_history) == 12  # no tolerance: every step
