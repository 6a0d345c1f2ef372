"""scripts/time_targets.py: every timed run starts from a cache holding only the suite."""

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("time_targets", ROOT / "scripts/time_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_timed_run_gets_the_suite_units_only_as_hard_links(tmp_path):
    tt = _module()
    built = tmp_path / "cache"
    for stage in ("offline_expert", "offline_images", "paper8_backbone", "merge", "sweep"):
        (built / stage / "k1").mkdir(parents=True)
        (built / stage / "k1" / "manifest.json").write_text(stage)
    fresh = tmp_path / "fresh"
    (fresh / "merge" / "old").mkdir(parents=True)  # a previous target's units are dropped
    tt.suite_only_cache(built, fresh)
    assert sorted(p.name for p in fresh.iterdir()) == [
        "offline_expert",
        "offline_images",
        "paper8_backbone",
    ]
    for stage in ("offline_expert", "paper8_backbone"):
        a, b = built / stage / "k1" / "manifest.json", fresh / stage / "k1" / "manifest.json"
        assert os.stat(a).st_ino == os.stat(b).st_ino  # linked, not copied
        assert b.read_text() == stage


def test_table_reports_every_run_with_its_status_and_load():
    tt = _module()
    rows = {
        "table1": {
            "fast": {"seconds": 90, "status": "ok", "load": 1.0},
            "full": {"seconds": 1500, "status": "stopped after 25 min", "load": 2.04},
        },
        "compare": {"full": {"seconds": 600, "status": "ok", "load": 1.9, "rate": (151.2, 98.6)}},
    }
    lines = tt.table(rows, ["fast", "full"]).splitlines()
    assert lines[-2] == (
        "| `make table1` | 1.5 min (load 1.0) | 25.0 min (load 2.0) stopped after 25 min |"
    )
    assert lines[-1] == "| `make compare` |  | 10.0 min (load 1.9, matmul 151 / 99 GFLOP/s) |"


def test_matmul_rate_is_a_positive_rate():
    rate = _module().matmul_rate(bursts=3, reps=2)
    assert 0.1 < rate < 1e6
