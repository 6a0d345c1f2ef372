"""``artifacts.json``: the files of a run that outlive it, named, so nothing has to be found
in the hashed cache folders by hand.

    {schema, tasks, layout, statistics, merged_checkpoint, pretrained_checkpoint,
     model_config, fold_command}

``statistics`` (ReACT's per-task statistics, when react ran), ``merged_checkpoint`` (the
merged image tower, open_clip ``model.visual`` keys) and ``model_config`` (the suite's
open_clip config: ``open_clip.CLIP(**json.load(f))``) are absolute paths; ``fold_command``
is a ready ``scripts/fold_checkpoint.py`` command for the equal preference, also printed in
``report.md``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .cache import atomic_write_text
from .paths import PROJECT_ROOT
from .suite import Suite, write_model_config

SCHEMA = "react-merging/artifacts/v1"
FOLD_SCRIPT = PROJECT_ROOT / "scripts" / "fold_checkpoint.py"


def run_artifacts(suite: Suite, merged_path: Path, methods, run_dir: Path) -> dict:
    """The artifacts of a run; the suite's model config is written into ``run_dir`` when the
    suite's builder did not leave one beside its checkpoints (suites cached before it did)."""
    config = suite.model_config_path
    if not config.is_file():
        config = write_model_config(run_dir, suite.model_config)
    out = {
        "schema": SCHEMA,
        "tasks": list(suite.tasks),
        "layout": "open_clip_visual",  # image-tower state dicts: model.visual.load_state_dict
        "statistics": None,
        "merged_checkpoint": str(Path(merged_path).resolve()),
        "pretrained_checkpoint": str(Path(suite.pretrained_path).resolve()),
        "model_config": str(Path(config).resolve()),
    }
    for method in methods:
        out.update({k: str(Path(v).resolve()) for k, v in method.artifacts().items()})
    out["fold_command"] = fold_command(out, [1 / len(suite.tasks)] * len(suite.tasks), run_dir)
    return out


def fold_command(artifacts: dict, preference: list[float], run_dir: Path) -> str | None:
    """The command that folds ``preference`` into the merged checkpoint (None without stats)."""
    if artifacts.get("statistics") is None:
        return None
    argv = [
        sys.executable or "python",
        str(FOLD_SCRIPT),
        "--stats", artifacts["statistics"],
        "--checkpoint", artifacts["merged_checkpoint"],
        "--model-config", artifacts["model_config"],
        "--tasks", ",".join(artifacts["tasks"]),
        "--preference", ",".join(f"{p:.6g}" for p in preference),
        "--out", str(Path(run_dir).resolve() / "folded.safetensors"),
    ]  # fmt: skip
    return " ".join(shlex.quote(a) for a in argv)


def write_artifacts(run_dir: Path, artifacts: dict) -> None:
    atomic_write_text(Path(run_dir) / "artifacts.json", json.dumps(artifacts, indent=1) + "\n")


def markdown_section(artifacts: dict) -> str:
    """The report.md section naming the files and the fold command."""
    lines = ["", "## Artifacts (artifacts.json)", ""]
    for key in ("statistics", "merged_checkpoint", "model_config"):
        if artifacts.get(key):
            lines.append(f"- {key}: `{artifacts[key]}`")
    if artifacts.get("fold_command"):
        lines += [
            "",
            "One ordinary checkpoint for a preference (here equal; edit `--preference`):",
            "",
            "```bash",
            artifacts["fold_command"],
            "```",
            "",
            "Load it with `m = open_clip.CLIP(**json.load(open(model_config)))` and "
            "`m.visual.load_state_dict(safetensors.torch.load_file(out))`.",
        ]
    return "\n".join(lines) + "\n"
