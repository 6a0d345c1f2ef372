"""Read W&B offline run files (``run-<id>.wandb``) back, for the tests.

wandb 0.31 writes them from its Go core and ships no Python reader; the format is
LevelDB's log (32 KiB blocks of chunks: 4-byte checksum, 2-byte little-endian length,
1-byte type full/first/middle/last) after a 7-byte ``:W&B`` header, each record a
``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            out.append(buf + chunk)
    return [pb.Record.FromString(c) for c in out]


@dataclass
class OfflineRun:
    folder: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # top-level keys only
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # name, type, files
    exit_code: int | None = None


def read_run(folder: Path) -> OfflineRun:
    """One ``offline-run-*`` folder: identity, config, summary, artifacts, exit code."""
    (path,) = Path(folder).glob("run-*.wandb")
    run = OfflineRun(Path(folder))
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = r.run.display_name, r.run.run_group, r.run.job_type
            run.tags = list(r.run.tags)
            run.config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "summary":
            for u in r.summary.update:
                if u.key:
                    run.summary[u.key] = json.loads(u.value_json)
        elif kind == "artifact":
            files = [c.path for c in r.artifact.manifest.contents]
            run.artifacts.append((r.artifact.name, r.artifact.type, files))
        elif kind == "exit":
            run.exit_code = r.exit.exit_code
    return run


def read_runs(run_dir: Path) -> list[OfflineRun]:
    return [read_run(p) for p in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]
