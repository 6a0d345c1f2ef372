"""Fold a ReACT preference map into an open_clip checkpoint: one ordinary model per preference.

    python scripts/fold_checkpoint.py --stats statistics.safetensors \\
        --checkpoint merged.safetensors --model ViT-B-32 \\
        --preference 0.5,0.3,0.2 --out folded.safetensors
    python scripts/fold_checkpoint.py ... --tasks cars,dtd --preference 0.7,0.3   # by name
    python scripts/fold_checkpoint.py ... --model-config my_clip.json             # custom config

Computes W_p from the saved statistics (no images, no model forward), replaces the visual
projection proj by proj @ W_p^T, checks that the result loads strictly into the open_clip
architecture, and writes it as safetensors. A full CLIP checkpoint (``visual.*`` and the text
tower) gives a full state dict for ``open_clip.create_model(name).load_state_dict``; an
image-tower checkpoint (keys ``conv1.weight`` ... ``proj``, the pipeline's layout) gives an
image-tower state dict for ``model.visual.load_state_dict``. With ``--tasks``, tasks not
named get weight 0.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pipeline.compat  # noqa: E402,F401  (torchvision guard before open_clip)
from correction import fold, react  # noqa: E402


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--preference must be comma-separated numbers, got {text!r}") from None


def preference_vector(
    weights: list[float], stored: list[str | None], tasks: str | None
) -> list[float]:
    """p in the statistics' task order; with ``tasks``, weights are given by name."""
    if tasks is None:
        if len(weights) != len(stored):
            raise ValueError(
                f"--preference has {len(weights)} weights but the statistics hold {len(stored)} "
                f"tasks ({', '.join(str(s) for s in stored)}); give one per task or use --tasks"
            )
        return weights
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if any(s is None for s in stored):
        raise ValueError(
            "the statistics file stores no task names; give --preference in stored order"
        )
    if len(names) != len(weights):
        raise ValueError(
            f"--tasks names {len(names)} tasks but --preference has {len(weights)} weights"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks repeats a name: {names}")
    unknown = [n for n in names if n not in stored]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the statistics hold {stored}")
    by_name = dict(zip(names, weights, strict=True))
    return [by_name.get(s, 0.0) for s in stored]


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from pipeline.checkpoints import load_safetensors, load_torch_weights

    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = load_torch_weights(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse to write a model with NaN/inf weights, naming the first offending entries."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"the folded model has non-finite weights in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}); nothing was written. Check {source} and the "
            "statistics (a NaN/inf there propagates through the fold)"
        )


def build_model(name: str | None, config: Path | None) -> torch.nn.Module:
    import open_clip

    if name is not None:
        return open_clip.create_model(name, pretrained=None)
    cfg = json.loads(Path(config).read_text())
    cfg = cfg.get("model_cfg", cfg)
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"{config} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
        )
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    return cls(**cfg)


def check_architecture(state: dict, target: torch.nn.Module, args) -> None:
    """One line naming both sides when the checkpoint does not fit the model."""
    expected = target.state_dict()
    arch = f"--model {args.model}" if args.model else f"--model-config {args.model_config}"
    proj = "visual.proj" if "visual.proj" in state else "proj"
    if proj in expected and tuple(state[proj].shape) != tuple(expected[proj].shape):
        (w, d), (w2, d2) = state[proj].shape, expected[proj].shape
        raise ValueError(
            f"the checkpoint's image tower has width {w} and embedding {d}, but {arch} has "
            f"width {w2} and embedding {d2}; pass the model config of the suite that made "
            "the checkpoint (--model-config, named in the run's artifacts.json)"
        )
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        what = (
            f"{len(missing)} missing keys (first {missing[0]!r})"
            if missing
            else f"{len(extra)} unexpected keys (first {extra[0]!r})"
            if extra
            else f"{shapes[0]!r} has shape {tuple(state[shapes[0]].shape)}, "
            f"{arch} expects {tuple(expected[shapes[0]].shape)}"
        )
        raise ValueError(f"the checkpoint does not match {arch}: {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--stats", type=Path, required=True, help="statistics.safetensors (react.save_statistics)"
    )
    ap.add_argument(
        "--checkpoint", type=Path, required=True, help="base checkpoint (.safetensors or .pt)"
    )
    arch = ap.add_mutually_exclusive_group(required=True)
    arch.add_argument("--model", help="open_clip model name, e.g. ViT-B-32")
    arch.add_argument("--model-config", type=Path, help="open_clip model config JSON")
    ap.add_argument("--preference", required=True, help="comma-separated weights, e.g. 0.5,0.3,0.2")
    ap.add_argument("--tasks", help="comma-separated task names the weights refer to")
    ap.add_argument("--aggregation", default="closed_form", choices=react.AGGREGATIONS)
    ap.add_argument("--beta", type=float, default=None, help="override the statistics' beta")
    ap.add_argument("--normalize", action="store_true", help="rescale the weights to sum to 1")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors")
    args = ap.parse_args(argv)

    try:
        stats = react.load_statistics(args.stats)
        names = [s.name for s in stats]
        p = preference_vector(parse_floats(args.preference), names, args.tasks)
        if args.normalize and sum(p) > 0:
            p = [x / sum(p) for x in p]
        try:
            W = react.preference_map(
                stats,
                p,
                aggregation=args.aggregation,
                beta=args.beta,
                normalize=args.normalize,
                dtype=torch.float64,
            )
        except ValueError as e:  # the library's advice names its keyword; name the flag
            raise ValueError(str(e).replace("pass normalize=True", "pass --normalize")) from None
        state = load_checkpoint(args.checkpoint)
        full = "visual.proj" in state
        if not full and "proj" not in state:
            raise ValueError(
                f"{args.checkpoint} has neither 'visual.proj' nor 'proj'; not an open_clip ViT checkpoint"
            )
        folded = fold.fold_state_dict(state, W)
        model = build_model(args.model, args.model_config)
        target = model if full else model.visual
        check_architecture(folded, target, args)
        target.load_state_dict(folded, strict=True)
        out = {k: v.detach().contiguous() for k, v in target.state_dict().items()}
        check_finite(out, args.checkpoint)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        ap.exit(2, f"fold_checkpoint: error: {e}\n")

    from safetensors.torch import save_file

    meta = {
        "react_preference": json.dumps(
            dict(zip([str(n) for n in names], [float(x) for x in p], strict=True))
        ),
        "react_aggregation": args.aggregation,
        "react_beta": repr(stats[0].beta if args.beta is None else args.beta),
        "layout": "open_clip_full" if full else "open_clip_visual",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out), metadata=meta)
    kind = "full CLIP" if full else "image-tower (model.visual)"
    print(f"wrote {args.out}: {kind} state dict, preference {meta['react_preference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
