"""Where one device-loop step spends its time: the kernels (CUDA) or operators (CPU) of --steps eager steps under
torch.profiler, grouped by name, for the target alone and for speculative decoding with --draft at a fixed --k.

The device loop (tempspec_engine/device_loop.py) captures a step as one CUDA graph, which replays the very kernels an
eager step launches, back to back. This script runs the step eagerly (cuda_graphs=False) so that the profiler records
each kernel's own device time; the launch gaps of eager mode are not in those times. On the CPU it reports each
operator's self CPU time instead. It says which kernels to fuse or remove first (DeviceLoop.step_seconds gives the
captured step's time: compare it with time_per_step_us here).

Output JSON (--out), per mode ("target_alone", "speculative"): time_per_step_us (the kernels' device time, or the
operators' CPU time, summed, per step), launches_per_step (kernels, or operators, per step) and the --top names by
time, each with its launches and microseconds per step and its share of the step.

    python benchmarks/profile_step.py --device cuda --out benchmarks/results/profile_step_nvidia-h200.json
    python benchmarks/profile_step.py --device cpu --steps 3 --draft feature:1     # CPU smoke run
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.measure import sync_device  # noqa: E402
from tempspec_engine.models.loading import resolve_dtype  # noqa: E402
from tempspec_engine.results import write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402

PROG = "profile_step"
PROMPT = "Explain in a few sentences why the sky is blue, then give one everyday example of the same effect."


def profile_steps(engine: SpeculativeEngine, prompt_ids, speculative: bool, steps: int, top: int = 30) -> dict:
    """Profiles `steps` eager steps of engine's device loop at batch 1 (the decoder a first generate() call builds).
    Returns {"time_per_step_us", "launches_per_step", "top": [{"name", "launches_per_step", "us_per_step",
    "share"}, ...]} with names sorted by time, most first."""
    engine.generate([prompt_ids], 0.0, 4, speculative=speculative)
    decoder = engine.device_loop._decoders[(1, speculative)]
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        decoder.state.step.zero_()  # (a step reads its uniforms at the step counter: stay within the wave's)
        decoder.step()
        sync_device(engine.device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.state.step.zero_()
                decoder.step()
            sync_device(engine.device)
    times, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if cuda and event.device_type == DeviceType.CUDA:  # a kernel (or a copy / memset) on the device
            times[event.name] += event.time_range.elapsed_us()
            counts[event.name] += 1
        elif not cuda and event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            times[event.name] += event.self_cpu_time_total
            counts[event.name] += event.self_cpu_time_total > 0 or not event.cpu_children
    total = sum(times.values())
    ranked = sorted(times, key=times.get, reverse=True)[:top]
    return {
        "time_per_step_us": total / steps,
        "launches_per_step": sum(counts.values()) / steps,
        "top": [{"name": name[:160], "launches_per_step": counts[name] / steps, "us_per_step": times[name] / steps,
                 "share": times[name] / total if total else 0.0} for name in ranked],
    }


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="(default: %(default)s)")
    p.add_argument("--draft", default="lookup+feature:1",
                   help="draft spec for the speculative mode (models/draft.py) (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=3, help="drafts per step (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=20, help="profiled steps per mode (default: %(default)s)")
    p.add_argument("--top", type=positive_int, default=30, help="names listed per mode (default: %(default)s)")
    p.add_argument("--max-len", type=positive_int, default=512,
                   help="KV-cache length (the step attends over all of it) (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), getattr(args, "debug", False))


def run(args) -> int:
    if args.draft == "none":
        raise ValueError("--draft: the speculative mode needs a draft spec, got 'none'")
    engine = SpeculativeEngine(None, args.draft, device=args.device, dtype=resolve_dtype(args.dtype), k=args.k,
                               max_len=args.max_len, device_loop=True, cuda_graphs=False)
    prompt_ids = engine.encode(PROMPT, chat_template=True)
    result = {"benchmark": "profile_step", "device": str(engine.device), "dtype": args.dtype, "draft": args.draft,
              "k": args.k, "steps": args.steps, "max_len": args.max_len,
              "unit": "device time of the kernels (CUDA) or self CPU time of the operators (CPU), per step",
              "meta": collect_meta(engine.device), "modes": {}}
    for mode, speculative in (("target_alone", False), ("speculative", True)):
        r = result["modes"][mode] = profile_steps(engine, prompt_ids, speculative, args.steps, args.top)
        print(f"{mode}: {r['time_per_step_us']:.0f} us per step in {r['launches_per_step']:.0f} launches")
        for row in r["top"][:12]:
            print(f"  {row['us_per_step']:9.1f} us  {row['launches_per_step']:6.1f} x  {row['share']:6.1%}  "
                  f"{row['name'][:90]}")
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
