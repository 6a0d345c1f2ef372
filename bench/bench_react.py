"""Benchmark of the ReACT core (correction.react); prints markdown tables.

    python bench/bench_react.py              # default: each map config runs until 1,000
                                             # preferences or a time cap (see --cap-seconds)
    python bench/bench_react.py --full       # all 1,000 preferences for every config
    python bench/bench_react.py --quick      # smaller settings (smoke run)
    python bench/bench_react.py --device cuda

1. Preference maps per second, batched, D in {512, 768}, T in {8, 20}; achieved FLOP rate as a
   fraction of a batched D x D @ D x D matmul at the same dtype, measured right before and
   after each config on the same device (the CPU may be shared; the ratio is what to read).
   FLOPs per map (2 FLOPs per multiply-add for the solve, matching the matmul's 2 D^3):
   combination 2 T D^2 (two D x D sums of T terms, counted as multiply-adds) + Cholesky D^3/3
   + two triangular solves 2 D^3. Also a plain per-preference loop (torch.linalg.solve of the
   same system, one preference at a time) side by side.
2. Offline statistics time against T (synthetic tasks, fixed n and D): linear fit, R^2.
3. Peak memory of the streaming accumulator against n (peak RSS over the run, reset before
   each n through /proc/self/clear_refs), beside the one-shot call that holds all features.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import run_sections  # noqa: E402

from correction import react  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_rate(D, batch, dtype, device):
    """FLOP/s of a batched (batch, D, D) @ (batch, D, D) product."""
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(batch, D, D, dtype=dtype, device=device, generator=g)
    Y = torch.randn(batch, D, D, dtype=dtype, device=device, generator=g)
    out = torch.empty_like(X)
    torch.matmul(X, Y, out=out)
    return 2 * batch * D**3 / timed(lambda: torch.matmul(X, Y, out=out), device)


def synthetic_stacked(T, D, device, beta=0.1):
    """T tasks' statistics with an embedding-like decaying spectrum, built directly.

    G_t = M^T M / n and S_t = E^T M / n from n = D + 64 synthetic samples; Omega_t is a random
    orthogonal matrix (QR) instead of the Procrustes SVD, to keep the set-up short: the
    preference-map cost does not depend on the values.
    """
    g = torch.Generator(device=device).manual_seed(T * 1000 + D)
    f64 = dict(dtype=torch.float64, device=device)
    scales = torch.logspace(0, -3, D, **f64)
    stats = []
    for _ in range(T):
        n = D + 64
        M = torch.randn(n, D, generator=g, **f64) * scales
        E = M + 0.05 * torch.randn(n, D, generator=g, **f64)
        Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, **f64))
        stats.append(
            react.TaskStatistics(
                gram=M.T @ M / n, cross=E.T @ M / n, omega=Q, n=n, beta=beta, dtype=torch.float32
            )
        )
    return react.stack_statistics(stats)


def map_flops(P, T, D):
    return P * (2 * T * D * D + D**3 / 3 + 2 * D**3)


def bench_maps(args, device, out):
    Ds = [128, 256] if args.quick else [512, 768]
    Ts = [4, 8] if args.quick else [8, 20]
    P_total = 100 if args.quick else 1000
    solve_dtypes = [torch.float64, torch.float32]
    out.append("## 1. Preference maps, batched\n")
    out.append(
        f"P = {P_total} Dirichlet(1) preferences per config, answered in calls of "
        f"{args.call} (output float32, as the pipeline asks); "
        + (
            "all of them timed."
            if args.full or args.quick
            else f"timing stops after the call that crosses {args.cap_seconds:.0f} s (column 'P timed')."
        )
        + " matmul: batched D x D @ D x D at the solve dtype, median of 3, measured before and "
        "after each config (mean reported).\n"
    )
    out.append(
        "| D | T | solve dtype | P timed | maps/s | ms/map | GFLOP/s | matmul GFLOP/s | "
        "fraction of matmul | plain loop maps/s | speed-up vs loop |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for D in Ds:
        for T in Ts:
            st = synthetic_stacked(T, D, device)
            P = torch.distributions.Dirichlet(torch.ones(T, dtype=torch.float64)).sample((P_total,))
            P = P.to(device)
            for sdt in solve_dtypes:
                batch = min(8, react._chunk_size(D, device))
                mm0 = matmul_rate(D, batch, sdt, device)
                react.preference_map(st, P[:2], solve_dtype=sdt, dtype=torch.float32)  # warm
                done, elapsed = 0, 0.0
                while done < P_total:
                    chunk = P[done : done + args.call]
                    sync(device)
                    t0 = time.perf_counter()
                    react.preference_map(st, chunk, solve_dtype=sdt, dtype=torch.float32)
                    sync(device)
                    elapsed += time.perf_counter() - t0
                    done += chunk.shape[0]
                    if not (args.full or args.quick) and elapsed > args.cap_seconds:
                        break
                mm1 = matmul_rate(D, batch, sdt, device)
                mm = (mm0 + mm1) / 2
                rate = map_flops(done, T, D) / elapsed
                # plain baseline: one preference at a time, LU solve of the same system
                n_loop = 4 if D >= 512 else 8
                num = st.numerator.reshape(T, D * D).to(sdt)
                sys_ = st.system.reshape(T, D * D).to(sdt)
                prefs = P[:n_loop].to(sdt)

                def loop(num=num, sys_=sys_, prefs=prefs, D=D):
                    for p in prefs:
                        A, C = (p @ num).reshape(D, D), (p @ sys_).reshape(D, D)
                        torch.linalg.solve(C.mT, A.mT).mT.float()

                t_loop = timed(loop, device, repeats=1) / n_loop
                out.append(
                    f"| {D} | {T} | {str(sdt).removeprefix('torch.')} | {done} | {done / elapsed:.1f} | "
                    f"{1e3 * elapsed / done:.2f} | {rate / 1e9:.1f} | {mm / 1e9:.1f} | "
                    f"{rate / mm:.0%} | {1 / t_loop:.1f} | {t_loop * done / elapsed:.2f}x |"
                )
                print(out[-1], file=sys.stderr, flush=True)
            del st
    out.append("")


def bench_statistics(args, device, out):
    D, n = (64, 128) if args.quick else (256, 512)
    Ts = [2, 4, 8, 16] if args.quick else [2, 4, 8, 16, 32, 64]
    g = torch.Generator(device=device).manual_seed(1)
    Tmax = max(Ts)
    feats = [
        (
            torch.randn(n, D, device=device, generator=g),
            torch.randn(n, D, device=device, generator=g),
        )
        for _ in range(Tmax)
    ]
    # warm-up: first LAPACK/SVD calls pay one-off set-up costs
    react.stack_statistics([react.task_statistics(m, e) for m, e in feats[:2]])
    times = []
    for T in Ts:

        def run(T=T):
            stats = [
                react.task_statistics(m, e, task=f"t{i}") for i, (m, e) in enumerate(feats[:T])
            ]
            react.stack_statistics(stats)

        times.append(timed(run, device, repeats=3))
    slope, intercept = np.polyfit(Ts, times, 1)
    pred = slope * np.array(Ts) + intercept
    ss_res = float(((np.array(times) - pred) ** 2).sum())
    ss_tot = float(((np.array(times) - np.mean(times)) ** 2).sum())
    r2 = 1 - ss_res / ss_tot
    out.append("## 2. Offline statistics time against the number of tasks\n")
    out.append(
        f"Synthetic features, n = {n} per task, D = {D}; task_statistics per task (float64 "
        "Gram/cross accumulation + Procrustes SVD) then stack_statistics; median of 3.\n"
    )
    out.append("| T | seconds | seconds / task |")
    out.append("|---|---|---|")
    for T, t in zip(Ts, times, strict=True):
        out.append(f"| {T} | {t:.3f} | {t / T * 1e3:.1f} ms |")
    out.append(
        f"\nLinear fit (numpy.polyfit, degree 1): {slope * 1e3:.2f} ms per task, intercept "
        f"{intercept * 1e3:.2f} ms, R^2 = {r2:.4f}.\n"
    )


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(mode: str, n: int, D: int, batch: int) -> float:
    """Peak RSS increase (MB) of one statistics computation, in this (fresh) process."""
    g = torch.Generator().manual_seed(n)
    react.task_statistics(torch.randn(4, D), torch.randn(4, D))  # load kernels first
    base = _proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    if mode == "stream":
        acc = react.StatisticsAccumulator(D, beta=0.1)
        for s in range(0, n, batch):
            b = min(batch, n - s)
            m = torch.randn(b, D, generator=g)
            acc.update(m, m + 0.1 * torch.randn(b, D, generator=g))
        acc.finalize()
    else:
        m = torch.randn(n, D, generator=g)
        react.task_statistics(m, m + 0.1 * torch.randn(n, D, generator=g))
    return _proc_status_mb("VmHWM") - base


def bench_memory(args, device, out):
    import subprocess

    out.append("## 3. Peak memory of the streaming accumulator against n\n")
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        out.append("(skipped: needs the CPU and Linux /proc peak-RSS reset)\n")
        return
    D, batch = (128, 256) if args.quick else (512, 256)
    ns = [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536]
    out.append(
        f"D = {D}, float32 features generated in batches of {batch}; each measurement in a fresh "
        "process: peak RSS (VmHWM, reset just before) minus RSS before. One-shot: the same "
        "features materialised and passed to task_statistics at once (float32 features plus "
        "their float64 copies).\n"
    )
    out.append("| n | streaming peak (MB) | one-shot peak (MB) | one-shot features, float32 (MB) |")
    out.append("|---|---|---|---|")
    for n in ns:
        row = []
        for mode in ("stream", "oneshot"):
            cmd = [sys.executable, __file__, "--memory-probe", mode, str(n), str(D), str(batch)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row.append(float(r.stdout.strip().splitlines()[-1]))
        out.append(f"| {n} | {row[0]:.1f} | {row[1]:.1f} | {2 * n * D * 4 / 2**20:.1f} |")
    out.append("")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smaller settings (smoke run)")
    ap.add_argument("--full", action="store_true", help="time all 1,000 preferences per config")
    ap.add_argument("--cap-seconds", type=float, default=5.0, help="time cap per map config")
    ap.add_argument("--call", type=int, default=100, help="preferences per preference_map call")
    ap.add_argument("--only", choices=["maps", "statistics", "memory"], action="append")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument(
        "--memory-probe", nargs=4, metavar=("MODE", "N", "D", "BATCH"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.memory_probe:
        mode, n, D, batch = args.memory_probe
        print(memory_probe(mode, int(n), int(D), int(batch)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    run_sections(
        "ReACT core benchmark",
        "bench/bench_react.py",
        argv,
        device,
        {
            "maps": lambda out: bench_maps(args, device, out),
            "statistics": lambda out: bench_statistics(args, device, out),
            "memory": lambda out: bench_memory(args, device, out),
        },
        args.only,
        note=" (other jobs share this machine)",
    )


if __name__ == "__main__":
    main()
