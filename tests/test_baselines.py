"""Baselines: Pareto Merging (zero-init identity, entropy descent checked by an independent
forward, save/load), MAP (quadratic fit recovers a known sigmoid-wrapped quadratic, the
query rule on a hand-built front, NSGA-III front), Representation Surgery (zero-init
identity, L1 descent), and all methods end to end through the Hydra entry point."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from baselines import map as map_lib
from baselines import pareto_merging as pm
from baselines import surgery

N_TASKS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_problem(seed=0, n_images=12):
    torch.manual_seed(seed)
    encoder = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    ).visual.eval()
    g = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    heads = [F.normalize(torch.randn(4, 16, generator=g), dim=-1) for _ in range(N_TASKS)]
    data = [torch.randn(n_images, 3, 16, 16, generator=g) for _ in range(N_TASKS)]
    return encoder, base, heads, data


def independent_entropies(encoder, state, heads, data, logit_scale=10.0):
    """Per-task mean prediction entropy with ``state`` loaded (no functional_call)."""
    model = copy.deepcopy(encoder)
    model.load_state_dict(state)
    out = []
    with torch.no_grad():
        for head, x in zip(heads, data, strict=True):
            q = (logit_scale * F.normalize(model(x), dim=-1) @ head.T).double().softmax(-1)
            out.append(float(-(q * q.log()).sum(-1).mean()))
    return np.array(out)


# ----------------------------------------------------------------------------- Pareto Merging
def test_pareto_merging_zero_init_is_the_base_merge():
    _, base, _, _ = tiny_problem()
    f = pm.init_factors(base, N_TASKS, rank=4, seed=0)
    assert f.keys == pm.low_rank_keys(base) and "positional_embedding" not in f.keys
    assert all(torch.count_nonzero(c) == 0 for c in f.C.values())
    for key in f.keys:  # orthonormal columns
        torch.testing.assert_close(
            f.U[key].T @ f.U[key], torch.eye(f.U[key].shape[1]), atol=1e-5, rtol=0
        )
    rng = np.random.default_rng(0)
    for p in [np.full(N_TASKS, 1 / N_TASKS), np.eye(N_TASKS)[1], rng.dirichlet(np.ones(N_TASKS))]:
        merged = pm.apply_factors(base, f, p)
        assert merged.keys() == base.keys()
        assert all(torch.equal(merged[k], base[k]) for k in base)


def test_pareto_merging_training_lowers_scalarised_entropy():
    encoder, base, heads, data = tiny_problem()
    f0 = pm.init_factors(base, N_TASKS, rank=4, seed=0)
    f1 = pm.train_factors(
        base, f0, encoder, heads, data, steps=12, lr=3e-2, batch_size=12, logit_scale=10.0, seed=0
    )
    assert len(f1.history) == 12 and all(
        torch.count_nonzero(c) == 0 for c in f0.C.values()
    )  # input untouched
    prefs = np.vstack([np.eye(N_TASKS), np.full(N_TASKS, 1 / N_TASKS)])
    before = independent_entropies(encoder, base, heads, data)
    for p in prefs:
        after = independent_entropies(encoder, pm.apply_factors(base, f1, p), heads, data)
        assert p @ after < p @ before - 1e-3, (p, before, after)
    # the update depends on the preference
    a, b = (
        pm.apply_factors(base, f1, np.eye(N_TASKS)[0]),
        pm.apply_factors(base, f1, np.eye(N_TASKS)[1]),
    )
    assert any(not torch.allclose(a[k], b[k]) for k in f1.keys)


def test_pareto_merging_factors_save_load(tmp_path):
    _, base, _, _ = tiny_problem()
    f = pm.init_factors(base, N_TASKS, rank=3, seed=1)
    f.C = {k: torch.randn_like(v) for k, v in f.C.items()}
    f.history = [1.5, 1.25]
    pm.save_factors(tmp_path / "f.safetensors", f)
    g = pm.load_factors(tmp_path / "f.safetensors")
    assert g.keys == f.keys and g.history == f.history
    p = [0.2, 0.5, 0.3]
    ma, mb = pm.apply_factors(base, f, p), pm.apply_factors(base, g, p)
    assert all(torch.equal(ma[k], mb[k]) for k in base)
    # the delta by hand: U (sum p_k C_k) V^T
    k = f.keys[0]
    want = (
        base[k].double()
        + f.U[k].double()
        @ sum(pk * f.C[k][i].double() for i, pk in enumerate(p))
        @ f.V[k].double().T
    )
    torch.testing.assert_close(ma[k], want.float())


# ----------------------------------------------------------------------------- MAP
def quadratic_by_hand(coef, c):
    """sigmoid of sum_i a_i c_i^2 + sum_{i<j} b_ij c_i c_j + sum_i d_i c_i + e (explicit loops)."""
    K = len(c)
    pairs = list(itertools.combinations(range(K), 2))
    a, b, d, e = (
        coef[:K],
        coef[K : K + len(pairs)],
        coef[K + len(pairs) : 2 * K + len(pairs)],
        coef[-1],
    )
    q = sum(a[i] * c[i] ** 2 for i in range(K)) + sum(
        b[j] * c[p] * c[r] for j, (p, r) in enumerate(pairs)
    )
    q += sum(d[i] * c[i] for i in range(K)) + e
    return 1 / (1 + np.exp(-q))


@pytest.mark.parametrize("how", ["logit", "nls"])
def test_map_fit_recovers_a_sigmoid_quadratic(how):
    K = 3
    rng = np.random.default_rng(0)
    coef = rng.normal(0, 1.0, size=(K + 1) * (K + 2) // 2)
    c = map_lib.sample_scalings(K, seed=1)
    assert c.shape == ((K + 1) * (K + 2), K) and c.min() >= 0 and c.max() <= 1
    y = np.array([quadratic_by_hand(coef, ci) for ci in c])
    np.testing.assert_allclose(map_lib.predict(coef, c), y, rtol=1e-12)
    fitted = map_lib.fit_quadratic(c, y, how=how)
    np.testing.assert_allclose(fitted, coef, atol=1e-6)
    # with noise the nonlinear fit is at least as close to the data as the logit fit
    noisy = np.clip(y + rng.normal(0, 0.02, size=y.shape), 0, 1)
    rss = {
        h: np.sum((map_lib.predict(map_lib.fit_quadratic(c, noisy, how=h), c) - noisy) ** 2)
        for h in ("logit", "nls")
    }
    assert rss["nls"] <= rss["logit"] + 1e-12


def test_map_query_rule_on_a_hand_built_front():
    scores = np.array([[0.9, 0.1], [0.6, 0.6], [0.1, 0.9]])
    prefs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.8, 0.2], [0.3, 0.7]])
    # weighted sums: [.9,.6,.1] [.5,.6,.5] [.1,.6,.9] [.74,.6,.26] [.34,.6,.66]
    assert map_lib.select(scores, prefs).tolist() == [0, 1, 2, 0, 2]


def test_map_nsga3_front_is_nondominated_and_reaches_the_extremes():
    # f_1 grows with c_1 - c_2, f_2 with c_2 - c_1: the best of each is sigmoid(3) at a corner
    K = 2
    coefs = np.zeros((K, (K + 1) * (K + 2) // 2))
    coefs[0, 3:5], coefs[1, 3:5] = [3.0, -3.0], [-3.0, 3.0]  # linear terms (after c^2 and c1c2)
    X, Fr = map_lib.pareto_front(coefs, pop_size=20, n_gen=40, seed=0)
    assert X.min() >= 0 and X.max() <= 1
    np.testing.assert_allclose(Fr, map_lib.predict(coefs, X))
    for i, j in itertools.permutations(range(len(Fr)), 2):
        assert not (np.all(Fr[j] >= Fr[i]) and np.any(Fr[j] > Fr[i] + 1e-12))
    best = 1 / (1 + np.exp(-3.0))
    assert Fr[:, 0].max() > best - 0.02 and Fr[:, 1].max() > best - 0.02
    assert (
        map_lib.das_dennis_partitions(2, 100) == 99 and map_lib.das_dennis_partitions(8, 100) == 2
    )


# ----------------------------------------------------------------------------- Surgery
def test_surgery_zero_init_is_identity_and_training_lowers_l1():
    g = torch.Generator().manual_seed(0)
    z_m = torch.randn(64, 8, generator=g)
    A, B = torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g) * 0.5
    z_e = z_m - torch.relu(z_m @ A.T) @ B.T + 0.01 * torch.randn(64, 8, generator=g)
    a0 = surgery.SurgeryAdapter(8, rank=4, seed=0)
    assert torch.equal(a0(z_m), z_m)
    before = float((z_m - z_e).abs().mean())
    a, hist = surgery.train_surgery(z_m, z_e, rank=4, steps=300, lr=1e-2, batch_size=16, seed=0)
    after = float((z_m - torch.relu(z_m @ a.down.T) @ a.up.T - z_e).abs().mean())
    assert len(hist) == 300 and after < 0.5 * before
    assert after == pytest.approx(surgery.l1_distance(a, z_m, z_e), rel=1e-6)


def test_surgery_save_load(tmp_path):
    a = surgery.SurgeryAdapter(6, rank=2, seed=3)
    with torch.no_grad():
        a.up.normal_()
    surgery.save_adapters(tmp_path / "s.safetensors", [a], ["t"])
    (b,) = surgery.load_adapters(tmp_path / "s.safetensors", ["t"])
    z = torch.randn(5, 6)
    assert torch.equal(a(z), b(z))


# ----------------------------------------------------------------------------- end to end
def test_all_methods_end_to_end_through_hydra(tmp_path):
    from hydra import compose, initialize_config_dir

    import pipeline.main as main

    overrides = [
        "experiment=compare", "suite=offline_tiny", "logger=disabled", "progress=false", "num_threads=1",
        f"paths.output_dir={tmp_path}", "preferences.simplex_step=0.5", "preferences.dirichlet_n=4",
        "preferences.pairs=[[mnist,animals]]", "preferences.pairwise_steps=3",
        "baselines.pareto_merging.steps=3", "baselines.map.n_gen=5", "baselines.map.pop_size=20",
        "baselines.surgery.steps=20",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=main.CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    methods = ["react", "pref_ta", "pareto_merging", "map", "surgery"]
    assert list(cfg.methods) + list(cfg.fixed_methods) == methods
    summary = main.run(cfg, tmp_path / "run")
    run = tmp_path / "run"
    res = pd.read_csv(run / "results.csv")
    assert set(res.method) == set(methods) and res.accuracy.between(0, 1).all()
    assert set(res[res.method == "surgery"].pref_set) == {"equal", "priority", "one_hot"}
    sur = res[res.method == "surgery"].pivot_table(
        index="pref_set", columns="task", values="accuracy"
    )
    assert (sur.nunique() == 1).all()  # not controllable: one accuracy per task
    assert set(summary["scenarios"]) == set(methods)
    assert set(summary["fronts"]) == set(methods) - {"surgery"}
    cost = pd.read_csv(run / "cost.csv")
    assert cost.method.tolist() == methods and (cost.device == "cpu").all()
    assert (
        cost.set_index("method").loc[["pareto_merging", "map", "surgery"], "forward_passes"] > 0
    ).all()
    report = (run / "report.md").read_text()
    assert all(f"| {m} (equal)" in report for m in methods)
    # a second run reads every offline stage and sweep from the cache
    main.run(cfg, tmp_path / "run2")
    events = json.loads((tmp_path / "run2" / "timings.json").read_text())["cache_events"]
    by_stage = {s: e for s, _, e in events if s in ("pareto_merging", "map", "surgery")}
    assert by_stage == {"pareto_merging": "hit", "map": "hit", "surgery": "hit"}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run2" / "results.csv"), res)
