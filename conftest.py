import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pipeline.compat  # noqa: E402,F401  (torchvision guard before open_clip imports)


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster, and far faster on a loaded 2-core machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_SUITE = ["suite=offline_tiny", "logger=disabled", "progress=false", "num_threads=1"]
_BUILD_TINY = """
import sys
from pipeline.cache import Cache
from pipeline.main import apply_runtime, compose_config, load_suite
cfg = compose_config(sys.argv[1:])
apply_runtime(cfg)
load_suite(cfg, Cache(cfg.paths.cache_dir))
"""


@pytest.fixture(scope="session")
def tiny_suite_cache(tmp_path_factory):
    """A cache folder holding the built tiny offline suite (only its units), built once per
    test session in a subprocess and shared by the xdist workers (the cache's unit locks make
    a second builder wait, then hit). Never written by tests: take a copy (``tiny_cache``)."""
    import subprocess
    import sys
    from pathlib import Path

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one per session, not per worker
        base = base.parent
    root = base / "tiny_suite_cache"
    subprocess.run(
        [sys.executable, "-c", _BUILD_TINY, *TINY_SUITE, f"paths.cache_dir={root}"],
        cwd=Path(__file__).resolve().parent,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_suite_cache):
    """``tiny_cache(dst)``: a private copy of the built tiny suite's cache at ``dst``, for
    tests about the pipeline's own stages (a cold suite build is tested elsewhere)."""
    import shutil

    def copy(dst):
        shutil.copytree(tiny_suite_cache, dst, dirs_exist_ok=True)
        return dst

    return copy
