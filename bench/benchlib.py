"""What every benchmark script prints around its sections: the command, the machine, the load."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine(device: torch.device) -> str:
    """``<GPU> + <n>-core <CPU model>``, as far as this machine tells."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    s = f"{os.cpu_count()}-core {cpu}"
    if device.type == "cuda":
        s = f"{torch.cuda.get_device_name(device)} + {s}"
    return s


def run_sections(
    title: str,
    script: str,
    argv: list[str] | None,
    device: torch.device,
    sections: dict[str, Callable[[list[str]], None]],
    only: list[str] | None = None,
    note: str = "",
) -> None:
    """Run the chosen ``sections`` (each appends markdown lines) and print the whole report."""
    t0 = time.perf_counter()
    command = f"python {script} {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    out = [
        f"# {title}\n",
        f"Command: `{command}`  \nMachine: {machine(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average before the run {os.getloadavg()[0]:.1f}{note}\n",
    ]
    for name in only or sections:
        sections[name](out)
    out.append(f"Total benchmark time: {time.perf_counter() - t0:.0f} s.")
    print("\n".join(out))
