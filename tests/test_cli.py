"""The command line as a researcher meets it: --help, user errors, runs from another folder,
and the fold workflow end to end (a run's artifacts.json -> scripts/fold_checkpoint.py -> a
checkpoint that plain open_clip loads in a process importing no project module)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import FAST

from correction import react
from pipeline import main as pm
from pipeline.cache import Cache
from pipeline.methods import METHODS, _load_baselines

ROOT = Path(__file__).resolve().parent.parent
PROJECT_MODULES = {"pipeline", "correction", "merging", "evaluation", "baselines"}
pytestmark = pytest.mark.slow


def cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``python -m pipeline.main ARGS`` from ``cwd`` (the project on PYTHONPATH, as installed)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    if "HYDRA_FULL_ERROR" not in env:
        environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.main", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=1800,  # a cold tiny suite takes a minute; a loaded shared CPU, much longer
    )


def test_help_describes_the_app_and_lists_every_merge_method_and_baseline(tmp_path):
    r = cli(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("react-merging: ReACT")
    assert "Examples:" in r.stdout
    _load_baselines()
    merges = [p.stem for p in (ROOT / "configs" / "merge").glob("*.yaml")]
    experiments = [p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")]
    header = r.stdout.split("== Configuration groups ==")[0]
    missing = [n for n in [*METHODS, *merges, *experiments] if n not in header]
    assert not missing, f"--help does not describe {missing} (configs/hydra/help/react.yaml)"
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_the_console_command_of_make_venv_runs_from_another_folder(tmp_path):
    """`make venv` (which `make demo` and `make test` run) installs the project editable, so
    `react-merging` is on the venv's PATH and runs from any folder without PYTHONPATH."""
    exe = Path(sys.executable).parent / "react-merging"
    assert exe.exists(), f"no {exe}: `make venv` (or `pip install -e .`) installs the command"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [str(exe), "--help"], cwd=tmp_path, env=environ, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("react-merging: ReACT") and not list(tmp_path.iterdir())


def test_help_into_a_pipe_closed_early_prints_no_traceback(tmp_path):
    """`react-merging --help | head -1`: the reader leaves after one line."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        f"{shlex.quote(sys.executable)} -m pipeline.main --help | head -1",
        shell=True, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.stdout.startswith("react-merging: ReACT") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "override, message, lines",
    [
        ("calibration.size=1.5", "react-merging: error: calibration.size=1.5 is a fraction", 2),
        ("methods=[react,nope]", "react-merging: error: unknown method 'nope'", 2),
        (
            "suite.finetune.weight_decay=abc",
            "react-merging: error: suite.finetune.weight_decay='abc': must be a number",
            2,
        ),
        ("no_such_key=1", "Key 'no_such_key' is not in struct", 8),  # Hydra's composition message
    ],
)
def test_user_error_is_one_message_exit_2_and_no_run_folder(tmp_path, override, message, lines):
    out = tmp_path / "out"
    r = cli([*FAST, override, f"paths.output_dir={out}"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= lines, r.stderr
    runs = out / "runs"
    assert not runs.exists() or not any(p for p in runs.rglob("*") if p.is_file()), list(
        runs.rglob("*")
    )
    assert not (out / "cache").exists()  # nothing heavy started
    assert not (tmp_path / "outputs").exists()  # never the current folder
    full = cli([*FAST, override, f"paths.output_dir={out}"], tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory) -> dict:
    """One pipeline run from a folder outside the project, outputs moved by REACT_OUTPUTS."""
    base = tmp_path_factory.mktemp("fold")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    out = base / "outputs"
    r = cli(
        [*FAST, "preferences.sets=[equal,one_hot]", "hydra.run.dir=" + str(base / "run")],
        elsewhere,
        REACT_OUTPUTS=str(out),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list(elsewhere.iterdir())  # nothing written where it was started
    log = r.stdout + r.stderr  # the first lines say where the run and the cache are
    assert f"run folder {base / 'run'}" in log and f"cache {out / 'cache'}: empty" in log
    return {"run": base / "run", "out": out}


def test_artifacts_name_the_fold_inputs_and_the_report_prints_the_command(fold_run):
    run = fold_run["run"]
    art = json.loads((run / "artifacts.json").read_text())
    assert art["schema"] == "react-merging/artifacts/v1"
    for key in ("statistics", "merged_checkpoint", "pretrained_checkpoint", "model_config"):
        assert Path(art[key]).is_file(), key
        assert Path(art[key]).is_relative_to(fold_run["out"] / "cache"), key  # the suite's own
    names = [s.name for s in react.load_statistics(art["statistics"])]
    assert names == art["tasks"]
    assert art["fold_command"] in (run / "report.md").read_text()


def test_fold_end_to_end_in_a_process_that_imports_no_project_module(fold_run, tmp_path):
    art = json.loads((fold_run["run"] / "artifacts.json").read_text())
    T = len(art["tasks"])
    p = np.arange(1, T + 1, dtype=np.float64)
    p /= p.sum()
    out = tmp_path / "folded.safetensors"
    argv = shlex.split(art["fold_command"])
    argv[argv.index("--preference") + 1] = ",".join(repr(float(x)) for x in p)
    argv[argv.index("--out") + 1] = str(out)
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the pipeline's corrected test embeddings for p, from the run's own cache
    cfg = pm.compose_config([*FAST, f"paths.cache_dir={fold_run['out'] / 'cache'}"])
    ctx = pm.prepare_context(cfg, Cache(cfg.paths.cache_dir), torch.device("cpu"))
    W = react.preference_map(react.load_statistics(art["statistics"]), p.tolist())
    images, expected = {}, {}
    for task in ctx.tasks:
        x = torch.from_numpy(np.array(ctx.suite.split(task, "test")[0]))
        images[task] = ctx.suite.preprocess(x).numpy()
        expected[task] = react.apply(W, ctx.features(ctx.merged, task, "test")).numpy()
    np.savez(tmp_path / "images.npz", **images)
    child = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, torch
        # CPU-only torch with PyPI's torchvision wheel lacks two operator schemas that
        # open_clip's import of torchvision needs (shared/notes/environment.md)
        try:
            torch.ops.torchvision.nms
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import open_clip
        from safetensors.torch import load_file
        model = open_clip.CLIP(**json.load(open({art["model_config"]!r}))).eval()
        model.visual.load_state_dict(load_file({str(out)!r}), strict=True)
        images = np.load({str(tmp_path / "images.npz")!r})
        with torch.no_grad():
            z = {{t: model.encode_image(torch.from_numpy(images[t])).numpy() for t in images}}
        np.savez({str(tmp_path / "embeddings.npz")!r}, **z)
        project = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(PROJECT_MODULES)!r}))
        print(json.dumps(project))
        """
    )
    r = subprocess.run(
        [sys.executable, "-I", "-c", child],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    got = np.load(tmp_path / "embeddings.npz")
    for task in ctx.tasks:
        scale = float(np.abs(expected[task]).max())
        np.testing.assert_allclose(got[task], expected[task], atol=1e-4 * scale, rtol=0)
