"""The regime diagnostics: the math against a second computation, and the command end to end.

Math (evaluation.diagnostics): spectra against numpy's covariance eigenvalues, the energy
dimension against a brute-force scan, overlaps against scipy's principal angles and a Monte
Carlo estimate of the chance level, gain shares against the formula written out.
Command (scripts/suite_diagnostics.py on the tiny suite, in a subprocess): the printed and
written numbers against accuracies and feature geometry recomputed here from the suite's
files, the TA lambda against a re-run of the validation search, and a rerun served by the
cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from evaluation import diagnostics as dg

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- effective dimension
def test_spectrum_matches_numpy_covariance():
    x = _rng().normal(size=(50, 6)) @ _rng(1).normal(size=(6, 6)) + 3.0
    lam = dg.covariance_spectrum(x)
    want = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(lam, want, rtol=1e-10, atol=1e-12)
    # uncentred: the second moment, where the mean (3, ..., 3) adds a large direction
    lam_u = dg.covariance_spectrum(x, centered=False)
    np.testing.assert_allclose(
        lam_u, np.sort(np.linalg.eigvalsh(x.T @ x / len(x)))[::-1], rtol=1e-10
    )
    assert lam_u[0] > 5 * lam[0]
    # weighted (task-balanced pooling): numpy's weighted covariance
    w = _rng(2).uniform(0.1, 3.0, size=len(x))
    want_w = np.linalg.eigvalsh(np.cov(x, rowvar=False, aweights=w, bias=True))
    np.testing.assert_allclose(dg.covariance_spectrum(x, weights=w), want_w[::-1], rtol=1e-10)
    # integer weights = repeated rows
    reps = np.array([1, 2, 3] * 16 + [1, 1])
    np.testing.assert_allclose(
        dg.covariance_spectrum(x, weights=reps), dg.covariance_spectrum(np.repeat(x, reps, 0))
    )
    with pytest.raises(ValueError, match="non-negative"):
        dg.covariance_spectrum(x, weights=-w)


def test_participation_ratio_known_values_and_formula():
    # exact spectrum: zero-mean orthogonal +-1 columns of a Hadamard matrix (unit variance)
    # scaled by sqrt(l): the covariance is diag(l)
    lam = np.array([4.0, 2.0, 1.0, 1.0, 0.0])
    x = scipy.linalg.hadamard(8)[:, 1:6] * np.sqrt(lam) + 7.0
    np.testing.assert_allclose(np.cov(x, rowvar=False, bias=True), np.diag(lam), atol=1e-12)
    ed = dg.effective_dimension(x)
    assert ed.participation_ratio == pytest.approx(8.0**2 / (16 + 4 + 1 + 1))
    # 90% of 8 = 7.2: 4 + 2 + 1 = 7 is not enough, four dimensions are
    assert ed.energy_dim == 4 and ed.centered and (ed.n, ed.D) == (8, 5)
    assert dg.effective_dimension(x, energy=0.75).energy_dim == 2  # 6/8 exactly
    # isotropic: PR close to D; rank one: PR 1, one dimension
    iso = _rng().normal(size=(20000, 8))
    assert dg.effective_dimension(iso).participation_ratio == pytest.approx(8, rel=0.01)
    line = np.outer(_rng().normal(size=30), [1.0, 2.0, -1.0])
    one = dg.effective_dimension(line)
    assert one.participation_ratio == pytest.approx(1.0) and one.energy_dim == 1


def test_energy_dimension_against_brute_force():
    rng = _rng(3)
    for _ in range(50):
        lam = rng.exponential(size=rng.integers(1, 12)) ** 3
        for energy in (0.5, 0.9, 0.99, 1.0):
            total = lam.sum()
            want = min(
                k
                for k in range(1, len(lam) + 1)
                if np.sort(lam)[::-1][:k].sum() >= energy * total * (1 - 1e-12)
            )
            assert dg.energy_dimension(lam, energy) == want


def test_effective_dimension_rejects_bad_input():
    with pytest.raises(ValueError, match="zero variance"):
        dg.effective_dimension(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        dg.effective_dimension(np.ones(5))
    with pytest.raises(ValueError, match="non-finite"):
        dg.effective_dimension(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="energy"):
        dg.energy_dimension([1.0, 2.0], 0.0)


# ---------------------------------------------------------------------- subspace overlaps
def test_overlap_matches_scipy_principal_angles():
    rng = _rng(4)
    for ka, kb in ((1, 1), (2, 5), (4, 3), (6, 6)):
        a = scipy.linalg.orth(rng.normal(size=(9, ka)))
        b = scipy.linalg.orth(rng.normal(size=(9, kb)))
        want = np.mean(np.cos(scipy.linalg.subspace_angles(a, b)) ** 2)
        assert dg.subspace_overlap(a, b) == pytest.approx(want, abs=1e-12)
    e = np.eye(6)
    assert dg.subspace_overlap(e[:, :2], e[:, 2:4]) == pytest.approx(0.0)
    assert dg.subspace_overlap(e[:, :2], e[:, :5]) == pytest.approx(1.0)  # contained
    assert dg.subspace_overlap(e[:, [0]], (e[:, [0]] + e[:, [1]]) / np.sqrt(2)) == pytest.approx(
        0.5
    )  # 45 degrees


def test_chance_overlap_matches_monte_carlo():
    rng = _rng(5)
    D, ka, kb = 12, 3, 5
    a = np.linalg.qr(rng.normal(size=(4000, D, ka)))[0]  # uniformly random orthonormal bases
    b = np.linalg.qr(rng.normal(size=(4000, D, kb)))[0]
    draws = np.sum((a.transpose(0, 2, 1) @ b) ** 2, axis=(1, 2)) / min(ka, kb)
    assert draws.mean() == pytest.approx(dg.chance_overlap(ka, kb, D), abs=0.01)
    assert dg.subspace_overlap(a[0], b[0]) == pytest.approx(draws[0])


def test_pairwise_overlaps_of_planted_subspaces():
    # task 0 and 1 live in the same 2-D plane, task 2 in an orthogonal 3-D one
    rng = _rng(6)
    e = np.eye(8)
    f0 = rng.normal(size=(200, 2)) * [3, 2] @ e[:2]
    f1 = rng.normal(size=(150, 2)) * [2, 3] @ e[:2] + 5.0 * e[7]  # a shared offset: centred away
    f2 = rng.normal(size=(100, 3)) * [3, 2.5, 2] @ e[2:5]
    res = dg.pairwise_overlaps([f0, f1, f2])
    assert res.dims == [2, 2, 3]
    np.testing.assert_allclose(np.diag(res.overlap), 1.0)
    assert res.overlap[0, 1] == pytest.approx(1.0) and res.overlap[1, 0] == pytest.approx(1.0)
    assert res.overlap[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert res.chance[0, 2] == pytest.approx(3 / 8)
    # the subspace is the span of the top principal directions, checked against numpy's eigh
    w, v = np.linalg.eigh(np.cov(f2, rowvar=False))
    top = v[:, np.argsort(w)[::-1][:3]]
    assert dg.subspace_overlap(dg.principal_subspace(f2, 3), top) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in D"):
        dg.pairwise_overlaps([f0, f0[:, :4]])


# ---------------------------------------------------------------------- gain share
def test_gain_share_formula():
    z, e, m = np.array([0.5, 0.2, 0.9]), np.array([0.9, 0.8, 0.9]), np.array([0.7, 0.35, 0.85])
    g = dg.gain_share(m, z, e)
    np.testing.assert_allclose(g.per_task[:2], [0.5, 0.25])
    assert np.isnan(g.per_task[2])  # no gain to keep
    assert g.average == pytest.approx((m.mean() - z.mean()) / (e.mean() - z.mean()))
    # the paper's numbers: TA 69.1, zero-shot 48.0, experts 90.5 -> about one half
    assert dg.gain_share([0.691], [0.48], [0.905]).average == pytest.approx(0.4965, abs=1e-4)
    with pytest.raises(ValueError, match="equal-length"):
        dg.gain_share([0.1, 0.2], [0.1], [0.3])


def test_head_overlaps_against_scipy_principal_angles():
    rng = np.random.default_rng(0)
    D = 12
    shared = rng.normal(size=D)  # a vector common to all classes of a task: no direction
    heads = [shared + rng.normal(size=(c, D)) for c in (4, 3, 2)]
    heads.append(heads[0] @ np.eye(D) + 5.0)  # task 0's classes shifted: the same subspace
    got = dg.head_overlaps(heads)
    assert got.dims == [3, 2, 1, 3] and got.energy == 1.0
    bases = [scipy.linalg.orth((h - h.mean(0)).T) for h in heads]
    for i in range(4):
        for j in range(4):
            cos = np.cos(scipy.linalg.subspace_angles(bases[i], bases[j]))
            assert got.overlap[i, j] == pytest.approx(np.mean(cos**2), abs=1e-9)
            assert got.chance[i, j] == pytest.approx(max(got.dims[i], got.dims[j]) / D)
    assert got.overlap[0, 3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all equal"):
        dg.head_overlaps([np.ones((3, D))])


def test_parameter_groups_partition_an_open_clip_vit():
    import open_clip  # conftest imported pipeline first (its torchvision guard)

    vit = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
        text_cfg={"context_length": 4, "vocab_size": 10, "width": 16, "heads": 1, "layers": 1},
    ).visual
    keys = [k for k, v in vit.state_dict().items() if v.is_floating_point()]
    g = dg.parameter_groups([*keys, "extra.scale"])
    kinds = ["embedding", "attention", "MLP", "block norms", "output", "other"]
    assert list(g) == [*kinds, "block 0", "block 1", "block 2"]
    # the kinds partition the keys (in their order); the blocks partition the block keys
    assert sorted(sum((g[k] for k in kinds), [])) == sorted([*keys, "extra.scale"])
    assert g["other"] == ["extra.scale"]
    assert set(g["embedding"]) == {
        "class_embedding",
        "positional_embedding",
        "conv1.weight",
        "ln_pre.weight",
        "ln_pre.bias",
    }
    assert set(g["output"]) == {"proj", "ln_post.weight", "ln_post.bias"}
    for i in range(3):
        block = [k for k in keys if k.startswith(f"transformer.resblocks.{i}.")]
        assert g[f"block {i}"] == block and len(block) == 12
    assert all(".attn." in k for k in g["attention"]) and len(g["attention"]) == 12
    assert all(".mlp." in k for k in g["MLP"]) and len(g["MLP"]) == 12
    assert all(".ln_1." in k or ".ln_2." in k for k in g["block norms"])
    assert dg.parameter_groups(keys).keys() == g.keys() - {"other"}


def test_task_vector_cosines_against_a_flat_computation():
    import torch

    g = torch.Generator().manual_seed(0)
    pre = {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(5, generator=g),
        "step": torch.tensor(3),
    }  # an integer entry: not a weight
    experts = [
        {
            k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1)
            for k, v in pre.items()
        }
        for _ in range(3)
    ]
    experts.append(dict(pre))  # a zero task vector
    got = dg.task_vector_cosines(pre, experts)
    flat = [
        np.concatenate([(e[k].double() - pre[k].double()).numpy().ravel() for k in ("w", "b")])
        for e in experts[:3]
    ]
    for i in range(3):
        for j in range(3):
            want = flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j])
            assert got[i, j] == pytest.approx(want, abs=1e-12)
    assert np.isnan(got[3]).all() and np.isnan(got[:, 3]).all()
    np_pre = {k: v.numpy() for k, v in pre.items()}  # arrays as well as tensors
    np.testing.assert_allclose(dg.task_vector_cosines(np_pre, experts[:3]), got[:3, :3])
    with pytest.raises(ValueError, match="lacks"):
        dg.task_vector_cosines(pre, [{"w": pre["w"]}])


# ---------------------------------------------------------------------- the command
SCRIPT = ROOT / "scripts" / "suite_diagnostics.py"
TINY = ["suite=offline_tiny", "logger=disabled", "progress=false", "num_threads=1"]
GRID = [0.1, 0.3, 0.5]
PAIR_GRID = [0.5, 1.0]
GROUP_GRID = [0.5, 1.0]


def _run_script(tmp: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        *TINY,
        f"paths.output_dir={tmp}",
        f"paths.cache_dir={cache}",
        "--adamerging-steps",
        "2",
        "--lambda-grid",
        "0.1:0.5:0.2",
        "--pair-grid",
        ",".join(map(str, PAIR_GRID)),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def diag(tmp_path_factory, tiny_cache):
    tmp = tmp_path_factory.mktemp("diag")
    tiny_cache(tmp / "cache")
    proc = _run_script(
        tmp,
        tmp / "cache",
        "--out",
        str(tmp / "out"),
        "--groups",
        "--group-grid",
        ",".join(map(str, GROUP_GRID)),
    )
    return tmp, proc, json.loads((tmp / "out" / "regime.json").read_text())


@pytest.fixture(scope="module")
def recomputed(diag):
    """Accuracies and features recomputed here from the built suite's files (a forward pass
    of each model written out, argmax of cosines against the heads)."""
    import torch

    import merging
    from pipeline.cache import Cache
    from pipeline.main import compose_config, load_suite

    tmp, _, _ = diag
    cfg = compose_config([*TINY, f"paths.cache_dir={tmp / 'cache'}"])
    suite = load_suite(cfg, Cache(cfg.paths.cache_dir))  # a cache hit: the script built it
    heads = suite.heads()
    visual = suite.build_visual().eval()
    mean = torch.tensor(suite.mean).view(1, 3, 1, 1)
    std = torch.tensor(suite.std).view(1, 3, 1, 1)

    def run(state, task, split):
        images, labels = suite.split(task, split)
        visual.load_state_dict(state)
        with torch.no_grad():
            z = visual((torch.from_numpy(np.array(images)).float() / 255 - mean) / std).numpy()
        h = heads[task].numpy()
        pred = np.argmax((z / np.linalg.norm(z, axis=1, keepdims=True)) @ h.T, axis=1)
        return float(np.mean(pred == labels)), z

    pre, experts = suite.pretrained_state(), suite.expert_states()
    tasks = list(cfg.suite.tasks)
    val = {
        lam: [run(merging.task_arithmetic(pre, experts, scale=lam), t, "val")[0] for t in tasks]
        for lam in GRID
    }
    best = max(GRID, key=lambda lam: np.mean(val[lam]))
    ta_state = merging.task_arithmetic(pre, experts, scale=best)
    ties_cfg = compose_config([*TINY, "merge=ties"]).merge
    ties_state = merging.ties(
        pre, experts, scale=ties_cfg.scale, density=ties_cfg.density, merge=ties_cfg.combine
    )
    out = {"tasks": tasks, "val": val, "lambda": best, "acc": {}, "feats": {}}
    out["heads"] = [heads[t].double().numpy() for t in tasks]
    for name, states in (
        ("zero-shot", [pre] * len(tasks)),
        ("experts", experts),
        ("Task Arithmetic", [ta_state] * len(tasks)),
        ("TIES", [ties_state] * len(tasks)),
    ):
        res = [run(s, t, "test") for s, t in zip(states, tasks, strict=True)]
        out["acc"][name] = [a for a, _ in res]
        out["feats"][name] = [z for _, z in res]
    # one and two task vectors: theta_0 + lambda tau_t, theta_0 + lambda (tau_a + tau_b)
    T = len(tasks)

    def weighted(idx, lam):
        return merging.weighted_task_arithmetic(
            pre, experts, [lam if t in idx else 0.0 for t in range(T)]
        )

    out["curves"] = [
        [run(weighted((t,), lam), tasks[t], "test")[0] for lam in PAIR_GRID] for t in range(T)
    ]
    out["pairs"] = {}
    for a in range(T):
        for b in range(a + 1, T):
            val = [
                np.mean([run(weighted((a, b), lam), tasks[t], "val")[0] for t in (a, b)])
                for lam in PAIR_GRID
            ]
            lam = PAIR_GRID[int(np.argmax(val))]
            test = [run(weighted((a, b), lam), tasks[t], "test")[0] for t in (a, b)]
            out["pairs"][a, b] = (lam, test)

    # task vectors on a subset of the weights: theta_0 + lambda sum_t tau_t there, theta_0 elsewhere
    def on(names, lam):
        full = merging.task_arithmetic(pre, experts, scale=lam)
        return {k: full[k] if k in names else v for k, v in pre.items()}

    floats = [k for k, v in pre.items() if v.is_floating_point()]
    mlp = {k for k in floats if ".mlp." in k}
    output = {"proj", "ln_post.weight", "ln_post.bias"}
    block0 = {k for k in floats if k.startswith("transformer.resblocks.0.")}
    out["groups"] = {}
    for row, names in (
        ("all", set(floats)),
        ("only MLP", mlp),
        ("all but output", set(floats) - output),
        ("only block 0", block0),
    ):
        val = [np.mean([run(on(names, lam), t, "val")[0] for t in tasks]) for lam in GROUP_GRID]
        lam = GROUP_GRID[int(np.argmax(val))]
        out["groups"][row] = (lam, val, [run(on(names, lam), t, "test")[0] for t in tasks])

    def flat(sd):
        return torch.cat([v.double().flatten() for v in sd.values() if v.is_floating_point()])

    taus = torch.stack([flat(e) - flat(pre) for e in experts])
    out["cosines"] = torch.nn.functional.cosine_similarity(
        taus[:, None, :], taus[None, :, :], dim=-1
    ).numpy()
    return out


@pytest.mark.slow
def test_task_vector_merges_match_a_direct_computation(diag, recomputed):
    _, proc, r = diag
    tasks, acc = recomputed["tasks"], recomputed["acc"]
    zs, ex = np.array(acc["zero-shot"]), np.array(acc["experts"])
    pr = r["pairs"]
    assert pr["grid"] == PAIR_GRID
    for t, task in enumerate(tasks):
        want = [(c - zs[t]) / (ex[t] - zs[t]) for c in recomputed["curves"][t]]
        np.testing.assert_allclose(pr["gain_curve"][task], want, atol=1e-12)
    norms, kept = [], []
    for (a, b), (lam, test) in recomputed["pairs"].items():
        assert pr["lambda"][a][b] == pr["lambda"][b][a] == lam
        norm = np.mean([test[0] / ex[a], test[1] / ex[b]])
        share = (np.mean(test) - zs[[a, b]].mean()) / (ex[[a, b]].mean() - zs[[a, b]].mean())
        assert pr["normalized_accuracy"][a][b] == pytest.approx(norm, abs=1e-12)
        assert pr["gain_kept"][b][a] == pytest.approx(share, abs=1e-9)
        norms.append(norm)
        kept.append(share)
    assert pr["mean_normalized_accuracy"] == pytest.approx(np.mean(norms))
    assert pr["mean_gain_kept"] == pytest.approx(np.mean(kept))
    np.testing.assert_allclose(r["task_vector_cosines"]["cosine"], recomputed["cosines"], atol=1e-9)
    assert "How separately the experts moved the weights" in proc.stdout
    assert "Gain curve of each task vector alone" in proc.stdout


@pytest.mark.slow
def test_parameter_group_merges_match_a_direct_computation(diag, recomputed):
    _, proc, r = diag
    pg = r["parameter_groups"]
    assert pg["grid"] == GROUP_GRID
    zs = np.array(recomputed["acc"]["zero-shot"])
    ex = np.array(recomputed["acc"]["experts"])
    for row, (lam, val, test) in recomputed["groups"].items():
        got = pg["rows"][row]
        assert got["lambda"] == lam, row
        np.testing.assert_allclose(got["val_average"], val, atol=1e-12)
        np.testing.assert_allclose(got["test"], test, atol=1e-12)
        share = (np.mean(test) - zs.mean()) / (ex.mean() - zs.mean())
        assert got["gain_kept"] == pytest.approx(share, abs=1e-9), row
    # "all" is Task Arithmetic over the group grid; every kind and block has both rows
    kinds = [g for g in pg["groups"] if not re.fullmatch(r"block \d+", g)]
    assert pg["rows"]["all"]["weights"] == sum(pg["groups"][g] for g in kinds)
    for g in pg["groups"]:
        assert {f"only {g}", f"all but {g}"} <= set(pg["rows"])
        assert (
            pg["rows"][f"only {g}"]["weights"] + pg["rows"][f"all but {g}"]["weights"]
            == (pg["rows"]["all"]["weights"])
        )
    assert "Where the interference sits" in proc.stdout


@pytest.mark.slow
def test_accuracies_match_a_direct_forward_pass(diag, recomputed):
    _, proc, r = diag
    tasks = recomputed["tasks"]
    assert r["tasks"] == tasks
    for model, acc in recomputed["acc"].items():
        for t, a in zip(tasks, acc, strict=True):
            assert r["accuracy"][model][t] == pytest.approx(a, abs=1e-12), (model, t)
        assert r["accuracy"][model]["average"] == pytest.approx(np.mean(acc), abs=1e-12)
    # the lambda search: the same grid, validation accuracies and choice
    assert r["task_arithmetic"]["grid"] == GRID
    assert r["task_arithmetic"]["lambda"] == recomputed["lambda"]
    np.testing.assert_allclose(
        r["task_arithmetic"]["val_average"], [np.mean(recomputed["val"][g]) for g in GRID]
    )
    # the printed table shows these numbers
    zs = next(line for line in proc.stdout.splitlines() if line.startswith("| zero-shot ("))
    cells = [c.strip() for c in zs.strip("|").split("|")]
    assert cells[1 : 1 + len(tasks)] == [f"{100 * a:.1f}" for a in recomputed["acc"]["zero-shot"]]
    assert (diag[0] / "out" / "regime.md").read_text() in proc.stdout


@pytest.mark.slow
def test_gain_shares_and_targets_follow_from_the_accuracies(diag):
    _, _, r = diag
    acc = r["accuracy"]
    z, e = acc["zero-shot"], acc["experts"]
    for merge in ("Task Arithmetic", "TIES", "AdaMerging"):
        m = acc[merge]
        for t in r["tasks"]:
            want = (m[t] - z[t]) / (e[t] - z[t]) if e[t] != z[t] else None
            got = r["gain_share"][merge][t]
            assert (got != got) if want is None else got == pytest.approx(want), (merge, t)
        assert r["gain_share"][merge]["average"] == pytest.approx(
            (m["average"] - z["average"]) / (e["average"] - z["average"])
        )
    ratio, share, order, expert_min = (g["value"] for g in r["targets"])
    assert ratio == pytest.approx(z["average"] / e["average"])
    assert r["targets"][0]["met"] == (0.4 <= ratio <= 0.7)
    assert r["targets"][1]["met"] == (0.3 <= share <= 0.7)
    avgs = [acc[m]["average"] for m in ("Task Arithmetic", "TIES", "AdaMerging")]
    assert order == pytest.approx(avgs) and r["targets"][2]["met"] == (avgs[0] < avgs[1] < avgs[2])
    assert expert_min == pytest.approx(min(e[t] for t in r["tasks"]))
    assert r["merges"]["AdaMerging"]["config"]["steps"] == 2


@pytest.mark.slow
def test_geometry_matches_numpy_and_scipy(diag, recomputed):
    _, _, r = diag
    tasks = recomputed["tasks"]

    def pr_and_dim(x, w=None):
        c = np.cov(x, rowvar=False, aweights=w, bias=True)
        lam = np.clip(np.sort(np.linalg.eigvalsh(c))[::-1], 0, None)
        cum = np.cumsum(lam) / lam.sum()
        return lam.sum() ** 2 / (lam**2).sum(), int(np.argmax(cum >= 0.9 - 1e-12)) + 1, c

    models = r["effective_dimension"]["models"]
    for model in ("zero-shot", "experts", "Task Arithmetic"):
        fs = recomputed["feats"][model]
        for t, f in zip(tasks, fs, strict=True):
            pr, k, _ = pr_and_dim(f.astype(np.float64))
            assert models[model][t]["participation_ratio"] == pytest.approx(pr, rel=1e-3)
            assert models[model][t]["energy_dim"] == k
        if model != "experts":
            w = np.concatenate([np.full(len(f), 1 / len(f)) for f in fs])
            pr, k, _ = pr_and_dim(np.concatenate(fs).astype(np.float64), w)
            assert models[model]["pooled"]["participation_ratio"] == pytest.approx(pr, rel=1e-3)
            assert models[model]["pooled"]["energy_dim"] == k
    # overlaps of the TA features' top-k principal subspaces, via scipy's principal angles
    so = r["subspace_overlap"]
    bases = []
    for t, f in zip(tasks, recomputed["feats"]["Task Arithmetic"], strict=True):
        _, k, c = pr_and_dim(f.astype(np.float64))
        assert so["dims"][t] == k
        w, v = np.linalg.eigh(c)
        bases.append(v[:, np.argsort(w)[::-1][:k]])
    D = r["D"]
    # the heads' subspaces: the span of each task's centred class vectors
    ho = r["head_overlap"]
    hb = [scipy.linalg.orth((h - h.mean(0)).T) for h in recomputed["heads"]]
    for i in range(len(tasks)):
        assert ho["dims"][tasks[i]] == hb[i].shape[1]
        for j in range(len(tasks)):
            cos = np.cos(scipy.linalg.subspace_angles(hb[i], hb[j]))
            assert ho["overlap"][i][j] == pytest.approx(np.mean(cos**2), abs=1e-6)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            cos = np.cos(scipy.linalg.subspace_angles(bases[i], bases[j]))
            assert so["overlap"][i][j] == pytest.approx(np.mean(cos**2), abs=1e-3)
            assert so["chance"][i][j] == pytest.approx(
                max(bases[i].shape[1], bases[j].shape[1]) / D
            )


@pytest.mark.slow
def test_rerun_is_served_by_the_cache(diag):
    tmp, _, r = diag
    proc = _run_script(tmp, tmp / "cache", "--out", str(tmp / "again"))
    again = json.loads((tmp / "again" / "regime.json").read_text())
    assert again["cache"]["computed"] == 0 and again["cache"]["hits"] > 0
    assert again["accuracy"] == r["accuracy"] and again["targets"] == r["targets"]
    assert "Targets (the paper's regime)" in proc.stdout


def test_bad_arguments_fail_before_any_work(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("suite_diagnostics", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = [*TINY, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'c'}"]
    for extra, message in (
        (["--lambda-grid", "0:1"], "start:stop:step"),
        (["--lambda-grid", "0,0.5"], "must be > 0"),
        (["merge=ties"], "fixed merges"),
        (["--energy", "1.5"], "--energy"),
        (["--pair-grid", "0,1"], "--pair-grid"),
        (["--group-grid", "0.1,0.2"], "add --groups"),
        (["--groups", "--group-grid", "0:1"], "--group-grid"),
        (["--adamerging-steps", "-1"], "--adamerging-steps"),
    ):
        with pytest.raises(SystemExit) as e:
            mod.main([*base, *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "c").exists()  # nothing built
    assert mod.parse_grid("0.05:1.0:0.05") == [round(0.05 * i, 6) for i in range(1, 21)]
    assert mod.parse_grid("0.3,0.1") == [0.1, 0.3]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make to read the Makefile")
def test_make_target_runs_this_command():
    from test_make_targets import make_command

    cmd = make_command("diagnostics", ["--fast", "seed=1"])
    assert cmd[0] == sys.executable and Path(cmd[1]).resolve() == SCRIPT
    assert cmd[2:] == ["suite=offline_tiny", "backbone=offline", "--fast", "seed=1"]
