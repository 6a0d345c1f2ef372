"""Convert task-vectors checkpoints to plain safetensors image-tower state dicts, safely.

The task-vectors release (mlfoundations/task_vectors, checkpoints linked from its README) has,
per model, ``zeroshot.pt`` and ``<Task>/finetuned.pt``: ``torch.save`` of whole
``src.modeling.ImageEncoder`` modules, which current open_clip cannot unpickle and which would
run code from the file if unpickled normally. This script reads them with
``pipeline.checkpoints.safe_torch_load`` (tensors rebuilt from the archive, module classes as
inert stand-ins, every other global refused) and writes open_clip ``model.visual`` state dicts:

    DST/zeroshot.safetensors, DST/<Task>.safetensors

Use them with ``backbone.experts.source=state_dict
backbone.experts.state_dict.template=DST/{task}.safetensors
backbone.experts.pretrained=DST/zeroshot.safetensors`` (or read the ``.pt`` files directly
with ``backbone.experts.source=task_vectors backbone.experts.task_vectors.root=SRC``).

    python scripts/convert_task_vectors.py SRC DST [--tasks SUN397 Cars ...] [--model-name ViT-B-32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline.compat  # noqa: E402,F401
from pipeline.checkpoints import check_visual_state, load_task_vectors_visual  # noqa: E402
from pipeline.suite import save_state  # noqa: E402

PAPER_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")


def convert(
    src: Path, dst: Path, tasks: list[str] | None = None, model_name: str | None = None
) -> dict[str, Path]:
    """Convert ``src/zeroshot.pt`` and ``src/<Task>/finetuned.pt``; returns {name: written file}.

    ``tasks`` None: every task folder of ``src`` holding a ``finetuned.pt``. ``model_name``
    (an open_clip name): check keys and shapes against that model's image tower.
    """
    src, dst = Path(src), Path(dst)
    if tasks is None:
        tasks = sorted(p.parent.name for p in src.glob("*/finetuned.pt"))
    jobs = {"zeroshot": src / "zeroshot.pt", **{t: src / t / "finetuned.pt" for t in tasks}}
    absent = [str(p) for p in jobs.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"missing task-vectors checkpoints: {absent}. Download them from the task_vectors "
            "README's link (https://drive.google.com/drive/folders/1u_Tva6x0p6oxu5Eo0ZZsf-520Cc_3MKw)"
        )
    reference = None
    if model_name:
        import open_clip

        reference = open_clip.create_model(model_name, pretrained=None).visual.state_dict()
    dst.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, path in jobs.items():
        state = load_task_vectors_visual(path)
        if reference is not None:
            state = check_visual_state(state, reference, str(path))
        out = dst / f"{name}.safetensors"
        save_state(
            out,
            state,
            {
                "source": str(path),
                "converted_by": "scripts/convert_task_vectors.py",
                "keys": "open_clip model.visual",
            },
        )
        written[name] = out
        print(f"{path} -> {out} ({len(state)} tensors)")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder with zeroshot.pt and <Task>/finetuned.pt")
    ap.add_argument("dst", type=Path, help="output folder for <name>.safetensors")
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help=f"task folders to convert (default: all present; the paper's: {' '.join(PAPER_TASKS)})",
    )
    ap.add_argument(
        "--model-name",
        default=None,
        help="open_clip model name to check the converted keys and shapes against",
    )
    args = ap.parse_args(argv)
    convert(args.src, args.dst, args.tasks, args.model_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
