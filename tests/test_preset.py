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
