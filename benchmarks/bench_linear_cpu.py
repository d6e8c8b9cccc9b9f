"""Microbenchmark of tempspec's bf16 linear kernel for CPUs (csrc/linear_cpu.cpp) against torch's F.linear.

For each weight shape [N, K] (the default target's projections and its output head unless --shapes) and each number of
input rows M (a decode is M = batch, a verification of k drafts M = batch * (k + 1)), it times y = x @ w.T in bf16
through tempspec's kernel and through F.linear, and F.linear in fp32 for reference, and reports each time and the
weight bandwidth (bytes of bf16 weights over the time). On a CPU where torch has no fast bf16 matrix product the
F.linear time grows with M and the kernel's does not, until M is large enough for the arithmetic to count. Where the
kernel runs its avx512bf16 variant (tempspec_engine/linear.py, kernel_isa), the avx2 variant is timed too, in the same
run (tempspec_avx2_ms).

    python benchmarks/bench_linear_cpu.py --rows 1,2,4,8,16 --out benchmarks/results/linear_cpu_<cpu>.json
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.linear import cpu_kernel_enabled, kernel_available, kernel_isa, kernel_linear  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402
from tempspec_engine.threads import set_threads  # noqa: E402

PROG = "bench_linear_cpu"
# SmolLM2-135M: q/o, k/v, gate/up, down, the tied output head
DEFAULT_SHAPES = "576x576,192x576,1536x576,576x1536,49152x576"


def shape_list(text: str):
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"shapes must be NxK,... with positive N and K, got {item.strip()!r}")
        shapes.append((int(m.group(1)), int(m.group(2))))
    return shapes


def int_list(text: str):
    return [positive_int(v) for v in text.split(",")]


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=shape_list, default=shape_list(DEFAULT_SHAPES),
                   help=f"weight shapes NxK,... (default: {DEFAULT_SHAPES}, the default target's)")
    p.add_argument("--rows", type=int_list, default=[1, 2, 4, 8, 16, 64], help="input rows M (default: 1,2,4,8,16,64)")
    add_timing_arguments(p, "linear_cpu", reps=20)
    return p.parse_args(argv)


def add_timing_arguments(p: argparse.ArgumentParser, benchmark: str, reps: int) -> None:
    """The arguments every kernel microbenchmark shares: --reps, --rounds (time_ms), --threads, --out, --debug."""
    p.add_argument("--reps", type=positive_int, default=reps, help="calls per timing (default: %(default)s)")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="timings per cell, the median reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, the cores other processes leave free)")
    p.add_argument("--out", default=None, help=f"JSON path (default: a new file {RUNS_DIR}/{benchmark}-<time>.json)")
    add_debug_flag(p)


def time_ms(fn, reps: int, rounds: int) -> float:
    """Median over `rounds` of the mean time of `reps` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(times)


def run(args) -> int:
    if args.out:
        check_output_path(args.out)
    if not kernel_available():
        raise ValueError("tempspec's CPU linear kernel is not available here (the extension is not built, or this "
                         "CPU lacks AVX2/FMA)")
    set_threads(args.threads)
    isa = kernel_isa()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k in args.shapes:
        w = torch.randn(n, k, generator=g).bfloat16()
        wf = w.float()
        for m in args.rows:
            x = torch.randn(m, k, generator=g).bfloat16()
            xf = x.float()
            ours = time_ms(lambda: kernel_linear(x, w), args.reps, args.rounds)
            torch_bf16 = time_ms(lambda: F.linear(x, w), args.reps, args.rounds)
            torch_fp32 = time_ms(lambda: F.linear(xf, wf), args.reps, args.rounds)
            row = {"N": n, "K": k, "M": m, "tempspec_bf16_ms": ours, "torch_bf16_ms": torch_bf16,
                   "torch_fp32_ms": torch_fp32, "speedup_vs_torch_bf16": torch_bf16 / ours,
                   "tempspec_weight_gb_s": 2 * n * k / ours / 1e6}
            line = ""
            if isa != "avx2":  # the fallback variant too, side by side
                row["tempspec_avx2_ms"] = time_ms(lambda: kernel_linear(x, w, isa="avx2"), args.reps, args.rounds)
                line = f"  avx2 variant {row['tempspec_avx2_ms']:8.3f} ms"
            rows.append(row)
            print(f"{n:>6}x{k:<5} M={m:<4} tempspec {ours:8.3f} ms  torch bf16 {torch_bf16:8.3f} ms  "
                  f"fp32 {torch_fp32:8.3f} ms  ({row['speedup_vs_torch_bf16']:.2f}x, "
                  f"{row['tempspec_weight_gb_s']:.1f} GB/s of weights){line}", flush=True)
    return write_result("linear_cpu", cpu_kernel_enabled(), args, rows, kernel_isa=isa)


def write_result(benchmark: str, engine_uses_kernel: bool, args, rows: list, **extra) -> int:
    """Writes a kernel microbenchmark's JSON (benchmark, device, engine_uses_kernel, the timing rule of time_ms, meta,
    rows, and `extra`) to args.out or a fresh results path, and says where."""
    meta = collect_meta("cpu")
    result = {"benchmark": benchmark, "device": meta["device_name"], "engine_uses_kernel": engine_uses_kernel, **extra,
              "timing": f"median of {args.rounds} means of {args.reps} calls after 3 warm-up calls",
              "meta": meta, "rows": rows}
    out = args.out or fresh_results_path(benchmark)
    write_json(result, out)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
