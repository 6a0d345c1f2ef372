"""preset=fast (`make <target> FAST=1`): reduced settings, and every output says so."""

import json

import pytest
from test_make_targets import make_command
from tiny import FAST

from pipeline import main as pm


def test_fast_preset_reduces_the_protocol_and_full_is_the_default():
    full, fast = pm.compose_config([]), pm.compose_config(["preset=fast"])
    assert full.preset == "full" and fast.preset == "fast"
    assert (full.preferences.simplex_step, fast.preferences.simplex_step) == (0.1, 0.5)
    assert (full.preferences.dirichlet_n, fast.preferences.dirichlet_n) == (100, 8)
    assert full.baselines.pareto_merging.steps > fast.baselines.pareto_merging.steps
    ada = ["merge=adamerging"]
    assert pm.compose_config(ada).merge.steps == 500
    assert pm.compose_config([*ada, "preset=fast"]).merge.steps == 40


@pytest.mark.parametrize("target", ["table1", "compare", "tsne"])
def test_make_fast_passes_the_preset(target):
    assert "preset=fast" in make_command(target, [], ("SUITE=offline_tiny", "FAST=1"))
    assert "preset=fast" not in make_command(target, [])


def test_a_fast_run_labels_its_summary_and_report(tmp_path, tiny_cache):
    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config([*FAST, "preset=fast", f"paths.cache_dir={tmp_path / 'cache'}"])
    pm.run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["preset"] == "fast"
    assert "**Preset `fast`: reduced settings" in (tmp_path / "run" / "report.md").read_text()


def test_max_images_per_split_is_a_fixed_subset_under_its_own_key(tmp_path, tiny_cache):
    """preset=fast cuts every task split to 100 images (a seeded subset, the same on every
    call) and gives the suite another key, so no unit of the whole suite is reused for it."""
    import numpy as np

    from pipeline.cache import Cache
    from pipeline.suites import capped

    assert pm.compose_config(["preset=fast"]).max_images_per_split == 100
    assert pm.compose_config([]).max_images_per_split is None
    tiny_cache(tmp_path / "cache")
    cfg = pm.compose_config([*FAST, f"paths.cache_dir={tmp_path / 'cache'}"])
    suite = pm.load_suite(cfg, Cache(cfg.paths.cache_dir))
    assert capped(suite, None) is suite
    small = capped(suite, 10)
    assert small.key != suite.key and small.key == capped(suite, 10).key != capped(suite, 11).key
    for t in suite.tasks:
        for split in ("train", "val", "test"):
            x, y = suite.split(t, split)
            xs, ys = small.split(t, split)
            assert len(ys) == min(10, len(y))
            # the rows are rows of the whole split, in its order, the same on every call
            rows = {bytes(np.asarray(r).tobytes()): i for i, r in enumerate(x)}
            if len(rows) < len(x):  # a repeated image: its row is ambiguous
                continue
            idx = [rows[bytes(r.tobytes())] for r in xs]
            assert idx == sorted(idx) and np.array_equal(y[idx], ys)
            assert np.array_equal(small.split(t, split)[0], xs)
    capped = pm.compose_config(
        [*FAST, "max_images_per_split=10", f"paths.cache_dir={tmp_path / 'cache'}"]
    )
    pm.run(capped, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["max_images_per_split"] == 10 and summary["suite_key"] == small.key
