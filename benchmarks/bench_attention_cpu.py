"""Microbenchmark of tempspec's CPU attention kernels against torch's SDPA: for a few queries (csrc/attention_cpu.cpp)
and, with --prefill, for a causal prefill (csrc/prefill_attention_cpu.cpp).

For each cache length L and each number of queries T (a decode is T = 1, a verification of k drafts T = k + 1), it
times attention of T queries per row over L cached positions, with the engine's layout (a [B, T, H, D] projection
viewed as [B, H, T, D], the first L positions of a longer cache, a causal bool mask) through tempspec's kernel and
through F.scaled_dot_product_attention, in bf16. With --prefill, T = L: a prompt of L tokens attending causally from
position 0 (no mask; SDPA with is_causal), and --queries is not used. Default shapes: the default target's (9 query
heads, 3 key heads, head dimension 64), batch 1.

    python benchmarks/bench_attention_cpu.py --lengths 256,512,1400 --queries 1,2,5,9 \
        --out benchmarks/results/attention_cpu_<cpu>.json
    python benchmarks/bench_attention_cpu.py --prefill --lengths 64,256,768,1378 --reps 10 \
        --out benchmarks/results/attention_prefill_cpu_<cpu>.json
(with --prefill the JSON's `total` sums each kernel's time over the lengths: pass a prompt set's lengths to time one
layer's attention over its prefill)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from bench_linear_cpu import add_timing_arguments, int_list, time_ms, write_result  # noqa: E402
from tempspec_engine.attention import (PREFILL_HEAD_DIMS, cpu_attention_enabled, cpu_has_avx512bf16,  # noqa: E402
                                       cpu_prefill_attention_enabled, kernel_attention, kernel_prefill_attention)
from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, run_command  # noqa: E402
from tempspec_engine.linear import kernel_available  # noqa: E402
from tempspec_engine.threads import set_threads  # noqa: E402

PROG = "bench_attention_cpu"


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int_list, default=[256, 512, 1400],
                   help="cached positions L (default: 256,512,1400)")
    p.add_argument("--queries", type=int_list, default=[1, 2, 5, 9], help="queries per row T (default: 1,2,5,9)")
    p.add_argument("--batch", type=positive_int, default=1, help="rows B (default: %(default)s)")
    p.add_argument("--heads", type=positive_int, default=9, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=positive_int, default=3, help="key/value heads (default: %(default)s)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="head dimension (default: %(default)s)")
    p.add_argument("--prefill", action="store_true",
                   help="time the causal prefill kernel (T = L queries from position 0) instead (default: off)")
    add_timing_arguments(p, "attention_cpu", reps=200)
    return p.parse_args(argv)


def cache_views(B: int, Hkv: int, L: int, D: int, g: torch.Generator):
    """Random bf16 keys and values [B, Hkv, L, D], each a view of the first L positions of a cache of L + 64 (as the
    engine's KV cache hands them over: strided, not contiguous)."""
    return tuple(torch.randn(B, Hkv, L + 64, D, generator=g).bfloat16()[:, :, :L] for _ in range(2))


def run(args) -> int:
    if not kernel_available():
        raise ValueError("tempspec's CPU attention kernel is not available here (the extension is not built, or this "
                         "CPU lacks AVX2/FMA)")
    if args.heads % args.kv_heads:
        raise ValueError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    set_threads(args.threads)
    if args.prefill:
        return run_prefill(args)
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    rows = []
    for L in args.lengths:
        k, v = cache_views(B, Hkv, L, D, g)
        for T in args.queries:
            if T > L:
                continue
            q = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2)
            mask = torch.arange(L).view(1, 1, 1, L) <= torch.arange(L - T, L).view(1, 1, T, 1)
            ours = time_ms(lambda: kernel_attention(q, k, v, mask), args.reps, args.rounds)
            sdpa = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv),
                           args.reps, args.rounds)
            rows.append({"B": B, "H": H, "Hkv": Hkv, "D": D, "L": L, "T": T, "tempspec_ms": ours, "sdpa_ms": sdpa,
                         "speedup_vs_sdpa": sdpa / ours})
            print(f"L={L:<5} T={T:<3} tempspec {ours:7.3f} ms  sdpa {sdpa:7.3f} ms  ({sdpa / ours:.2f}x)", flush=True)
    return write_result("attention_cpu", cpu_attention_enabled(), args, rows, dtype="bfloat16")


def run_prefill(args) -> int:
    """--prefill: each length L as a prompt of L queries attending causally from position 0."""
    if not cpu_has_avx512bf16():
        raise ValueError("tempspec's CPU prefill attention kernel needs the extension and a CPU with AVX-512 BF16")
    if args.head_dim not in PREFILL_HEAD_DIMS:
        raise ValueError(f"--head-dim must be one of {', '.join(map(str, PREFILL_HEAD_DIMS))} with --prefill, "
                         f"got {args.head_dim}")
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    rows = []
    for L in args.lengths:
        k, v = cache_views(B, Hkv, L, D, g)
        q = torch.randn(B, L, H, D, generator=g).bfloat16().transpose(1, 2)
        ours = time_ms(lambda: kernel_prefill_attention(q, k, v), args.reps, args.rounds)
        sdpa = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv),
                       args.reps, args.rounds)
        gflops = 4 * B * H * D * L * (L + 1) / 2 / 1e6  # the causal products' work, per ms -> GFLOPS
        rows.append({"B": B, "H": H, "Hkv": Hkv, "D": D, "L": L, "T": L, "tempspec_ms": ours, "sdpa_ms": sdpa,
                     "speedup_vs_sdpa": sdpa / ours, "tempspec_gflops": gflops / ours, "sdpa_gflops": gflops / sdpa})
        print(f"L={L:<5} prefill tempspec {ours:8.3f} ms ({gflops / ours:4.0f} GFLOPS)  sdpa {sdpa:8.3f} ms "
              f"({gflops / sdpa:4.0f} GFLOPS)  ({sdpa / ours:.2f}x)", flush=True)
    total = {"tempspec_ms": sum(r["tempspec_ms"] for r in rows), "sdpa_ms": sum(r["sdpa_ms"] for r in rows)}
    print(f"all lengths: tempspec {total['tempspec_ms']:.2f} ms  sdpa {total['sdpa_ms']:.2f} ms "
          f"({total['sdpa_ms'] / total['tempspec_ms']:.2f}x)", flush=True)
    return write_result("attention_prefill_cpu", cpu_prefill_attention_enabled(), args, rows, dtype="bfloat16",
                        total=total)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
