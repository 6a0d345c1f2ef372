"""The FusionBench side of ``bench/bench_merging.py --part fusionbench``: run FusionBench's
own merge algorithms on state dicts written by the parent, in FusionBench's environment.

    <fusionbench venv>/bin/python bench/fusionbench_side.py IN_DIR OUT_DIR METHOD

IN_DIR holds ``pretrained.safetensors`` and ``expert_<k>.safetensors``; METHOD is
``task_arithmetic``, ``simple_average`` or ``ties`` (FusionBench's TiesMergingAlgorithm,
threshold 20, merge_func sum, scaling 0.3: its config/method/ties_merging.yaml defaults).
Writes ``OUT_DIR/<METHOD>.safetensors`` and ``OUT_DIR/<METHOD>.json`` (seconds, and the
peak RSS above the RSS before the call, read from /proc/self/status). Imports only torch,
safetensors and fusion_bench, none of this project's code.
"""

import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def rss(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def module_from_state(state: dict) -> nn.Module:
    """A module whose state_dict() is ``state`` (nested submodules named after the keys)."""
    root = nn.Module()
    for key, value in state.items():
        *path, name = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return root


def main(in_dir: Path, out_dir: Path, method: str) -> None:
    from fusion_bench.method import (
        SimpleAverageAlgorithm,
        TaskArithmeticAlgorithm,
        TiesMergingAlgorithm,
    )

    pool = {"_pretrained_": module_from_state(load_file(str(in_dir / "pretrained.safetensors")))}
    for k, f in enumerate(sorted(in_dir.glob("expert_*.safetensors"))):
        pool[f"expert_{k}"] = module_from_state(load_file(str(f)))
    algorithm = {
        "task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=0.3),
        "simple_average": lambda: SimpleAverageAlgorithm(),
        "ties": lambda: TiesMergingAlgorithm(
            scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"
        ),
    }[method]()
    if method == "simple_average":
        pool.pop("_pretrained_")
    start = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    with torch.no_grad():
        model = algorithm.run(pool)
    seconds = time.perf_counter() - t0
    peak = rss("VmHWM")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / f"{method}.safetensors"))
    result = {"seconds": seconds, "extra_peak_bytes": peak - start, "peak_bytes": peak}
    (out_dir / f"{method}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
