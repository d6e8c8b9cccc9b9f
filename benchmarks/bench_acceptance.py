"""Microbenchmark of the fused acceptance op: every backend against the torch reference (eager and torch.compile).

For each (B, k, V) it times one `speculative_sample` call (inputs validated once beforehand, uniforms given, so the
time is the op itself) and reports the effective bandwidth: bytes of logits read once, B*(2k+1)*V*itemsize, over the
time. On a GPU it also measures the card's copy bandwidth, to express results as a fraction of it.

    python benchmarks/bench_acceptance.py --quick                 # CPU-sized grid
    python benchmarks/bench_acceptance.py --device cuda --dtype bfloat16
Results: a new runs/results/acceptance_<device>_<dtype>-<time>.json unless --output names one (device, dtype,
versions, one row per config/backend); the committed ones live in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from tempspec_engine import BACKEND_NAMES, available_backends, speculative_sample
from tempspec_engine.cli_args import positive_int
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command
from tempspec_engine.models.loading import resolve_device
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json
from tempspec_engine.run_meta import cpu_name, nvidia_driver, package_version
from tempspec_engine.sampling import filters_label, parse_filters
from tempspec_engine.torch_backend import speculative_sample_torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = OneLineParser(prog="bench_acceptance", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8, 64], help="B values (default: 1 8 64)")
    p.add_argument("--lookahead", type=positive_int, nargs="+", default=[1, 4, 8], help="k values (default: 1 4 8)")
    p.add_argument("--vocab", type=positive_int, nargs="+", default=[32000, 49152, 128256],
                   help="V values (default: 32000 49152 128256)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--filters", default="none",
                   help="';'-separated filter presets timed in turn, each none or KEY=VALUE,... with keys top_k, "
                        "top_p, min_p, e.g. 'none;top_p=0.9;top_k=50' (default: %(default)s)")
    p.add_argument("--backends", nargs="+", default=None, choices=list(BACKEND_NAMES),
                   help="default: every available backend plus torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--quick", action="store_true", help="small grid for a CPU: B 1 8, k 1 4, V 32000 49152 "
                   "(replaces --batch/--lookahead/--vocab)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repetitions (default: 100 on GPU, 5 on CPU)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"JSON path (default: a new file {RUNS_DIR}/acceptance_<device>_<dtype>-<time>.json)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.lookahead, args.vocab = [1, 8], [1, 4], [32000, 49152]
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def make_inputs(B, k, V, dtype, device, temperature, seed=0):
    """Draft close to the target (a realistic acceptance pattern), tokens sampled from the draft."""
    g = torch.Generator(device=device).manual_seed(seed)
    draft = torch.randn(B, k, V, device=device, generator=g) * 2
    target = torch.cat([draft + 0.5 * torch.randn(B, k, V, device=device, generator=g),
                        torch.randn(B, 1, V, device=device, generator=g) * 2], dim=1)
    probs = torch.softmax(draft / temperature, dim=-1).reshape(B * k, V)
    tokens = torch.multinomial(probs, 1, generator=g).reshape(B, k)
    uniforms = torch.rand(B, k + 1, device=device, generator=g)
    temp = torch.full((B,), temperature, device=device)
    return draft.to(dtype), target.to(dtype), tokens, temp, uniforms


def time_fn(fn, device, repeats):
    """Median milliseconds of fn() (CUDA events through triton.testing.do_bench on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=max(repeats, 50), return_mode="median"))
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(3):  # warm-up: compilation, allocator, caches
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device):
    """Device-to-device copy bandwidth in GB/s counting bytes read plus written (the practical HBM ceiling)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def environment(device):
    """Versions and hardware (tempspec_engine/run_meta.py), flat: python, torch, platform, triton, device_name, and
    cuda + driver on a GPU or cpu_threads on CPU."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "triton": package_version("triton")}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda, driver=nvidia_driver())
    else:
        info.update(device_name=cpu_name(), cpu_threads=torch.get_num_threads())
    return info


def time_config(variants: dict, inputs: tuple, filters: dict, device, repeats: int, ceiling) -> list:
    """One row per variant for one (B, k, V) and filter preset: median ms, bytes of logits read once, bandwidth,
    speedup over the eager torch backend. torch.compile (of the temperature-only torch path) runs without filters
    only."""
    draft, target, tokens, temp, uniforms = inputs
    B, k, V = draft.shape
    nbytes = B * (2 * k + 1) * V * draft.element_size()
    label, rows, eager_ms = filters_label(filters), [], None
    for name, fn in variants.items():
        if name == "torch.compile":
            if filters:
                continue
            call = (lambda fn=fn: fn(*inputs))
        else:
            call = (lambda fn=fn: fn(draft, target, tokens, temp, None, uniforms, **filters))
        try:
            ms = time_fn(call, device, repeats)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, the others still run
            rows.append({"B": B, "k": k, "V": V, "filters": label, "backend": name, "error": repr(exc)[:300]})
            continue
        eager_ms = ms if name == "torch" else eager_ms
        row = {"B": B, "k": k, "V": V, "filters": label, "backend": name, "time_ms": ms, "bytes": nbytes,
               "bandwidth_gbs": nbytes / (ms * 1e-3) / 1e9}
        if ceiling:
            row["fraction_of_copy_bandwidth"] = row["bandwidth_gbs"] / ceiling
        rows.append(row)
    for row in rows:
        if eager_ms and "time_ms" in row:
            row["speedup_vs_torch_eager"] = eager_ms / row["time_ms"]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("bench_acceptance", lambda: run(args), getattr(args, "debug", False))


def run(args) -> int:
    if args.output:
        check_output_path(args.output, "--output")
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (100 if device.type == "cuda" else 5)
    backends = args.backends or available_backends(device)
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a benchmark
    variants = {name: (lambda name=name: (lambda *a, **kw: speculative_sample(*a, backend=name, validate=False,
                                                                             **kw)))()
                for name in backends}
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)  # one graph per shape
        variants["torch.compile"] = torch.compile(speculative_sample_torch, dynamic=False)

    env = environment(device)
    ceiling = copy_bandwidth_gbs(device)
    rows = []
    configs = list(itertools.product(args.batch, args.lookahead, args.vocab))
    try:
        from tqdm import tqdm

        configs = tqdm(configs, desc="configs", file=sys.stderr)
    except ImportError:
        pass
    presets = [parse_filters(f) for f in args.filters.split(";")]
    for B, k, V in configs:
        inputs = make_inputs(B, k, V, dtype, device, args.temperature)
        speculative_sample(*inputs[:4], uniforms=inputs[4], backend="torch")  # validates the inputs once
        for preset in presets:
            rows += time_config(variants, inputs, preset, device, repeats, ceiling)

    result = {"benchmark": "acceptance", "device": env["device_name"], "dtype": args.dtype,
              "temperature": args.temperature, "environment": env, "copy_bandwidth_gbs": ceiling,
              "timing": "median ms per call; validate=False; uniforms given", "results": rows}
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") or device.type
    out = args.output or fresh_results_path(f"acceptance_{slug}_{args.dtype}")
    write_json(result, out, indent=2)
    print(f"{'B':>4} {'k':>2} {'V':>7} {'filters':>22} {'backend':>14} {'ms':>9} {'GB/s':>8} {'x eager':>8}")
    for r in rows:
        head = f"{r['B']:>4} {r['k']:>2} {r['V']:>7} {r['filters']:>22} {r['backend']:>14}"
        if "time_ms" in r:
            print(f"{head} {r['time_ms']:>9.4f} {r['bandwidth_gbs']:>8.1f} "
                  f"{r.get('speedup_vs_torch_eager', float('nan')):>8.2f}")
        else:
            print(f"{head} ERROR {r['error']}")
    if ceiling:
        print(f"copy bandwidth (read+write): {ceiling:.0f} GB/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
