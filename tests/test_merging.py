"""Task Arithmetic, TIES, weight averaging and preference Task Arithmetic against
independent element-by-element computations on tiny state dicts."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch

import merging
from merging.ties import keep_count, kth_largest_magnitude

ties_module = importlib.import_module("merging.ties")  # the module (merging.ties is the function)

# ----------------------------------------------------------------------------- fixtures


def make_states(n_experts=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "layer.weight": torch.randn(3, 4, generator=g, dtype=dtype),
        "layer.bias": torch.randn(5, generator=g, dtype=dtype),
        "emb": torch.randn(2, 2, 2, generator=g, dtype=dtype),
        "steps": torch.tensor([7, 9], dtype=torch.int64),
    }
    experts = []
    for k in range(n_experts):
        e = {
            key: (v + torch.randn(v.shape, generator=g, dtype=dtype))
            if v.is_floating_point()
            else v + k + 1
            for key, v in pre.items()
        }
        experts.append(e)
    return pre, experts


def flat_lists(sd, keys):
    """Python floats of the given keys, in order, row-major (the test's own flattening)."""
    out = []
    for key in keys:
        out.extend(float(x) for x in sd[key].reshape(-1).tolist())
    return out


def unflatten(values, like, keys):
    out, i = {}, 0
    for key in keys:
        n = like[key].numel()
        out[key] = torch.tensor(values[i : i + n], dtype=like[key].dtype).reshape(like[key].shape)
        i += n
    return out


FLOAT_KEYS = ["layer.weight", "layer.bias", "emb"]


def assert_states_close(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def with_non_float(out, pre):
    return {key: out[key] if key in out else pre[key].clone() for key in pre}


def reference_linear(pre, experts, weights):
    """theta_0 + sum_k w_k (theta_k - theta_0), entry by entry in Python floats."""
    keys = float_keys(pre)
    p = flat_lists(pre, keys)
    es = [flat_lists(e, keys) for e in experts]
    vals = [
        p[i] + sum(w * (e[i] - p[i]) for w, e in zip(weights, es, strict=True))
        for i in range(len(p))
    ]
    return with_non_float(unflatten(vals, pre, keys), pre)


def reference_ties(
    pre, experts, scale, density, merge, keep_rule="floor_plus_one", zero_sign="majority"
):
    """TIES written out entry by entry from the rules of the original TIES code (FusionBench
    0.2.33's ``ties_merging_utils``, read, not copied), over the float tensors some expert
    changes: keep the entries with |tau| >= the (N - int(density N))-th smallest |tau|
    ("floor_plus_one"; "round": the round(density N)-th largest); elected sign = sign of
    the trimmed sum; where that is exactly 0, the sign of the sum of all elected signs
    ("majority"; "zero": nothing is kept); keep the positive values where the sign is > 0,
    else the negative ones; disjoint sum / mean."""
    keys = [
        k
        for k in float_keys(pre)
        if any(flat_lists(e, [k]) != flat_lists(pre, [k]) for e in experts)
    ]
    p = flat_lists(pre, keys)
    n = len(p)
    if keep_rule == "floor_plus_one":
        smallest_kept = n - int(n * density)  # 1-based rank, ascending, of the threshold
    else:
        smallest_kept = n - min(n, max(1, round(density * n))) + 1
    trimmed = []
    for e in experts:
        tau = [a - b for a, b in zip(flat_lists(e, keys), p, strict=True)]
        threshold = sorted(abs(v) for v in tau)[max(smallest_kept, 1) - 1]
        trimmed.append([v if abs(v) >= threshold else 0.0 for v in tau])
    signs = []
    for i in range(n):
        s = sum(t[i] for t in trimmed)
        signs.append((s > 0) - (s < 0))
    total = sum(signs)
    majority = (total > 0) - (total < 0)
    merged = []
    for i in range(n):
        column = [t[i] for t in trimmed]
        sign = signs[i]
        if sign == 0 and zero_sign == "zero":
            agree = []
        else:
            sign = sign if sign != 0 else majority
            agree = [v for v in column if (v > 0 if sign > 0 else v < 0)]
        if not agree:
            merged.append(0.0)
        elif merge == "sum":
            merged.append(sum(agree))
        else:
            merged.append(sum(agree) / len(agree))
    out = unflatten([p[i] + scale * merged[i] for i in range(n)], pre, keys)
    return {key: out[key] if key in out else pre[key].clone() for key in pre}


PAPER_LITERAL = {"keep_rule": "round", "zero_sign": "zero"}


# ----------------------------------------------------------------------------- linear merges


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_task_arithmetic_matches_elementwise(scale):
    pre, experts = make_states()
    out = merging.task_arithmetic(pre, experts, scale=scale)
    assert_states_close(out, reference_linear(pre, experts, [scale] * 3))


def test_weighted_task_arithmetic_matches_elementwise():
    pre, experts = make_states()
    w = [0.1, -0.4, 0.7]
    assert_states_close(
        merging.weighted_task_arithmetic(pre, experts, w), reference_linear(pre, experts, w)
    )


def test_preference_task_arithmetic_matches_elementwise():
    pre, experts = make_states()
    p = [0.2, 0.5, 0.3]
    out = merging.preference_task_arithmetic(pre, experts, p, scale=0.3)
    assert_states_close(out, reference_linear(pre, experts, [0.3 * 3 * pk for pk in p]))
    # p uniform is Task Arithmetic; a vertex is theta_0 + scale * T * tau_t
    uniform = merging.preference_task_arithmetic(
        pre, experts, torch.full((3,), 1 / 3, dtype=torch.float64), scale=0.3
    )
    assert_states_close(uniform, merging.task_arithmetic(pre, experts, 0.3), atol=1e-12)
    vertex = merging.preference_task_arithmetic(pre, experts, [0, 1, 0], scale=0.3)
    assert_states_close(vertex, reference_linear(pre, experts, [0.0, 0.9, 0.0]))


def test_weight_average_matches_elementwise():
    pre, experts = make_states()
    out = merging.weight_average(experts)
    es = [flat_lists(e, FLOAT_KEYS) for e in experts]
    vals = [sum(e[i] for e in es) / 3 for i in range(len(es[0]))]
    ref = unflatten(vals, pre, FLOAT_KEYS)
    for key in FLOAT_KEYS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-12, rtol=0)
    assert torch.equal(out["steps"], experts[0]["steps"])  # non-float: from expert 0


def test_task_vectors_and_apply():
    pre, experts = make_states()
    tvs = merging.task_vectors(pre, experts)
    assert [sorted(tv) for tv in tvs] == [sorted(FLOAT_KEYS)] * 3  # int buffers are left out
    for tv, e in zip(tvs, experts, strict=True):
        for key in FLOAT_KEYS:
            assert torch.equal(tv[key], e[key] - pre[key])
    out = merging.apply(pre, tvs[1], scale=0.5)
    assert_states_close(out, reference_linear(pre, experts, [0.0, 0.5, 0.0]))
    keep = copy.deepcopy(pre)
    same = merging.apply(pre, tvs[1], scale=0.5, inplace=True)
    assert same["layer.weight"] is pre["layer.weight"]  # in place on request only
    torch.testing.assert_close(
        pre["layer.weight"], keep["layer.weight"] + 0.5 * tvs[1]["layer.weight"]
    )


def test_low_precision_inputs_keep_dtype_and_accumulate_in_float32():
    pre, experts = make_states(dtype=torch.float32)
    pre16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in pre.items()}
    ex16 = [
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in e.items()}
        for e in experts
    ]
    out = merging.task_arithmetic(pre16, ex16, 0.3)
    ref = reference_linear(
        {k: v.double() if v.is_floating_point() else v for k, v in pre16.items()},
        [{k: v.double() if v.is_floating_point() else v for k, v in e.items()} for e in ex16],
        [0.3] * 3,
    )
    for key in FLOAT_KEYS:
        assert out[key].dtype == torch.bfloat16
        # one bf16 rounding of the exact result (float32 accumulation, no bf16 partial sums)
        torch.testing.assert_close(out[key], ref[key].to(torch.bfloat16), atol=0, rtol=0)


# ----------------------------------------------------------------------------- TIES


def handcrafted():
    """Two tensors, 3 tasks, chosen so every TIES case appears:
    entry 0: (+3, -1, -1) -> sign +, keeps only +3
    entry 1: (+1, +2, -4) -> sign -, keeps only -4
    entry 2: (+2, -2, 0)  -> sum 0, no value agrees -> 0
    entry 3: small values trimmed away in every task
    entry 4: (+5, +6, +0.5) -> all kept, all agree
    entry 5: (-2.5, 0, -3)
    """
    pre = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.full((2,), 10.0, dtype=torch.float64),
           "i": torch.tensor([1, 2])}  # fmt: skip
    taus = [
        [3.0, 1.0, 2.0, 0.1, 5.0, -2.5],
        [-1.0, 2.0, -2.0, -0.1, 6.0, 0.0],
        [-1.0, -4.0, 0.0, 0.2, 0.5, -3.0],
    ]
    experts = []
    for t in taus:
        experts.append({"w": torch.tensor(t[:4], dtype=torch.float64).reshape(2, 2),
                        "b": 10.0 + torch.tensor(t[4:], dtype=torch.float64), "i": torch.tensor([1, 2])})  # fmt: skip
    return pre, experts


def test_ties_handcrafted_values_paper_literal():
    pre, experts = handcrafted()
    # keep_rule "round", density 4/6: each task keeps its 4 largest magnitudes
    # task0 |.|: 3,1,2,.1,5,2.5 -> keep 5,3,2.5,2 (drops 1, .1)
    # task1: 1,2,2,.1,6,0 -> keep 6,2,2,1
    # task2: 1,4,0,.2,.5,3 -> keep 4,3,1,.5
    # trimmed: e0 (3,0,2,0,5,-2.5) e1 (-1,2,-2,0,6,0) e2 (-1,-4,0,0,.5,-3)
    # sums: 1, -2, 0, 0, 11.5, -5.5 -> signs +, -, 0, 0, +, - ("zero": entry 2 gets 0)
    out_sum = merging.ties(pre, experts, scale=1.0, density=4 / 6, merge="sum", **PAPER_LITERAL)
    expect_sum = [3.0, -4.0, 0.0, 0.0, 11.5, -5.5]
    torch.testing.assert_close(
        out_sum["w"].reshape(-1), torch.tensor(expect_sum[:4], dtype=torch.float64)
    )
    torch.testing.assert_close(
        out_sum["b"], 10.0 + torch.tensor(expect_sum[4:], dtype=torch.float64)
    )
    out_mean = merging.ties(pre, experts, scale=0.5, density=4 / 6, merge="mean", **PAPER_LITERAL)
    expect_mean = [3.0, -4.0, 0.0, 0.0, 11.5 / 3, -5.5 / 2]
    torch.testing.assert_close(
        out_mean["w"].reshape(-1), 0.5 * torch.tensor(expect_mean[:4], dtype=torch.float64)
    )
    torch.testing.assert_close(
        out_mean["b"], 10.0 + 0.5 * torch.tensor(expect_mean[4:], dtype=torch.float64)
    )
    assert torch.equal(out_sum["i"], pre["i"])
    for merge in ("sum", "mean"):
        ref = reference_ties(pre, experts, 1.0, 4 / 6, merge, **PAPER_LITERAL)
        assert_states_close(merging.ties(pre, experts, 1.0, 4 / 6, merge, **PAPER_LITERAL), ref)


def conventions_case():
    """3 tasks over "w" (6 entries) and "b" (4); "proj" (2) is the pretrained one in every
    expert (an expert family without a projection). N = 10, density 0.25:
    floor_plus_one keeps int(2.5) + 1 = 3 per task, round keeps round(2.5) = 2; counting
    "proj" (N = 12) would keep int(3) + 1 = 4."""
    taus = [
        [4.0, -3.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.25],
        [-4.0, 0.0, 0.0, 3.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 5.0, -2.0, 0.0, 3.0, 0.0, 1.0],
    ]
    pre = {
        "w": torch.zeros(2, 3, dtype=torch.float64),
        "b": torch.full((4,), 10.0, dtype=torch.float64),
        "proj": torch.tensor([0.5, -7.0], dtype=torch.float64),
    }
    experts = [
        {
            "w": torch.tensor(t[:6], dtype=torch.float64).reshape(2, 3),
            "b": 10.0 + torch.tensor(t[6:], dtype=torch.float64),
            "proj": pre["proj"].clone(),
        }
        for t in taus
    ]
    return pre, experts


def merged_values(out, pre):
    return torch.cat([out["w"].reshape(-1), out["b"] - pre["b"]]).tolist()


def test_ties_conventions_handcrafted():
    pre, experts = conventions_case()
    # floor_plus_one (3 per task): e0 (4,-3,2,0..) e1 (-4,0,0,3,0,2,0..) e2 (0,0,0,0,5,-2,0,3,0,0)
    # sums 0,-3,2,3,5,0,0,3,0,0: entries 0 (4 - 4) and 5 (2 - 2) cancel exactly; the
    # elected signs sum to 4 - 1 = 3 > 0, so "majority" merges their positive values
    cases = {
        ("floor_plus_one", "majority"): [4, -3, 2, 3, 5, 2, 0, 3, 0, 0],
        ("floor_plus_one", "zero"): [0, -3, 2, 3, 5, 0, 0, 3, 0, 0],
        # round (2 per task): e0 (4,-3,..) e1 (-4,0,0,3,..) e2 (..,5,0,0,3,0,0): entry 0 cancels
        ("round", "majority"): [4, -3, 0, 3, 5, 0, 0, 3, 0, 0],
        ("round", "zero"): [0, -3, 0, 3, 5, 0, 0, 3, 0, 0],
    }
    for (keep_rule, zero_sign), want in cases.items():
        rules = {"keep_rule": keep_rule, "zero_sign": zero_sign}
        for merge in ("sum", "mean"):  # at most one agreeing value per entry: sum == mean
            out = merging.ties(pre, experts, scale=1.0, density=0.25, merge=merge, **rules)
            assert merged_values(out, pre) == want, (rules, merge)
            assert torch.equal(out["proj"], pre["proj"])
            assert_states_close(out, reference_ties(pre, experts, 1.0, 0.25, merge, **rules))
        processed = merging.ties_process(merging.task_vectors(pre, experts), 0.25, **rules)
        total = sum(torch.cat([p["w"].reshape(-1), p["b"]]) for p in processed)
        assert total.tolist() == want, rules
        assert all(not p["proj"].any() for p in processed)
    # the defaults are the original code's conventions
    assert (
        merged_values(merging.ties(pre, experts, 1.0, 0.25), pre)
        == cases[("floor_plus_one", "majority")]
    )
    # the same family with a projection that one expert changes: N = 12, 4 kept per task
    experts[2]["proj"] = pre["proj"] + torch.tensor([0.0, 0.125], dtype=torch.float64)
    out = merging.ties(pre, experts, scale=1.0, density=0.25)
    assert merged_values(out, pre) == [4, -3, 2, 4, 5, 2, 1, 3, 0, 1]
    assert out["proj"].tolist() == [0.5, -7.0]  # 0.125 is below expert 2's threshold (1)


def test_ties_majority_sign_negative_and_zero():
    pre = {"w": torch.zeros(3, dtype=torch.float64)}
    experts = [
        {"w": torch.tensor(v, dtype=torch.float64)} for v in ([2.0, 1.0, -1.5], [-2.0, 0.0, -1.0])
    ]
    # sums 0, 1, -2.5: signs 0, +, - -> majority 0: the original selection takes the
    # negative values where the sign is not positive
    out = merging.ties(pre, experts, scale=1.0, density=1.0)
    assert out["w"].tolist() == [-2.0, 1.0, -2.5]
    experts[0]["w"][1] = -1.0  # sums 0, -1, -2.5: majority - -> -2 again; mean halves -2.5
    out = merging.ties(pre, experts, scale=1.0, density=1.0, merge="mean")
    assert out["w"].tolist() == [-2.0, -1.0, -1.25]
    flipped = [{"w": -e["w"]} for e in experts]  # majority + -> +2
    assert merging.ties(pre, flipped, scale=1.0, density=1.0)["w"].tolist() == [2.0, 1.0, 2.5]


def int_states(n_experts=4, seed=0):
    """Task vectors of small multiples of 0.5: many magnitude ties at the threshold and
    exact cancellations (float64 sums of these are exact)."""
    g = torch.Generator().manual_seed(seed)
    pre = {  # dyadic too, so that theta_k - theta_0 is exact
        "a": 0.25 * torch.randint(-8, 9, (4, 5), generator=g, dtype=torch.float64),
        "b": 0.25 * torch.randint(-8, 9, (7,), generator=g, dtype=torch.float64),
        "frozen": torch.randn(3, generator=g, dtype=torch.float64),
        "n": torch.tensor([3]),
    }
    experts = []
    for _ in range(n_experts):
        e = dict(pre)
        for key in ("a", "b"):
            e[key] = pre[key] + 0.5 * torch.randint(-3, 4, pre[key].shape, generator=g)
        experts.append(e)
    return pre, experts


@pytest.mark.parametrize("keep_rule", ["floor_plus_one", "round"])
@pytest.mark.parametrize("zero_sign", ["majority", "zero"])
@pytest.mark.parametrize("merge", ["sum", "mean"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_ties_matches_elementwise_reference(keep_rule, zero_sign, merge, density):
    rules = {"keep_rule": keep_rule, "zero_sign": zero_sign}
    pre, experts = make_states(n_experts=4, seed=3)
    out = merging.ties(pre, experts, scale=0.3, density=density, merge=merge, **rules)
    assert_states_close(out, reference_ties(pre, experts, 0.3, density, merge, **rules))
    pre, experts = int_states(seed=int(density * 20))
    out = merging.ties(pre, experts, scale=0.3, density=density, merge=merge, **rules)
    assert_states_close(out, reference_ties(pre, experts, 0.3, density, merge, **rules))
    assert torch.equal(out["frozen"], pre["frozen"])


def test_int_states_exercise_ties_and_cancellations():
    """The integer-valued cases above do contain what they are meant to test."""
    pre, experts = int_states(seed=4)
    taus = torch.stack(
        [torch.cat([(e[k] - pre[k]).reshape(-1) for k in ("a", "b")]) for e in experts]
    )
    n = taus.shape[1]
    k = keep_count(n, 0.2)
    assert k == int(0.2 * n) + 1
    kth = taus.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    assert ((taus.abs() == kth).sum(dim=1) > 1).all()  # ties at every task's threshold
    trimmed = taus * (taus.abs() >= kth)
    assert ((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).sum() > 0  # exact cancellations
    default = merging.ties(pre, experts, 0.3, 0.2)
    literal = merging.ties(pre, experts, 0.3, 0.2, **PAPER_LITERAL)
    assert not torch.equal(default["a"], literal["a"]) or not torch.equal(
        default["b"], literal["b"]
    )


def test_ties_topk_is_global_not_per_tensor():
    # task vectors: tensor "a" holds all the large values; a per-tensor top-k would keep
    # entries of "b" too.
    pre = {"a": torch.zeros(8, dtype=torch.float64), "b": torch.zeros(8, dtype=torch.float64)}
    e = {
        "a": torch.arange(10.0, 18.0, dtype=torch.float64),
        "b": torch.arange(1.0, 9.0, dtype=torch.float64),
    }
    out = merging.ties(pre, [e], scale=1.0, density=0.25)  # keep int(4) + 1 = 5 of 16
    assert torch.equal(out["a"], torch.tensor([0, 0, 0, 13.0, 14, 15, 16, 17], dtype=torch.float64))
    assert torch.equal(out["b"], torch.zeros(8, dtype=torch.float64))
    out = merging.ties(pre, [e], scale=1.0, density=0.25, keep_rule="round")  # keep 4
    assert torch.equal(out["a"], torch.tensor([0, 0, 0, 0, 14.0, 15, 16, 17], dtype=torch.float64))


def test_ties_keeps_all_entries_tied_with_the_threshold():
    pre = {"w": torch.zeros(6, dtype=torch.float64)}
    e = {"w": torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, 3.0], dtype=torch.float64)}
    out = merging.ties(pre, [e], scale=1.0, density=1 / 6)  # k = 2: threshold 2, three 2s tie
    assert torch.equal(out["w"], torch.tensor([0, -2.0, 2.0, 2.0, 0, 3.0], dtype=torch.float64))


def test_density_counts_only_tensors_with_a_task_vector():
    """An expert family without a projection (FusionBench's CLIPVisionModel experts): the
    loaders fill ``proj`` with the pretrained one, and TIES must keep int(0.2 N) + 1 of the
    entries the experts do carry, as on the state dicts without ``proj``."""
    g = torch.Generator().manual_seed(1)
    tower = {"conv": (16, 3, 4, 4), "ln.weight": (16,), "mlp": (64, 16), "proj": (16, 8)}
    pre = {k: torch.randn(s, generator=g) for k, s in tower.items()}
    experts = [
        {
            k: v if k == "proj" else v + 0.01 * torch.randn(v.shape, generator=g)
            for k, v in pre.items()
        }
        for _ in range(3)
    ]
    without = [{k: v for k, v in e.items() if k != "proj"} for e in experts]
    pre_without = {k: v for k, v in pre.items() if k != "proj"}
    n = sum(v.numel() for v in pre_without.values())
    for merge in ("sum", "mean"):
        out = merging.ties(pre, experts, 0.3, 0.2, merge)
        ref = merging.ties(pre_without, without, 0.3, 0.2, merge)
        assert all(torch.equal(out[k], ref[k]) for k in ref) and torch.equal(
            out["proj"], pre["proj"]
        )
    trimmed = merging.ties_trim(merging.task_vectors(pre, experts), 0.2)
    processed = merging.ties_process(merging.task_vectors(pre, experts), 0.2)
    processed_without = merging.ties_process(merging.task_vectors(pre_without, without), 0.2)
    for tr, pr, pw in zip(trimmed, processed, processed_without, strict=True):
        assert sum(int(torch.count_nonzero(v)) for v in tr.values()) == int(0.2 * n) + 1
        assert all(torch.equal(pr[k], pw[k]) for k in pw) and not pr["proj"].any()


def test_ties_rejects_unknown_conventions():
    pre, experts = make_states()
    with pytest.raises(ValueError, match="keep_rule must be one of"):
        merging.ties(pre, experts, keep_rule="ceil")
    with pytest.raises(ValueError, match="zero_sign must be one of"):
        merging.ties(pre, experts, zero_sign="minority")
    with pytest.raises(ValueError, match="zero_sign must be one of"):
        merging.ties_process(merging.task_vectors(pre, experts), zero_sign="minority")


def test_ties_process_and_trim():
    pre, experts = make_states(n_experts=3, seed=5)
    tvs = merging.task_vectors(pre, experts)
    n = sum(pre[k].numel() for k in FLOAT_KEYS)
    k = keep_count(n, 0.3)
    trimmed = merging.ties_trim(tvs, 0.3)
    for tv, tr in zip(tvs, trimmed, strict=True):
        values = flat_lists(tv, FLOAT_KEYS)
        top = set(sorted(range(n), key=lambda i: -abs(values[i]))[:k])
        kept = flat_lists(tr, FLOAT_KEYS)
        assert {i for i in range(n) if kept[i] != 0} == top  # random values: no ties
        assert all(kept[i] == values[i] for i in top)
    processed = merging.ties_process(tvs, 0.3)
    merged = merging.ties(pre, experts, scale=1.0, density=0.3, merge="sum")
    for key in FLOAT_KEYS:
        total = sum(p[key] for p in processed)
        torch.testing.assert_close(pre[key] + total, merged[key], atol=1e-12, rtol=0)
        stacked = torch.stack([p[key] for p in processed])
        # every processed entry is 0 or the trimmed value, and all nonzero ones share a sign
        trimmed_stack = torch.stack([t[key] for t in trimmed])
        assert torch.all((stacked == 0) | (stacked == trimmed_stack))
        assert not torch.any((stacked > 0).any(0) & (stacked < 0).any(0))


def test_ties_float32_matches_float64_reference():
    pre, experts = make_states(n_experts=3, seed=9, dtype=torch.float32)
    out = merging.ties(pre, experts, scale=0.3, density=0.2)
    ref = reference_ties(pre, experts, 0.3, 0.2, "sum")  # python floats of the float32 inputs
    for key in FLOAT_KEYS:
        torch.testing.assert_close(out[key], ref[key].to(torch.float32), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- exact k-th largest


def _parts(tensors):
    return ties_module._vector_parts(
        {str(i): t for i, t in enumerate(tensors)}, [str(i) for i in range(len(tensors))]
    )


def _direct(tensors, k):
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    return float(flat.sort(descending=True).values[k - 1])


@pytest.mark.parametrize(
    "maker",
    [
        lambda g: [
            torch.randn(3000, generator=g),
            torch.randn(40, 50, generator=g),
            torch.randn(7, generator=g),
        ],
        lambda g: [
            torch.randint(-5, 6, (4000,), generator=g).float(),
            torch.randint(-5, 6, (977,), generator=g).float(),
        ],
        lambda g: [
            torch.where(torch.rand(5000, generator=g) < 0.9, 0.0, torch.randn(5000, generator=g))
        ],
    ],
    ids=["gaussian", "integer-ties", "mostly-zero"],
)
def test_kth_largest_bracketed_selection_is_exact(maker):
    g = torch.Generator().manual_seed(0)
    tensors = maker(g)
    n = sum(t.numel() for t in tensors)
    for k in [1, 2, n // 10, n // 5, n // 2, n - 1, n]:
        got = kth_largest_magnitude(_parts(tensors), k, sample_size=512, direct_below=100)
        assert got == _direct(tensors, k), k


def test_kth_largest_gaussian_interior_k_uses_bracket(monkeypatch):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(20000, generator=g), torch.randn(100, 30, generator=g)]
    monkeypatch.setattr(ties_module, "_kth_largest_direct", lambda p, k: pytest.fail("fell back"))
    n = 23000
    for k in [n // 10, n // 5, n // 2]:
        assert kth_largest_magnitude(
            _parts(tensors), k, sample_size=2048, direct_below=1000
        ) == _direct(tensors, k)


def test_kth_largest_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest_magnitude(_parts([torch.ones(3)]), 4)


# ----------------------------------------------------------------------------- validation


def call_all(pre, experts):
    yield "task_arithmetic", lambda: merging.task_arithmetic(pre, experts, 0.3)
    yield "weighted", lambda: merging.weighted_task_arithmetic(pre, experts, [0.1] * len(experts))
    yield (
        "preference",
        lambda: merging.preference_task_arithmetic(pre, experts, [1 / len(experts)] * len(experts)),
    )
    yield "ties_sum", lambda: merging.ties(pre, experts, 0.3, 0.2, "sum")
    yield "ties_mean", lambda: merging.ties(pre, experts, 0.3, 0.2, "mean")
    yield "task_vectors", lambda: merging.task_vectors(pre, experts)


MUTATIONS = {
    "missing": (lambda e: e.pop("layer.bias"), r"expert 1: key 'layer.bias' is missing"),
    "extra": (
        lambda e: e.__setitem__("zzz.extra", torch.zeros(1)),
        r"expert 1: unexpected key 'zzz.extra'",
    ),
    "shape": (
        lambda e: e.__setitem__("emb", torch.zeros(2, 4, dtype=torch.float64)),
        r"expert 1: key 'emb' has shape \(2, 4\)",
    ),
    "dtype": (
        lambda e: e.__setitem__("emb", e["emb"].float()),
        r"expert 1: key 'emb' has dtype torch.float32",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mismatched_state_dicts_name_key_and_expert(mutation):
    pre, experts = make_states()
    mutate, pattern = MUTATIONS[mutation]
    mutate(experts[1])
    for _, fn in call_all(pre, experts):
        with pytest.raises(ValueError, match=pattern):
            fn()
    with pytest.raises(ValueError, match=pattern):  # experts checked against expert 0
        merging.weight_average(experts)


def test_bad_arguments_are_refused():
    pre, experts = make_states()
    with pytest.raises(TypeError, match="list of state dicts"):
        merging.task_arithmetic(pre, experts[0])
    with pytest.raises(ValueError, match="at least 1"):
        merging.task_arithmetic(pre, [])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        merging.task_arithmetic(pre, [{**experts[0], "emb": [1, 2]}])
    with pytest.raises(ValueError, match="density must be in"):
        merging.ties(pre, experts, density=0.0)
    with pytest.raises(ValueError, match="merge must be one of"):
        merging.ties(pre, experts, merge="max")
    with pytest.raises(ValueError, match="scale must be finite"):
        merging.task_arithmetic(pre, experts, scale=float("nan"))
    with pytest.raises(ValueError, match="p has 2 entries but there are 3 experts"):
        merging.preference_task_arithmetic(pre, experts, [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        merging.preference_task_arithmetic(pre, experts, [1.2, -0.1, -0.1])
    with pytest.raises(ValueError, match="sum to 1"):
        merging.preference_task_arithmetic(pre, experts, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="task vector 0: key 'emb' is missing"):
        merging.apply(pre, {"layer.weight": pre["layer.weight"], "layer.bias": pre["layer.bias"]})


def test_inputs_are_never_modified_and_outputs_do_not_alias_them():
    pre, experts = make_states()
    pre_copy, experts_copy = copy.deepcopy(pre), copy.deepcopy(experts)
    outputs = [fn() for _, fn in call_all(pre, experts)]
    outputs += [
        merging.weight_average(experts),
        merging.apply(pre, merging.task_vectors(pre, experts)[0]),
    ]
    outputs += [
        merging.ties_trim(merging.task_vectors(pre, experts)),
        merging.ties_process(merging.task_vectors(pre, experts)),
    ]
    assert_states_close(pre, pre_copy, atol=0)
    for e, ec in zip(experts, experts_copy, strict=True):
        assert_states_close(e, ec, atol=0)
    inputs = [t for sd in [pre, *experts] for t in sd.values()]
    for out in outputs:
        for sd in out if isinstance(out, list) else [out]:
            for t, src in itertools.product(sd.values(), inputs):
                assert t.data_ptr() != src.data_ptr()


@pytest.mark.parametrize("rules", [{}, PAPER_LITERAL])
def test_adamerging_pp_passes_the_ties_conventions(rules):
    """AdaMerging++ with all coefficients 1 is TIES "sum" at scale 1 under the same rules."""
    pre, experts = conventions_case()
    coefficients = torch.ones(len(experts))
    res = merging.adamerging(
        pre, experts, None, None, None, granularity="task", ties=True, density=0.25,
        coefficients=coefficients, progress=False,
        **{f"ties_{k}": v for k, v in rules.items()},
    )  # fmt: skip
    assert_states_close(res.state_dict, merging.ties(pre, experts, 1.0, 0.25, **rules))
