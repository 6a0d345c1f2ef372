"""Forward passes of the offline suite's image tower on a CPU: one process on all its torch
threads, Python threads of one torch thread each, and one process per core on one thread
each, the same images in every variant.

    python bench/bench_forward_processes.py [--batches 48] [--batch-size 256] [Hydra overrides]

The question it answers: on a small CPU, is intra-op threading (one process, ``num_threads``
threads on one model at a time) the fastest way to run the model-producing baselines' many
preference models, or models side by side in Python threads of one torch thread each, or in
parallel processes? (The pipeline scores one model at a time: side by side in threads was
built, gave no measurable change of ``make compare``'s wall time, and was taken out;
BENCHMARKS.md.) Each variant runs ``--batches`` batches in all (split evenly over its
processes and threads) through the suite's ViT (random weights: the cost of a forward pass does not depend on their values)
under ``inference_mode`` with ``pipeline.features.pooled_token_only``, as
``pipeline.methods.models_accuracies`` does. Every process builds and warms its model
first; the clock runs from one common start signal until the last process is done.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pipeline  # noqa: E402,F401  (torchvision guard first)
from bench.benchlib import run_sections  # noqa: E402
from pipeline.features import pooled_token_only  # noqa: E402
from pipeline.main import script_config  # noqa: E402
from pipeline.suite import build_clip  # noqa: E402
from pipeline.suites.offline_train import clip_kwargs  # noqa: E402


def _shares(n: int, k: int) -> list[int]:
    """``n`` batches split over ``k`` workers as evenly as possible."""
    return [n // k + (i < n % k) for i in range(k)]


def _worker(model_config, image_size, threads, batches, batch_size, ready, go, done) -> None:
    """``threads`` = (torch threads, Python threads): with several Python threads, each runs
    its share of the batches on its own model, as scoring distinct preference models would."""
    torch_threads, py_threads = threads
    torch.set_num_threads(torch_threads)
    torch.manual_seed(0)
    models = [build_clip(model_config).visual.eval() for _ in range(py_threads)]
    x = torch.randn(batch_size, 3, image_size, image_size)

    def run(model, n):
        with torch.inference_mode(), pooled_token_only(model):
            for _ in range(n):
                model(x)

    with ThreadPoolExecutor(
        py_threads, initializer=torch.set_num_threads, initargs=(torch_threads,)
    ) as pool:
        list(pool.map(run, models, [1] * py_threads))  # warm-up: allocator, kernels, threads
        ready.put(os.getpid())
        go.wait()
        list(pool.map(run, models, _shares(batches, py_threads)))
    done.put(os.getpid())


def _images_per_s(model_config, image_size, processes, threads, batches, batch_size) -> float:
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_worker,
            args=(model_config, image_size, threads, n, batch_size, ready, go, done),
        )
        for n in _shares(batches, processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.perf_counter()
    go.set()
    for _ in procs:
        done.get(timeout=600)
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return batches * batch_size / wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=48, help="batches per variant, in all")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all variants")
    args, cfg = script_config(ap, argv)
    if cfg.suite.name != "offline":
        raise SystemExit("bench_forward_processes: for the offline suites (suite=offline...)")
    model_config = {"clip_kwargs": clip_kwargs(cfg.suite.model)}
    image_size = int(cfg.suite.model.image_size)
    cores = os.cpu_count() or 1
    variants = {  # name: (processes, (torch threads, Python threads) per process)
        f"1 process x {cores} torch threads (one model at a time)": (1, (cores, 1)),
        f"1 process x {cores} Python threads x 1 torch thread (measured, not adopted)": (
            1,
            (1, cores),
        ),
        f"{cores} processes x 1 thread": (cores, (1, 1)),
        "1 process x 1 thread": (1, (1, 1)),
    }

    def section(out: list[str]) -> None:
        rates = {name: [] for name in variants}
        for _ in range(args.repeats):  # interleaved rounds: a drift of the host hits all alike
            for name, (procs, threads) in variants.items():
                rates[name].append(
                    _images_per_s(
                        model_config, image_size, procs, threads, args.batches, args.batch_size
                    )
                )
        base = statistics.median(next(iter(rates.values())))
        out.append(
            f"{args.batches} batches of {args.batch_size} images per variant, "
            f"{args.repeats} interleaved rounds, median (min-max) images per second:\n"
        )
        out.append("| variant | images / s | vs one model at a time |")
        out.append("|---|---|---|")
        for name, r in rates.items():
            med = statistics.median(r)
            out.append(f"| {name} | {med:.0f} ({min(r):.0f}-{max(r):.0f}) | {med / base:.2f}x |")
        out.append("")

    run_sections(
        "Image-tower forward passes: threads against processes",
        "bench/bench_forward_processes.py",
        argv,
        torch.device("cpu"),
        {"forward": section},
    )


if __name__ == "__main__":
    main()
