"""Benchmark of the pipeline's data path; prints markdown (results: bench/results_pipeline.md).

    python bench/bench_pipeline.py                    # all sections, sizes by device (auto)
    python bench/bench_pipeline.py --only features --device cuda
    python bench/bench_pipeline.py --only stage --calib-fraction 0.1 --maps 1000
    python bench/bench_pipeline.py --only cache --repeats 5

1. ``features``: images/s of ``pipeline.features.extract_features`` (memory-mapped uint8 cache
   at the model's resolution, normalised on the device, bf16 autocast on CUDA) against a plain
   loop without any cache: each batch decodes JPEG files with PIL, applies open_clip's own
   eval preprocess (resize, crop, to-tensor, normalise) and runs an fp32 forward. Both on the
   same random-weight open_clip model, alternated in one process (median of ``--repeats``).
   CUDA: ViT-B/32, B/16, L/14; CPU: ViT-B/32 only, few images.
2. ``stage``: the whole preference-aware stage of ReACT through the pipeline's own code
   (``Context.features`` into a fresh ``Cache``, ``ReACT.fit``, ``ReACT.maps``): calibration
   features of the merged model and of each of the 8 experts on ``--calib-fraction`` of each
   paper task's test-split size (random uint8 images, random ViT weights; experts = pretrained
   + small random task vectors, merged = Task Arithmetic), the statistics, and ``--maps``
   preference maps. On CPU the defaults are scaled down (see the printed settings).
3. ``cache``: the overhead of the stage cache's checksums and locks on a warm run of the
   offline suite (``pipeline.main.run`` with every unit cached in ``--cache``): the same run
   with ``Cache(verify=True, lock=True)`` (the default) and ``Cache(verify=False,
   lock=False)``, alternated in one process, median of ``--repeats``. Also the time spent in
   ``file_sha256`` (wrapped) as a fraction of the verified run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from benchlib import run_sections  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)

PAPER_TEST_SIZES = {  # pipeline/suites/paper8_tasks.json test_size
    "SUN397": 19887,
    "Cars": 8041,
    "RESISC45": 6300,
    "EuroSAT": 2700,
    "SVHN": 26032,
    "GTSRB": 12630,
    "MNIST": 10000,
    "DTD": 1880,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ 1. features
def _source_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEG files, 320x256, smooth random content plus noise (so JPEG decoding costs about
    what a photo costs, unlike pure noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((320, 256), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def _uint8_cache(paths: list[Path], size: int, folder: Path) -> tuple[np.ndarray, float]:
    """The pipeline's layout: decoded and resized once, saved as .npy, memory-mapped."""
    from PIL import Image

    from pipeline.suite import preprocess_pil

    t = time.perf_counter()
    arr = np.stack([preprocess_pil(Image.open(p), size) for p in paths])
    np.save(folder / "images.npy", arr)
    return np.load(folder / "images.npy", mmap_mode="r"), time.perf_counter() - t


@torch.no_grad()
def plain_loop(visual, preprocess, paths: list[Path], batch_size: int, device) -> torch.Tensor:
    """No cache: decode + open_clip preprocess per batch, fp32 forward."""
    from PIL import Image

    visual = visual.to(device).eval()
    out = []
    for s in range(0, len(paths), batch_size):
        x = torch.stack([preprocess(Image.open(p)) for p in paths[s : s + batch_size]])
        out.append(visual(x.to(device)).float().cpu())
    return torch.cat(out)


def bench_features(args, device, out: list[str]) -> None:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from pipeline.features import extract_features

    cuda = device.type == "cuda"
    models = args.models or (["ViT-B-32", "ViT-B-16", "ViT-L-14"] if cuda else ["ViT-B-32"])
    n = args.images or (2048 if cuda else 64)
    bs = args.batch_size or (256 if cuda else 32)
    out.append("## 1. Feature extraction: uint8 cache + extract_features vs a plain fp32 loop\n")
    out.append(
        f"{n} images (JPEG 320x256 on disk), batch {bs}, random open_clip weights, {device.type}"
        + (
            ", extract_features with bf16 autocast"
            if cuda
            else " (CPU: fp32 both; ViT-B/32 only, few images)"
        )
        + f"; median of {args.repeats}, alternated, after one untimed warm-up batch each. "
        "Plain loop: PIL decode + open_clip's eval preprocess per batch, fp32 forward, no cache, "
        "no DataLoader workers. Cache build: decode + resize once into a .npy (one-time cost, "
        "amortised over every model and run).\n"
    )
    out.append(
        "| model | images | extract_features img/s | plain loop img/s | speed-up | cache build s (one-time) |"
    )
    out.append("|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        paths = _source_images(tmp / "src", n)
        for name in models:
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
            visual = model.visual.eval()
            size = (
                visual.image_size[0]
                if isinstance(visual.image_size, (tuple, list))
                else visual.image_size
            )
            (tmp / name).mkdir()
            cache, build_s = _uint8_cache(paths, int(size), tmp / name)

            def ours(k=None, visual=visual, cache=cache):
                idx = np.arange(len(cache) if k is None else k)
                return extract_features(
                    visual,
                    cache,
                    OPENAI_DATASET_MEAN,
                    OPENAI_DATASET_STD,
                    indices=idx,
                    batch_size=bs,
                    device=device,
                    autocast=True,
                    num_workers=4
                    if device.type == "cuda"
                    else 0,  # as the pipeline (feature_workers)
                )

            def plain(k=None, visual=visual, preprocess=preprocess):
                return plain_loop(visual, preprocess, paths if k is None else paths[:k], bs, device)

            ours(min(bs, n))  # warm-up
            plain(min(bs, n))
            t_ours, t_plain = [], []
            for r in range(args.repeats):
                for which in (0, 1) if r % 2 == 0 else (1, 0):
                    sync(device)
                    t = time.perf_counter()
                    z = ours() if which == 0 else plain()
                    sync(device)
                    (t_ours if which == 0 else t_plain).append(time.perf_counter() - t)
                    assert z.shape[0] == n and torch.isfinite(z).all()
            a, b = n / statistics.median(t_ours), n / statistics.median(t_plain)
            out.append(f"| {name} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {build_s:.2f} |")
            print(out[-1], file=sys.stderr, flush=True)
            del model, visual
            if cuda:
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ 2. stage
def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipeline.main import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _synthetic_suite(folder: Path, model_name: str, counts: dict[str, int], seed: int = 0):
    """A suite in the pipeline's layout: random ViT weights, experts = pretrained + small random
    task vectors, random uint8 test images (only the calibration images: calibration.size=1.0)."""
    import open_clip
    from safetensors.torch import save_file

    from pipeline.suite import Suite, save_state, write_split

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    visual = open_clip.create_model(model_name, pretrained=None).visual
    size = (
        visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    )
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    save_state(folder / "pretrained.safetensors", pre)
    g = torch.Generator().manual_seed(seed)
    expert_paths, data_dirs = {}, {}
    rng = np.random.default_rng(seed)
    for t, n in counts.items():
        tau_scale = 1e-3
        state = {
            k: (v + tau_scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in pre.items()
        }
        expert_paths[t] = folder / f"expert_{t}.safetensors"
        save_state(expert_paths[t], state)
        del state
        d = folder / "data" / t / "test"
        write_split(
            d,
            rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8),
            np.zeros(n, dtype=np.int64),
        )
        data_dirs[t] = {"test": d}
    dim = int(visual.output_dim)
    save_file(
        {t: torch.nn.functional.normalize(torch.randn(10, dim), dim=-1) for t in counts},
        str(folder / "heads.safetensors"),
    )
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return Suite(
        name="bench",
        tasks=list(counts),
        classnames={t: [str(i) for i in range(10)] for t in counts},
        model_config={"model_name": model_name},
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        logit_scale=100.0,
        pretrained_path=folder / "pretrained.safetensors",
        expert_paths=expert_paths,
        heads_path=folder / "heads.safetensors",
        data_dirs=data_dirs,
        key=f"bench-{model_name}-{seed}",
    )


def bench_stage(args, device, out: list[str]) -> None:
    import merging
    from pipeline.cache import Cache
    from pipeline.methods import ReACT
    from pipeline.stages import Context, ModelRef

    cuda = device.type == "cuda"
    frac = args.calib_fraction if args.calib_fraction is not None else (0.10 if cuda else 0.001)
    n_maps = args.maps if args.maps is not None else (1000 if cuda else 200)
    model_name = args.stage_model
    counts = {t: max(1, round(frac * n)) for t, n in PAPER_TEST_SIZES.items()}
    scaled = not cuda and (frac < 0.1 or n_maps < 1000)
    out.append("## 2. The preference-aware stage (ReACT), end to end through the pipeline's code\n")
    out.append(
        f"{'**Scaled down (CPU)**: ' if scaled else ''}{model_name} random weights, 8 tasks, calibration = "
        f"{100 * frac:g}% of each paper test split ({sum(counts.values())} images: "
        + ", ".join(f"{t} {c}" for t, c in counts.items())
        + f"), merged + 8 experts -> {2 * sum(counts.values())} forward passes, batch_size from "
        f"configs/config.yaml, {device.type}{' bf16 autocast' if cuda else ' fp32'}; {n_maps} Dirichlet(1) "
        "preference maps (closed_form, beta 0.1, float64 solve, float32 output). Fresh cache "
        "folder (nothing is a hit); features include writing them to the cache (sha256 + fsync); "
        "statistics = ReACT.fit with the features cached (loading them, Gram/cross/Procrustes, saving).\n"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    try:
        t = time.perf_counter()
        suite = _synthetic_suite(tmp / "suite", model_name, counts)
        setup_s = time.perf_counter() - t
        cfg = _compose(
            ["calibration.size=1.0", "progress=false", "logger=disabled", f"device={device.type}"]
        )
        ctx = Context(cfg, Cache(tmp / "cache"), suite, device, progress=False)
        ctx.calibration = {t: np.arange(n) for t, n in counts.items()}
        merged = merging.task_arithmetic(suite.pretrained_state(), suite.expert_states(), scale=0.3)
        ctx.merged = ModelRef("merged:bench", "merged", lambda: merged)
        times = {}
        sync(device)
        t = time.perf_counter()
        for task in suite.tasks:
            ctx.features(ctx.merged, task, "test", ctx.calibration[task])
            ctx.features(ctx.expert_ref(task), task, "test", ctx.calibration[task])
        sync(device)
        times["features (merged + experts)"] = time.perf_counter() - t
        # how much of the features time is loading weights (each Context.features call loads
        # its model's state dict into the shared tower): the same 16 loads, timed alone
        sync(device)
        t = time.perf_counter()
        for task in suite.tasks:
            ctx.visual().load_state_dict(ctx.merged.state())
            ctx.visual().load_state_dict(ctx.expert_ref(task).state())
        sync(device)
        load_s = time.perf_counter() - t
        method = ReACT(cfg.correction)
        t = time.perf_counter()
        method.fit(ctx)
        times["statistics"] = time.perf_counter() - t
        prefs = np.random.default_rng(0).dirichlet(np.ones(len(suite.tasks)), size=n_maps)
        method.maps(prefs[:2])  # warm-up
        t = time.perf_counter()
        W = method.maps(prefs)
        times[f"{n_maps} preference maps"] = time.perf_counter() - t
        assert W.shape[0] == n_maps and torch.isfinite(W).all()
        total = sum(times.values())
        n_fwd = 2 * sum(counts.values())
        out.append("| part | seconds | share | rate |")
        out.append("|---|---|---|---|")
        rates = {
            "features (merged + experts)": f"{n_fwd / times['features (merged + experts)']:.1f} img/s",
            "statistics": f"{len(suite.tasks) / times['statistics']:.2f} tasks/s",
            f"{n_maps} preference maps": f"{n_maps / times[f'{n_maps} preference maps']:.1f} maps/s (D = {W.shape[-1]})",
        }
        for k, v in times.items():
            out.append(f"| {k} | {v:.2f} | {100 * v / total:.0f}% | {rates[k]} |")
        out.append(f"| **total** | **{total:.2f}** | 100% | |")
        out.append(
            f"\nOf the features time, loading the 16 state dicts into the tower (timed alone afterwards, "
            f"files in the page cache): {load_s:.2f} s."
        )
        out.append(
            f"\n(Set-up, not timed: writing the synthetic suite {setup_s:.1f} s.) "
            f"Maps are computed where the statistics live (CPU tensors), as the pipeline does.\n"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ 3. cache
def bench_cache(args, device, out: list[str]) -> None:
    import pipeline.cache as pc
    import pipeline.main as pm

    cache_dir = Path(args.cache).resolve()
    cfg = _compose(
        [
            "logger=disabled",
            "progress=false",
            f"paths.cache_dir={cache_dir}",
            f"device={device.type}",
            *args.overrides,
        ]
    )
    hashed = {"seconds": 0.0, "bytes": 0, "files": 0}
    original_sha = pc.file_sha256

    def timed_sha(path, *a, **k):
        t = time.perf_counter()
        try:
            return original_sha(path, *a, **k)
        finally:
            hashed["seconds"] += time.perf_counter() - t
            hashed["bytes"] += Path(path).stat().st_size
            hashed["files"] += 1

    original_cache = pm.Cache
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    units: list[int] = []

    def one(on: bool, i: int) -> float:
        pm.Cache = functools.partial(original_cache, verify=on, lock=on)
        run_dir = tmp / f"run-{i}-{int(on)}"
        t = time.perf_counter()
        pm.run(cfg, run_dir)
        dt = time.perf_counter() - t
        events = json.loads((run_dir / "timings.json").read_text())["cache_events"]
        units.append(len(events))
        computed = [e for e in events if e[2] != "hit"]
        if computed:
            raise SystemExit(
                f"the run was not warm: {len(computed)} units computed ({computed[:3]}); "
                f"build the cache first: python -m pipeline.main paths.cache_dir={cache_dir}"
            )
        shutil.rmtree(run_dir, ignore_errors=True)
        return dt

    try:
        pc.file_sha256 = timed_sha
        one(True, -1)  # warm-up: imports, page cache, and the warm check
        hashed.update(seconds=0.0, bytes=0, files=0)
        on, off = [], []
        for r in range(args.repeats):
            for flag in (True, False) if r % 2 == 0 else (False, True):
                (on if flag else off).append(one(flag, r))
        hash_per_run = hashed["seconds"] / args.repeats
        bytes_per_run = hashed["bytes"] / args.repeats
        files_per_run = hashed["files"] / args.repeats
    finally:
        pc.file_sha256 = original_sha
        pm.Cache = original_cache
        shutil.rmtree(tmp, ignore_errors=True)
    m_on, m_off = statistics.median(on), statistics.median(off)
    out.append("## 3. Cache checksums and locks on a warm offline-suite run (issue 7)\n")
    out.append(
        f"`pipeline.main.run` on the default config (suite=offline, merge=task_arithmetic, methods=[react], "
        f"all preference sets) with logger=disabled, progress=false{', ' + ' '.join(args.overrides) if args.overrides else ''}; "
        f"every unit already in {cache_dir} (checked: no unit computed). Verified = `Cache(verify=True, lock=True)` "
        f"(the default), plain = `Cache(verify=False, lock=False)`; {args.repeats} repeats each, alternated, "
        "after one untimed warm-up run. The whole run is timed, including writing tables, report and plots.\n"
    )
    out.append("| run | median s | min s | max s |")
    out.append("|---|---|---|---|")
    out.append(f"| verified (checksums + locks) | {m_on:.3f} | {min(on):.3f} | {max(on):.3f} |")
    out.append(
        f"| plain (no checksums, no locks) | {m_off:.3f} | {min(off):.3f} | {max(off):.3f} |"
    )
    out.append(
        f"\nOverhead: median verified / median plain = **{m_on / m_off:.3f}** ({100 * (m_on / m_off - 1):+.1f}%). "
        f"Time inside file_sha256 per verified run: {hash_per_run:.3f} s for {files_per_run:.0f} files, "
        f"{bytes_per_run / 2**20:.1f} MiB ({100 * hash_per_run / m_on:.1f}% of the verified run; "
        f"{bytes_per_run / 2**20 / max(hash_per_run, 1e-9):.0f} MiB/s). Locks: a warm run takes none "
        "(Cache.unit returns a verified hit before acquiring the lock), so the lock switch only matters "
        "when units are computed.\n"
    )
    out.append(f"Cache units read per run: {units[0]} (lookups, all hits).\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--only", choices=["features", "stage", "cache"], action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument(
        "--models",
        nargs="+",
        help="section 1 models (default: B/32, B/16, L/14 on CUDA; B/32 on CPU)",
    )
    ap.add_argument("--images", type=int, help="section 1 images (default 2048 CUDA, 64 CPU)")
    ap.add_argument("--batch-size", type=int, help="section 1 batch (default 256 CUDA, 32 CPU)")
    ap.add_argument("--stage-model", default="ViT-B-32", help="section 2 open_clip model")
    ap.add_argument("--calib-fraction", type=float, help="section 2 (default 0.1 CUDA, 0.001 CPU)")
    ap.add_argument(
        "--maps", type=int, help="section 2 preference maps (default 1000 CUDA, 200 CPU)"
    )
    ap.add_argument(
        "--cache", default=str(ROOT / "outputs" / "cache"), help="section 3: the warm cache"
    )
    ap.add_argument("--overrides", nargs="*", default=[], help="section 3: extra Hydra overrides")
    args = ap.parse_args(argv)
    from pipeline.features import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_sections(
        "Pipeline benchmark",
        "bench/bench_pipeline.py",
        argv,
        device,
        {
            "features": lambda out: bench_features(args, device, out),
            "stage": lambda out: bench_stage(args, device, out),
            "cache": lambda out: bench_cache(args, device, out),
        },
        args.only,
    )


if __name__ == "__main__":
    main()
