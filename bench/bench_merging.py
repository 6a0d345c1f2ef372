"""Benchmark the parameter-space merges: time and peak memory, against plain baselines run
side by side in the same process.

Part "merges": ViT-B/32-sized image towers (open_clip ViT-B-32 visual, random weights,
~88M parameters) and T random experts (pretrained + 0.01 * N(0, 1)), fp32:
  - Task Arithmetic vs a plain sum of the expert tensors and a plain Task Arithmetic,
  - weight averaging vs a plain average,
  - TIES (sum) vs a plain reference implementation (concatenate all task vectors into a
    (T, N) matrix, torch.kthvalue per row, elect, disjoint sum, unflatten).
Part "learned": AdaMerging / AdaMerging++ steps per second and LOT merge time on a small
ViT on CPU, against a plain forward(+backward) of the same encoder on the same images.

Memory is peak RSS (VmHWM, reset through /proc/self/clear_refs before each call) minus
the RSS at the start of the call, i.e. what the call allocates on top of its inputs. The
script re-executes itself with MALLOC_MMAP_THRESHOLD_=1048576 so that freed tensors go
back to the OS and the baseline RSS stays honest.

    .venv/bin/python bench/bench_merging.py                 # both parts, 8 experts, 1 thread
    .venv/bin/python bench/bench_merging.py --part merges --experts 8 --threads 2
    .venv/bin/python bench/bench_merging.py --part fusionbench --fusionbench-python /tmp/fb/bin/python

Part "fusionbench" (run on demand, not in "all"): this project's Task Arithmetic, weight
averaging and TIES against FusionBench's own algorithms (bench/fusionbench_side.py, run by
the interpreter of a venv with fusion-bench) on the same state dicts: time, memory, and how
many entries differ (TIES with the default conventions, and with each paper-literal option).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.execv(sys.executable, [sys.executable, *sys.argv])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import merging  # noqa: E402
import pipeline.compat  # noqa: E402,F401  (before open_clip)

GB = 1e9

# ----------------------------------------------------------------------------- measurement


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak RSS during a block, above the RSS at its start (bytes)."""

    def __enter__(self):
        _trim()
        self.start = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
            self.sampler = None
        except OSError:  # fall back to sampling every 5 ms
            self.peak, self.stop = self.start, False
            self.sampler = threading.Thread(target=self._sample)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.sampler is None:
            self.peak = _status("VmHWM")
        else:
            self.stop = True
            self.sampler.join()
        self.extra = max(0, self.peak - self.start)


def measure(fn):
    """(result, seconds, extra peak bytes, absolute peak bytes) of one call."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.extra, mem.peak


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum wall time per function over ``repeats`` rounds, the functions run in turn in
    each round (robust to other load on a shared machine)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def size_bytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def max_abs_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- plain baselines


def plain_sum(experts):
    return {k: sum(e[k] for e in experts) for k in experts[0]}


def plain_task_arithmetic(pre, experts, scale):
    return {k: pre[k] + scale * sum(e[k] - pre[k] for e in experts) for k in pre}


def plain_average(experts):
    return {k: sum(e[k] for e in experts) / len(experts) for k in experts[0]}


def reference_ties(pre, experts, scale, density):
    """Straightforward TIES (sum), the original code's conventions: (T, N) matrix of task
    vectors, kthvalue per row (int(density N) + 1 kept), elected sign with exact zeros
    replaced by the majority sign, disjoint sum, unflatten."""
    keys = list(pre)
    flat_pre = torch.cat([pre[k].reshape(-1) for k in keys])
    tv = torch.stack([torch.cat([e[k].reshape(-1) for k in keys]) - flat_pre for e in experts])
    n = tv.shape[1]
    k = min(n, int(density * n) + 1)
    kth = torch.stack([row.abs().kthvalue(n - k + 1).values for row in tv])
    trimmed = tv * (tv.abs() >= kth[:, None])
    del tv
    sign = trimmed.sum(dim=0).sign()
    sign[sign == 0] = sign.sum().sign()
    merged = (trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)).sum(dim=0)
    del trimmed
    flat = flat_pre + scale * merged
    out, i = {}, 0
    for key in keys:
        m = pre[key].numel()
        out[key] = flat[i : i + m].reshape(pre[key].shape).clone()
        i += m
    return out


def vit_b32_states(n_experts: int, layers: int = 12, seed: int = 0):
    """The open_clip ViT-B/32 image tower's state dict (random weights; its first ``layers``
    residual blocks) and ``n_experts`` experts = pretrained + 0.01 * N(0, 1), fp32."""
    import open_clip

    torch.manual_seed(seed)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    drop = tuple(f"transformer.resblocks.{i}." for i in range(layers, 12))
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items() if not k.startswith(drop)}
    del visual
    experts = [
        {k: v + 0.01 * torch.randn_like(v) for k, v in pre.items()} for _ in range(n_experts)
    ]
    return pre, experts


# ----------------------------------------------------------------------------- part 1


def bench_merges(n_experts: int, reference: bool) -> list[str]:
    pre, experts = vit_b32_states(n_experts)
    n_params = sum(v.numel() for v in pre.values())
    expert_bytes = size_bytes(pre) * n_experts
    _trim()
    rows: dict[str, list] = {}

    def run(name, fn):
        out, sec, extra, peak = measure(fn)
        rows[name] = [sec, extra, peak]
        return out

    cheap = {
        "plain sum of the experts' tensors": lambda: plain_sum(experts),
        "plain Task Arithmetic": lambda: plain_task_arithmetic(pre, experts, 0.3),
        "merging.task_arithmetic": lambda: merging.task_arithmetic(pre, experts, 0.3),
        "plain average": lambda: plain_average(experts),
        "merging.weight_average": lambda: merging.weight_average(experts),
    }
    run("plain sum of the experts' tensors", cheap["plain sum of the experts' tensors"])
    ta_plain = run("plain Task Arithmetic", cheap["plain Task Arithmetic"])
    ta = run("merging.task_arithmetic", cheap["merging.task_arithmetic"])
    ta_diff = max_abs_diff(ta, ta_plain)
    del ta, ta_plain
    avg_plain = run("plain average", cheap["plain average"])
    avg = run("merging.weight_average", cheap["merging.weight_average"])
    avg_diff = max_abs_diff(avg, avg_plain)
    del avg, avg_plain
    for name, sec in best_of(cheap, 3).items():  # time: best of 4 runs, in turn
        rows[name][0] = min(rows[name][0], sec)
    ties = run(
        "merging.ties (sum, density 0.2)", lambda: merging.ties(pre, experts, 0.3, 0.2, "sum")
    )
    ties_diff = None
    if reference:
        ref = run(
            "reference TIES (concatenate, kthvalue, stack)",
            lambda: reference_ties(pre, experts, 0.3, 0.2),
        )
        ties_diff = max_abs_diff(ties, ref)
        del ref
    del ties

    t = {name: (name, *r) for name, r in rows.items()}
    lines = [
        f"ViT-B/32 image tower, {n_params / 1e6:.1f}M parameters per model, {n_experts} experts, "
        f"fp32; experts' total size {expert_bytes / GB:.2f} GB "
        f"(pretrained + experts {(expert_bytes + size_bytes(pre)) / GB:.2f} GB). Memory from the "
        "first run; time: best of 4 runs (TIES and its reference: one run each). The whole-process "
        "peak includes the inputs and, for the second of each compared pair, the first one's "
        "output (0.35 GB) kept for the comparison.",
        "",
        "| merge | time (s) | extra peak RSS (GB) | peak RSS, whole process (GB) | whole-process peak / experts' size |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (sec, extra, peak) in rows.items():
        lines.append(
            f"| {name} | {sec:.2f} | {extra / GB:.2f} | {peak / GB:.2f} | {peak / expert_bytes:.2f} |"
        )
    lines.append("")
    ta_t, plain_ta = t["merging.task_arithmetic"], t["plain Task Arithmetic"]
    psum = t["plain sum of the experts' tensors"]
    lines.append(
        f"- Task Arithmetic / plain sum of tensors: time "
        f"x{ta_t[1] / psum[1]:.2f}; "
        f"/ plain Task Arithmetic: time x{ta_t[1] / plain_ta[1]:.2f}, "
        f"extra memory x{ta_t[2] / max(plain_ta[2], 1):.2f}; max |difference| {ta_diff:.1e}."
    )
    lines.append(
        f"- weight_average / plain average: time "
        f"x{t['merging.weight_average'][1] / t['plain average'][1]:.2f}; "
        f"max |difference| {avg_diff:.1e}."
    )
    if reference:
        a = t["merging.ties (sum, density 0.2)"]
        b = t["reference TIES (concatenate, kthvalue, stack)"]
        lines.append(
            f"- TIES / reference TIES: time x{a[1] / b[1]:.2f} ({b[1] / a[1]:.1f}x faster), "
            f"extra memory x{a[2] / b[2]:.2f}, whole-process peak x{a[3] / b[3]:.2f}; "
            f"max |difference| {ties_diff:.1e}."
        )
    return lines


# ----------------------------------------------------------------------------- part 3


def bench_fusionbench(n_experts: int, layers: int, python: str, threads: int) -> list[str]:
    """This project's merges against FusionBench's algorithms (``bench/fusionbench_side.py``,
    run by FusionBench's own interpreter) on the same state dicts. The experts are shaped as
    FusionBench's hub experts (CLIPVisionModel: no projection): FusionBench gets the towers
    without ``proj``; this project gets them with the pretrained ``proj`` filled in, as its
    loaders do, so TIES must skip it (no task vector) to agree."""
    import json
    import subprocess
    import tempfile

    from safetensors.torch import load_file, save_file

    pre, experts = vit_b32_states(n_experts, layers)
    for e in experts:
        e["proj"] = pre["proj"].clone()
    n_params = sum(v.numel() for k, v in pre.items() if k != "proj")
    ours = {
        "task_arithmetic": lambda: merging.task_arithmetic(pre, experts, 0.3),
        "simple_average": lambda: merging.weight_average(experts),
        "ties": lambda: merging.ties(pre, experts, 0.3, 0.2, "sum"),
    }
    names = {
        "task_arithmetic": "Task Arithmetic (0.3)",
        "simple_average": "weight averaging",
        "ties": "TIES (sum, density 0.2, 0.3)",
    }
    lines = [
        f"ViT-B/32 image tower with its first {layers} of 12 residual blocks, "
        f"{n_params / 1e6:.1f}M parameters per model without the projection, {n_experts} experts "
        f"= pretrained + 0.01 * N(0, 1), fp32, {threads} torch thread(s) on both sides; "
        f"FusionBench: `{python}` (its TaskArithmetic / SimpleAverage / TiesMerging algorithms, "
        "config defaults); each merge runs once in a fresh process (FusionBench) or in this "
        "process (ours); memory = peak RSS above the RSS before the call.",
        "",
        "| merge | FusionBench s | ours s | speed-up | FusionBench extra GB | ours extra GB | "
        "entries differing | max abs difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="fusionbench_side_") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        (tmp / "out").mkdir()
        hub = lambda sd: {k: v for k, v in sd.items() if k != "proj"}  # noqa: E731
        save_file(hub(pre), str(tmp / "in" / "pretrained.safetensors"))
        for k, e in enumerate(experts):
            save_file(hub(e), str(tmp / "in" / f"expert_{k:02d}.safetensors"))
        side = str(ROOT / "bench" / "fusionbench_side.py")
        for method, fn in ours.items():
            proc = subprocess.run(
                [python, side, str(tmp / "in"), str(tmp / "out"), method],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                lines.append(f"| {names[method]} | failed: {proc.stderr.strip()[-300:]} |")
                continue
            fb = json.loads((tmp / "out" / f"{method}.json").read_text())
            fb_state = load_file(str(tmp / "out" / f"{method}.safetensors"))
            out, sec, extra, _ = measure(fn)
            differing = sum(int((out[k] != fb_state[k]).sum()) for k in fb_state)
            lines.append(
                f"| {names[method]} | {fb['seconds']:.2f} | {sec:.2f} | "
                f"{fb['seconds'] / sec:.1f}x | {fb['extra_peak_bytes'] / GB:.2f} | "
                f"{extra / GB:.2f} | {differing:,} | {max_abs_diff(hub(out), fb_state):.1e} |"
            )
            if method != "simple_average":  # no task vector: the pretrained projection
                assert torch.equal(out["proj"], pre["proj"])
            if method == "ties":
                ties_fb = fb_state
            del out, fb_state
    if "ties_fb" in locals():
        total = n_params
        for label, rules in (
            ("keep_rule=round (round(0.2 N) kept)", {"keep_rule": "round"}),
            ("zero_sign=zero (exact cancellations get 0)", {"zero_sign": "zero"}),
        ):
            out = merging.ties(pre, experts, 0.3, 0.2, "sum", **rules)
            differing = sum(int((out[k] != ties_fb[k]).sum()) for k in ties_fb)
            lines.append(
                f"| TIES, {label} | | | | | | {differing:,} of {total:,} | "
                f"{max_abs_diff(hub(out), ties_fb):.1e} |"
            )
    return lines


# ----------------------------------------------------------------------------- part 2


def small_vit():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=128,
        vision_cfg=dict(image_size=32, patch_size=8, width=192, layers=4, head_width=64),
        text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
    )
    return model.visual.eval()


def bench_learned(n_experts: int, repeats: int = 3) -> list[str]:
    torch.manual_seed(0)
    enc = small_vit()
    pre = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    experts = [
        {k: v + 0.01 * torch.randn_like(v) for k, v in pre.items()} for _ in range(n_experts)
    ]
    heads = [F.normalize(torch.randn(10, 128), dim=-1) for _ in range(n_experts)]
    images = [torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8) for _ in range(n_experts)]

    def prepare(b):
        return (b.float() / 255.0 - 0.45) / 0.27

    n_params = sum(v.numel() for v in pre.values())
    lines = [
        f"Small open_clip ViT (32 px, patch 8, width 192, 4 layers; {n_params / 1e6:.2f}M "
        f"parameters), {n_experts} tasks, CPU (no GPU in this session); times are the best of "
        f"{repeats} rounds, each round running the method and its baseline in turn.",
        "",
        "| what | time per step / merge | vs plain baseline (same process) |",
        "|---|---:|---:|",
    ]

    # plain baseline: forward + backward of the encoder itself on the same batches
    model = small_vit()
    params = list(model.parameters())

    def plain_step():
        for t in range(n_experts):
            z = model(prepare(images[t][:16]))
            logp = (100.0 * F.normalize(z, dim=-1) @ heads[t].T).log_softmax(-1)
            (-(logp.exp() * logp).sum(-1).mean() / n_experts).backward()
        for p in params:
            p.grad = None

    steps = 5
    for name, ties in (("AdaMerging (layer-wise)", False), ("AdaMerging++ (layer-wise)", True)):
        kw = dict(granularity="layer", ties=ties, batch_size=16, prepare=prepare, progress=False)
        t = best_of(
            {
                "setup": lambda kw=kw: merging.adamerging(
                    pre, experts, enc, heads, images, steps=0, **kw
                ),
                "total": lambda kw=kw: merging.adamerging(
                    pre, experts, enc, heads, images, steps=steps, **kw
                ),
                "plain": plain_step,
            },
            repeats,
        )
        step = (t["total"] - t["setup"]) / steps
        lines.append(
            f"| {name}: batch 16 x {n_experts} tasks per step | {step:.3f} s/step "
            f"({1 / step:.1f} steps/s; setup {t['setup']:.2f} s) | x{step / t['plain']:.2f} of a "
            f"plain forward+backward of the encoder on the same batches ({t['plain']:.3f} s) |"
        )

    exemplars = [im[:64] for im in images]

    def plain_forward():
        with torch.no_grad():
            for ex in exemplars:
                model(prepare(ex))

    def lot():
        return merging.lot_merging(
            pre, experts, enc, exemplars, prepare=prepare, batch_size=64, progress=False
        )

    t = best_of({"lot": lot, "plain": plain_forward}, repeats)
    _, _, lot_extra, _ = measure(lot)
    lines.append(
        f"| LOT merge: 64 exemplars x {n_experts} tasks | {t['lot']:.2f} s per merge (extra peak "
        f"RSS {lot_extra / GB:.2f} GB) | x{t['lot'] / t['plain']:.1f} of a plain forward of the "
        f"exemplars ({t['plain']:.3f} s) |"
    )
    return lines


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["merges", "learned", "fusionbench", "all"], default="all")
    ap.add_argument(
        "--fusionbench-python",
        help="interpreter of a venv with fusion-bench installed (part fusionbench; not in "
        "'all'): python3 -m venv /tmp/fb && /tmp/fb/bin/pip install torch==2.13.0 fusion-bench",
    )
    ap.add_argument(
        "--layers", type=int, default=12, help="residual blocks kept (part fusionbench)"
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference TIES (~10 GB)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on the shared 2-core machine 2 threads ran 5x slower)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); command: {' '.join(['python', *sys.argv])}\n"
    )
    t0 = time.perf_counter()
    if args.part in ("merges", "all"):
        print("\n".join(bench_merges(args.experts, not args.no_reference)), "\n", flush=True)
    if args.part == "fusionbench":
        if not args.fusionbench_python:
            ap.error("--part fusionbench needs --fusionbench-python PATH")
        lines = bench_fusionbench(args.experts, args.layers, args.fusionbench_python, args.threads)
        print("\n".join(lines), "\n", flush=True)
    if args.part in ("learned", "all"):
        print("\n".join(bench_learned(args.experts)), "\n", flush=True)
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
