"""Step costs at real model shapes with RANDOM weights, and the speculative-decoding speedup they would allow.

Timing only: the weights are random (values do not change the cost of a dense forward), so every speedup this script
prints is a PROJECTION from these timings and an assumed acceptance profile, not a measured generation speedup.

It builds, with the project's own decoder (tempspec_engine/models/llama.py) on the chosen device and dtype:
  target    the --shapes preset's target (llama2-7b: dim 4096, 32 layers, 32 heads / 32 kv heads of 128, MLP 11008,
            vocab 32000)
  draft     a small separate model with the same vocabulary (llama2-7b: Llama-68M, dim 768, 2 layers, 12 heads, MLP
            3072; smollm2-135m: 2 blocks of the default target's own shapes)
  feature   an EAGLE-style feature head of the target's width (tempspec_engine/models/feature_draft.py: one decoder
            block with the target's shapes, fc 2*dim -> dim), attached to the target's embedding and output head
and times, for each batch size B, with a KV cache holding --context positions per row (the engine's calling
conventions: positions per row, kv_len = the last position + 1, an attention mask except for one CPU row):
  target_decode_ms   one target forward of 1 token per row, logits included (the target alone: 1 token per step)
  prefill_ms         one target forward of --context tokens per row from position 0, no logits (a prompt's prefill,
                     the same for every method, SD or not; at B > 1 every row in one forward, where the engine on a
                     CPU prefills each row alone)
  verify_ms[k]       one target forward of k+1 tokens per row (the verification of k drafts), all k+1 logits
  draft_step_ms      one draft forward of 1 token per row, logits included (sampling not included)
  feature_step_ms    one feature-head forward of 1 position per row plus the target's output head on its prediction
and fits the engine's cost model to them (tempspec_engine/adaptive_k.py: what each more token of a forward costs, in
one-row decodes): one slope for every token (verify_slope_fit), and one for the first KNEE more tokens with another
beyond (verify_cost_fit).
Each time is the median of --reps calls after --warmup calls, the device synchronized (measure.sync_device) before and
after every call; eager PyTorch on the CPU, each call replayed as a captured CUDA graph on CUDA (no launch overhead in
the figures, as in the engine's static-shape paths); no torch.compile.

Projection (Leviathan et al. 2023): with per-position acceptance probabilities alpha_1, alpha_2, ... a step with k
drafts yields E(k) = 1 + sum_{i=1..k} prod_{j<=i} alpha_j tokens per row (expected_tokens), costs k draft steps plus
one verification of k+1 tokens, and runs E(k) * target_decode_ms / (k * <kind>_step_ms + verify_ms[k]) times as fast as
the target alone (acceptance and commit overheads ignored). The best k is picked per B, draft kind and profile.
Profiles: --alpha 0.6,0.8 (one constant profile per value) or --profiles FILE, a JSON object
  {"name": [alpha_1, alpha_2, ...], ...}                       the same profiles for both draft kinds, or
  {"draft": {"name": [...], ...}, "feature": {"name": [...]}}  profiles per draft kind;
a profile shorter than k repeats its last value.

    python benchmarks/bench_shapes.py --shapes tiny --batch-sizes 1,2 --ks 1-2 --reps 2        # CPU smoke test
    python benchmarks/bench_shapes.py --device cuda --batch-sizes 1,8,32 --ks 1-8 --context 512 --reps 30
Results: a new runs/results/shapes_<device>_<preset>_<dtype>-<time>.json unless --out names one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.measure import sync_device  # noqa: E402
from tempspec_engine.models.config import ModelConfig  # noqa: E402
from tempspec_engine.models.feature_draft import FeatureDraft, FeatureDraftConfig  # noqa: E402
from tempspec_engine.models.llama import Transformer  # noqa: E402
from tempspec_engine.models.loading import resolve_device  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402

PROG = "bench_shapes"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DRAFT_KINDS = ("draft", "feature")
NOTE = ("PROJECTIONS from random-weight timings: the step times are measured with random weights at the shapes "
        "below; expected tokens per step and speedups are computed from them and the assumed acceptance profiles "
        "(Leviathan et al.), not measured by generating text.")

PRESETS: Dict[str, dict] = {
    "llama2-7b": {
        "target": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                              intermediate_size=11008),
        "draft": ModelConfig(vocab_size=32000, dim=768, n_layers=2, n_heads=12, n_kv_heads=12, head_dim=64,
                             intermediate_size=3072),
        "feature_layers": 1,
    },
    "smollm2-135m": {  # the default pair: SmolLM2-135M-Instruct and a 2-block draft of its width
        "target": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                              intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True),
        "draft": ModelConfig(vocab_size=49152, dim=576, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=64,
                             intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True),
        "feature_layers": 1,
    },
    "tiny": {  # CPU tests
        "target": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                              intermediate_size=128),
        "draft": ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                             intermediate_size=64),
        "feature_layers": 1,
    },
}


# ---------------------------------------------------------------------------------------------------- projection
def expected_tokens(alphas: Sequence[float], k: int) -> float:
    """Expected tokens one speculative step yields per row with k drafts (Leviathan et al. 2023):

        E(k) = 1 + sum_{i=1..k} prod_{j=1..i} alpha_j

    alpha_j: the probability that draft j is accepted given that drafts 1..j-1 were; the 1 is the token the target
    always adds (the correction or the bonus token). A profile shorter than k repeats its last value, so [a] is the
    constant-acceptance case, E(k) = (1 - a^(k+1)) / (1 - a). ValueError for an empty profile, a value outside
    [0, 1] or k < 0."""
    if not alphas:
        raise ValueError("an acceptance profile needs at least one value")
    if any(not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0) for a in alphas):
        raise ValueError(f"acceptance probabilities must lie in [0, 1], got {list(alphas)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    total, prod = 1.0, 1.0
    for i in range(k):
        prod *= alphas[min(i, len(alphas) - 1)]
        total += prod
    return total


def project(alphas: Sequence[float], k: int, draft_step_ms: float, verify_ms: float, target_decode_ms: float) -> dict:
    """One speculative step with k drafts: expected_tokens, step_ms = k * draft_step_ms + verify_ms, and speedup =
    expected_tokens * target_decode_ms / step_ms (tokens per unit time relative to the target alone, which yields
    one token per target_decode_ms)."""
    tokens = expected_tokens(alphas, k)
    step_ms = k * draft_step_ms + verify_ms
    return {"expected_tokens": tokens, "step_ms": step_ms, "speedup": tokens * target_decode_ms / step_ms}


def best_k(alphas: Sequence[float], draft_step_ms: float, verify_ms: Dict[int, float],
           target_decode_ms: float) -> int:
    """The k of verify_ms (k -> ms of verifying k+1 tokens) with the largest projected speedup (ties: smaller k)."""
    return max(sorted(verify_ms), key=lambda k: (project(alphas, k, draft_step_ms, verify_ms[k],
                                                         target_decode_ms)["speedup"], -k))


# ---------------------------------------------------------------------------------------------------- arguments
def int_list(text: str) -> List[int]:
    """'1,8,32' or a range '1-8' (or a mix: '1-4,8') -> sorted distinct integers >= 1 (argparse type)."""
    out = set()
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like '1,8,32' or '1-8', got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like '1,8,32' or '1-8', got {text!r}")
    return sorted(out)


def alpha_list(text: str) -> List[float]:
    """'0.6,0.5' -> [0.6, 0.5], each in [0, 1] (argparse type)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not (0.0 <= a <= 1.0) for a in values):
        raise argparse.ArgumentTypeError(f"expected acceptance probabilities in [0, 1] like '0.6,0.8', got {text!r}")
    return values


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights, activations and KV cache (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--shapes", choices=sorted(PRESETS), default="llama2-7b",
                   help="model shapes: llama2-7b (Llama-2-7B target, Llama-68M draft, 1-block feature head), "
                        "smollm2-135m (the default target's shapes, a 2-block draft and a 1-block head of its width) "
                        "or tiny (CPU tests) (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], metavar="B,...",
                   help="batch sizes, e.g. 1,8,32 (default: 1,8,32)")
    p.add_argument("--ks", type=int_list, default=list(range(1, 9)), metavar="K,...",
                   help="draft lengths k to verify (k+1 tokens each), e.g. 1-8 or 1,2,4 (default: 1-8)")
    p.add_argument("--context", type=positive_int, default=512,
                   help="positions already in each row's KV cache (default: %(default)s)")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed calls per measurement, the median reported (default: 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement (default: %(default)s)")
    p.add_argument("--alpha", type=alpha_list, default=None, metavar="A,...",
                   help="constant per-token acceptance probabilities, one projection each, e.g. 0.6,0.8 "
                        "(default: 0.5,0.7,0.9 unless --profiles is given)")
    p.add_argument("--profiles", type=Path, default=None,
                   help="JSON file of per-position acceptance profiles ({name: [alpha_1, ...]} for both draft kinds, "
                        "or {\"draft\": {...}, \"feature\": {...}}); combined with --alpha when both are given")
    p.add_argument("--seed", type=int, default=0, help="random weights and tokens (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default: a new file {RUNS_DIR}/shapes_<device>_<preset>_<dtype>-<time>.json)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"argument --warmup: expected an integer >= 0, got {args.warmup}")
    return args


def read_profiles(path: Path) -> Dict[str, Dict[str, List[float]]]:
    """{kind: {name: profile}} from a --profiles file (formats in the module docstring); ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of acceptance profiles")
    per_kind = data if set(data) <= set(DRAFT_KINDS) else {kind: data for kind in DRAFT_KINDS}
    out = {}
    for kind, profiles in per_kind.items():
        if not isinstance(profiles, dict):
            raise ValueError(f"{path}: {kind!r} must map profile names to lists of acceptance probabilities")
        for name, alphas in profiles.items():
            if not (isinstance(alphas, list) and alphas and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                                 and 0.0 <= a <= 1.0 for a in alphas)):
                raise ValueError(f"{path}: profile {name!r} must be a non-empty list of numbers in [0, 1]")
        out[kind] = {str(name): [float(a) for a in alphas] for name, alphas in profiles.items()}
    return out


def gather_profiles(args) -> Dict[str, Dict[str, List[float]]]:
    """{kind: {name: profile}} from --alpha (constant profiles, both kinds) and --profiles."""
    out: Dict[str, Dict[str, List[float]]] = {kind: {} for kind in DRAFT_KINDS}
    alphas = args.alpha if args.alpha is not None else ([] if args.profiles else [0.5, 0.7, 0.9])
    for a in alphas:
        for kind in DRAFT_KINDS:
            out[kind][f"alpha={a:g}"] = [a]
    if args.profiles is not None:
        for kind, profiles in read_profiles(args.profiles).items():
            out[kind].update(profiles)
    return out


# ---------------------------------------------------------------------------------------------------- models
def random_module(factory: Callable[[], torch.nn.Module], device, dtype, generator: torch.Generator):
    """factory() built on the meta device, then materialized on `device` in `dtype` with random weights (matrices
    N(0, 0.02), vectors 1): no full-precision copy on the host, fast even at 7B."""
    with torch.device("meta"):
        module = factory()
    module = module.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(1.0)
    return module.eval()


def build_models(preset: dict, device, dtype, seed: int):
    """(target, draft, feature head attached to the target), random weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    target = random_module(lambda: Transformer(preset["target"]), device, dtype, g)
    draft = random_module(lambda: Transformer(preset["draft"]), device, dtype, g)
    fcfg = FeatureDraftConfig.for_target(preset["target"], n_layers=preset["feature_layers"])
    head = random_module(lambda: FeatureDraft(fcfg), device, dtype, g)
    head.attach(target.embed_tokens, target.lm_head)
    return target, draft, head


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device, reps: int, warmup: int) -> dict:
    """{median_ms, min_ms, max_ms} of fn() over `reps` calls after `warmup` untimed ones, the device synchronized
    before and after each timed call. On CUDA fn is captured once as a CUDA graph after the warm-up (run on a side
    stream, as capture wants) and each timed call replays it: the engine's static-shape paths replay graphs, and an
    eager forward of a 7B model at batch 1 spends longer launching its kernels than the GPU spends on them."""
    run = fn
    if torch.device(device).type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        sync_device(device)
        t0 = time.perf_counter()
        run()
        sync_device(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def measure_batch(target, draft, head, B: int, ks: Sequence[int], context: int, device, reps: int, warmup: int,
                  generator: torch.Generator) -> dict:
    """The step costs at batch size B (module docstring): {prefill, target_decode, draft_step, feature_step: time_ms
    dicts, verify: {k: time_ms dict}}. Caches hold context + max(ks) + 1 positions; rows all sit at position
    `context`."""
    max_len = context + max(ks) + 1
    vocab = target.config.vocab_size
    one_row_cpu = B == 1 and torch.device(device).type == "cpu"  # the engine's _eager: no mask for one CPU row
    t_cache = target.new_cache(B, max_len)
    d_cache = draft.new_cache(B, max_len)
    f_cache = head.new_cache(B, max_len)

    def tokens(T):
        return torch.randint(vocab, (B, T), device=device, generator=generator)

    def positions(T):
        return torch.full((B, 1), context, device=device) + torch.arange(T, device=device)

    one_tok, one_pos = tokens(1), positions(1)
    pred = torch.randn(B, 1, head.config.dim, device=device, generator=generator).to(head.fc.weight.dtype)
    out = {}
    with torch.inference_mode():
        prompt, prompt_pos = tokens(context), torch.arange(context, device=device).expand(B, context)
        out["prefill"] = time_ms(lambda: target(prompt, prompt_pos, t_cache, kv_len=context, compute_logits=False,
                                                from_start=True), device, reps, warmup)
        out["target_decode"] = time_ms(lambda: target(one_tok, one_pos, t_cache, kv_len=context + 1,
                                                      last_query=one_row_cpu), device, reps, warmup)
        verify = {}
        for k in ks:
            tok, pos = tokens(k + 1), positions(k + 1)
            verify[k] = time_ms(lambda: target(tok, pos, t_cache, kv_len=context + k + 1), device, reps, warmup)
        out["verify"] = verify
        out["draft_step"] = time_ms(lambda: draft(one_tok, one_pos, d_cache, kv_len=context + 1,
                                                  last_query=one_row_cpu), device, reps, warmup)
        out["feature_step"] = time_ms(lambda: head.logits(head(pred, one_tok, one_pos, f_cache,
                                                               kv_len=context + 1)[:, 0]), device, reps, warmup)
    del t_cache, d_cache, f_cache
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------- report
def timing_rows(measured: Dict[int, dict]) -> List[dict]:
    """One row per (B, k): the step costs in ms (decode, draft and feature steps repeat across a B's rows)."""
    rows = []
    for B, m in measured.items():
        for k, v in m["verify"].items():
            rows.append({"B": B, "k": k, "prefill_ms": m["prefill"]["median_ms"],
                         "target_decode_ms": m["target_decode"]["median_ms"],
                         "verify_ms": v["median_ms"], "verify_over_decode": v["median_ms"] /
                         m["target_decode"]["median_ms"], "draft_step_ms": m["draft_step"]["median_ms"],
                         "feature_step_ms": m["feature_step"]["median_ms"],
                         "spread_ms": {"prefill": [m["prefill"]["min_ms"], m["prefill"]["max_ms"]],
                                       "target_decode": [m["target_decode"]["min_ms"], m["target_decode"]["max_ms"]],
                                       "verify": [v["min_ms"], v["max_ms"]],
                                       "draft_step": [m["draft_step"]["min_ms"], m["draft_step"]["max_ms"]],
                                       "feature_step": [m["feature_step"]["min_ms"], m["feature_step"]["max_ms"]]}})
    return rows


KNEE = 4  # the more tokens of a forward that verify_cost_fit prices at its first slope


def _cost_points(timings: List[dict]) -> List[tuple]:
    """(n - 1, cost - 1) for the timed forwards of n > 1 tokens, all rows together (the B-row decodes, n = B, and the
    verifications, n = B (k + 1)), the cost in one-row decodes; [] without a B = 1 decode to measure them against."""
    one = next((t["target_decode_ms"] for t in timings if t["B"] == 1), None)
    points = {(t["B"], t["B"]): t["target_decode_ms"] for t in timings}
    points.update({(t["B"], t["B"] * (t["k"] + 1)): t["verify_ms"] for t in timings})
    return [(n - 1, ms / one - 1) for (_, n), ms in points.items() if n > 1] if one else []


def _through_origin(xy: List[tuple]) -> float:
    return max(0.0, sum(x * y for x, y in xy) / sum(x * x for x, _ in xy))


def verify_slope_fit(timings: List[dict]):
    """The flat slope of the engine's seeded cost model (tempspec_engine/adaptive_k.py: a forward over n tokens, all
    rows together, costs 1 + slope (n - 1) one-row decodes; the engine's verify_slope), least squares through the
    origin over _cost_points; None without points."""
    xy = _cost_points(timings)
    return _through_origin(xy) if xy else None


def verify_cost_fit(timings: List[dict]):
    """The cost model with a knee (adaptive_k.py: 1 + slope min(n - 1, KNEE) + beyond max(0, n - 1 - KNEE), the form
    of adaptive_k.VERIFY_COSTS): {"slope", "knee", "beyond"}, each slope fitted through its segment's origin; None
    unless both segments have points."""
    xy = _cost_points(timings)
    few, more = [p for p in xy if p[0] <= KNEE], [p for p in xy if p[0] > KNEE]
    if not few or not more:
        return None
    slope = _through_origin(few)
    return {"slope": slope, "knee": KNEE,
            "beyond": _through_origin([(x - KNEE, y - slope * KNEE) for x, y in more])}


def projection_rows(timings: List[dict], profiles: Dict[str, Dict[str, List[float]]]):
    """(rows: one per B, k, draft kind, profile; best: one per B, draft kind, profile, at its best k)."""
    rows, best = [], []
    by_b: Dict[int, List[dict]] = {}
    for t in timings:
        by_b.setdefault(t["B"], []).append(t)
    for B, ts in by_b.items():
        decode = ts[0]["target_decode_ms"]
        verify = {t["k"]: t["verify_ms"] for t in ts}
        for kind in DRAFT_KINDS:
            step = ts[0][f"{kind}_step_ms"]
            for name, alphas in profiles[kind].items():
                for k in sorted(verify):
                    p = project(alphas, k, step, verify[k], decode)
                    rows.append({"B": B, "draft_kind": kind, "profile": name, "k": k, **p,
                                 "tokens_per_s": B * p["expected_tokens"] / p["step_ms"] * 1e3,
                                 "target_tokens_per_s": B / decode * 1e3})
                k = best_k(alphas, step, verify, decode)
                best.append({"B": B, "draft_kind": kind, "profile": name, "best_k": k,
                             **project(alphas, k, step, verify[k], decode)})
    return rows, best


def print_report(result: dict) -> None:
    print(f"random-weight step times, ms (median of {result['reps']}): {result['preset']} {result['dtype']} on "
          f"{result['device']}, context {result['context']}")
    ks = result["ks"]
    print(f"{'B':>4} {'prefill':>9} {'decode':>9} {'draft':>9} {'feature':>9}  "
          + " ".join(f"{'v k=' + str(k):>9}" for k in ks))
    seen = set()
    for t in result["timings"]:
        if t["B"] in seen:
            continue
        seen.add(t["B"])
        verify = {r["k"]: r["verify_ms"] for r in result["timings"] if r["B"] == t["B"]}
        print(f"{t['B']:>4} {t['prefill_ms']:>9.3f} {t['target_decode_ms']:>9.3f} {t['draft_step_ms']:>9.3f} "
              f"{t['feature_step_ms']:>9.3f}  "
              + " ".join(f"{verify[k]:>9.3f}" for k in ks))
    if result["verify_slope_fit"] is not None:
        print(f"cost-model slope per verified token (fit): {result['verify_slope_fit']:.3f} (the engine's "
              f"verify_slope, --verify-slope of tempspec generate)")
    fit = result["verify_cost_fit"]
    if fit is not None:
        print(f"with a knee: {fit['slope']:.3f} per token for the first {fit['knee']} more, {fit['beyond']:.3f} beyond "
              f"(the form of tempspec_engine/adaptive_k.py VERIFY_COSTS)")
    print("PROJECTED speedup over the target alone (random-weight timings x assumed acceptance; NOT measured):")
    print(f"{'B':>4} {'kind':>8} {'profile':>16} {'best k':>6} {'tok/step':>8} {'step ms':>9} {'speedup':>8}")
    for b in result["best"]:
        print(f"{b['B']:>4} {b['draft_kind']:>8} {b['profile'][:16]:>16} {b['best_k']:>6} "
              f"{b['expected_tokens']:>8.3f} {b['step_ms']:>9.3f} {b['speedup']:>8.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, lambda: run(args), getattr(args, "debug", False))


def run(args) -> int:
    if args.out:
        check_output_path(args.out)
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    reps = args.reps or (30 if device.type == "cuda" else 5)
    profiles = gather_profiles(args)
    preset = PRESETS[args.shapes]
    torch.manual_seed(args.seed)
    target, draft, head = build_models(preset, device, dtype, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    measured = {}
    for B in args.batch_sizes:
        measured[B] = measure_batch(target, draft, head, B, args.ks, args.context, device, reps, args.warmup, g)
        print(f"B={B}: measured", file=sys.stderr, flush=True)
    timings = timing_rows(measured)
    for t in timings:
        for key in ("prefill_ms", "target_decode_ms", "verify_ms", "draft_step_ms", "feature_step_ms"):
            if not (math.isfinite(t[key]) and t[key] > 0):
                raise ValueError(f"B={t['B']} k={t['k']}: {key} = {t[key]} is not a positive time")
    projections, best = projection_rows(timings, profiles)
    meta = collect_meta(device)
    result = {
        "benchmark": "shapes",
        "kind": "projection from random-weight timings",
        "note": NOTE,
        "device": meta["device_name"],
        "dtype": dtype_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "preset": args.shapes,
        "shapes": {"target": dataclasses.asdict(preset["target"]), "draft": dataclasses.asdict(preset["draft"]),
                   "feature": dataclasses.asdict(head.config)},
        "params": {"target": n_params(target), "draft": n_params(draft),
                   "feature": n_params(head), "feature_shares": "the target's embedding and output head"},
        "context": args.context, "batch_sizes": args.batch_sizes, "ks": args.ks, "reps": reps, "warmup": args.warmup,
        "seed": args.seed,
        "timing": "median ms of reps calls after warmup calls, device synchronized before and after each call; eager "
                  "PyTorch on the CPU, each call replayed as a captured CUDA graph on CUDA; no torch.compile; logits "
                  "included, sampling and acceptance not",
        "projection": "expected_tokens = 1 + sum_{i<=k} prod_{j<=i} alpha_j (a profile shorter than k repeats its last "
                      "value); step_ms = k * <kind>_step_ms + verify_ms[k]; speedup = expected_tokens * "
                      "target_decode_ms / step_ms",
        "profiles": profiles,
        "meta": meta,
        "timings": timings,
        "verify_slope_fit": verify_slope_fit(timings),
        "verify_cost_fit": verify_cost_fit(timings),
        "projections": projections,
        "best": best,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-") or device.type
    out = args.out or fresh_results_path(f"shapes_{slug}_{args.shapes}_{dtype_name}")
    write_json(result, out)
    print_report(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
