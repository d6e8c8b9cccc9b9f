"""Temperature sweep: acceptance and speedup of speculative decoding against the decoding temperature.

For every temperature, the prompt set is decoded by the target alone (the engine's speculative=False mode: the
baseline, measured once per temperature) and by speculative decoding with each draft. Methods run interleaved
prompt chunk by prompt chunk, with the same seeds, so load from other processes falls on all of them alike.
Per temperature and draft the results hold:
  alpha            accepted / (accepted + rejections), the empirical per-token acceptance rate
  alpha_se         its standard error, clustered by prompt (measure.alpha_se: a prompt's tokens are not independent)
  acceptance_by_position   per draft position i: position_accepted[i] / position_proposed[i], the share of
                   position-i proposals accepted (None where nothing was proposed at i)
  conditional_acceptance_by_position   position_accepted[i] / position_reached[i]: position i's acceptance given
                   every earlier position accepted; with the raw counts position_proposed, _accepted and _reached
  mean_accepted    accepted draft tokens per step (tokens_per_step = this + 1 unless EOS cut a step short)
  sd_tokens_per_s, target_tokens_per_s   generated tokens over the wall seconds of the whole prompt set
  speedup          sd_tokens_per_s / target_tokens_per_s
  speedup_ci95     its 95% percentile-bootstrap interval over the prompt chunks (paired; measure.speedup_interval)
  wall_time_s      wall seconds of the speculative runs (target_wall_time_s: of the baseline)
  draft_time_s, target_time_s   seconds of the draft and target steps, each step once (tempspec_engine/measure.py)
The JSON also records the hardware, dtype, versions and command line; `plot_sweep` draws speedup and alpha against
temperature, one line per draft (matplotlib, Agg backend).

Used by benchmarks/temperature_sweep.py and `tempspec sweep` (add_sweep_parser / sweep_command).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from tempspec_engine.cli_args import (DRAFT_FORMS, add_model_arguments, add_sampling_arguments, positive_int,
                                      sampling_kwargs, seed)
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command
from tempspec_engine.measure import (acceptance_by_position, add_figures, alpha_se, speedup_interval,
                                    timed_generate)
from tempspec_engine.prompts import read_prompts
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json
from tempspec_engine.run_meta import collect_meta

FULL_TEMPERATURES = [round(0.1 * i, 1) for i in range(11)]  # 0, 0.1, ..., 1.0
QUICK_TEMPERATURES = [0.0, 0.25, 0.5, 0.75, 1.0]
MAX_TEMPERATURE = 2.0
MAX_SWEEP_POINTS = 1000  # a start:stop:step range longer than this is a typo, not a sweep
# the strongest shipped drafts of each kind (docs/temperature_study.md): n-gram lookup, the best separate draft
# model, the feature heads distilled at KD temperatures 0 and 1, and the engine's default (lookup in front of feature:1)
DEFAULT_DRAFTS = ["lookup", "distilled:1", "feature:0", "feature:1", "lookup+feature:1"]
# --quick: under 10 minutes on a 2-core CPU with the default models (measured: docs/temperature_study.md)
QUICK = dict(n_prompts=6, max_new_tokens=64)
FULL = dict(n_prompts=32, max_new_tokens=128)


def parse_temperatures(text: str) -> List[float]:
    """'0,0.5,1' or a range 'start:stop:step' (stop included) -> sorted unique temperatures in [0, 2]."""
    text = text.strip()
    form = "use numbers, as a comma list (0,0.5,1) or start:stop:step (0:1:0.25)"
    ranged = ":" in text
    parts = text.split(":") if ranged else [x for x in text.split(",") if x.strip()]
    if ranged and (len(parts) != 3 or "," in text):
        raise ValueError(f"--temperatures {text!r}: {form}")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"--temperatures {text!r}: {form}") from None
    if ranged:
        start, stop, step = values
        if not all(math.isfinite(v) for v in values) or not step > 0:
            raise ValueError(f"--temperatures {text!r}: start and stop must be finite and step > 0")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > MAX_SWEEP_POINTS:
            raise ValueError(f"--temperatures {text!r} gives {count} temperatures, more than {MAX_SWEEP_POINTS}")
        temps = [round(start + i * step, 6) for i in range(count)]
    else:
        temps = values
    if not temps:
        raise ValueError("no temperatures given")
    bad = [t for t in temps if not (0.0 <= t <= MAX_TEMPERATURE)]
    if bad:
        raise ValueError(f"temperatures must lie in [0, {MAX_TEMPERATURE}], got {bad}")
    return sorted(set(temps))


# ------------------------------------------------------------------------------------------------ measuring
def _run_chunk(engine, prompts, temperature, max_new, speculative, seed, sampling: dict) -> dict:
    """Summed figures of one chunk of prompts decoded as one batch (tempspec_engine/measure.py: timed_generate)."""
    _, figures = timed_generate(engine, prompts, temperature, max_new, speculative=speculative,
                                batch_size=len(prompts), seed=seed, **sampling)
    return figures


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def _entry(draft: str, temperature: float, sd: dict, base: dict, sd_parts: list, base_parts: list) -> dict:
    """One result row from the summed figures of a draft and of the baseline at one temperature, and their
    (tokens, seconds) per prompt chunk."""
    sd_tps, base_tps = _ratio(sd["tokens"], sd["seconds"]), _ratio(base["tokens"], base["seconds"])
    return {"draft": draft, "temperature": temperature,
            "alpha": _ratio(sd["accepted"], sd["accepted"] + sd["rejections"]),
            "alpha_se": alpha_se(sd["accepted"], sd["rejections"], sd.get("by_request")),
            "acceptance_by_position": acceptance_by_position(sd.get("position_accepted", []),
                                                             sd.get("position_proposed", [])),
            "conditional_acceptance_by_position": acceptance_by_position(sd.get("position_accepted", []),
                                                                         sd.get("position_reached", [])),
            "mean_accepted": _ratio(sd["accepted"], sd["steps"]),
            "tokens_per_step": _ratio(sd["tokens"], sd["steps"]),
            "sd_tokens_per_s": sd_tps, "target_tokens_per_s": base_tps,
            "speedup": _ratio(sd_tps, base_tps) if sd_tps and base_tps else None,
            "speedup_ci95": speedup_interval(sd_parts, base_parts),
            "wall_time_s": sd["seconds"], "target_wall_time_s": base["seconds"],
            "tokens": sd["tokens"], "target_tokens": base["tokens"], "steps": sd["steps"],
            "accepted": sd["accepted"], "rejections": sd["rejections"],
            "position_proposed": list(sd.get("position_proposed", [])),
            "position_accepted": list(sd.get("position_accepted", [])),
            "position_reached": list(sd.get("position_reached", [])),
            "by_request": sd.get("by_request", []),
            "draft_time_s": sd["draft_time_s"], "target_time_s": sd["target_time_s"]}


def _progress(total: int, enabled: bool):
    """A tqdm bar (to stderr) when enabled and tqdm is installed, else a do-nothing stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


def run_sweep(target, drafts: Sequence[str], prompts: Sequence[Union[str, Sequence[int]]],
              temperatures: Sequence[float], max_new_tokens: int = 48, *, device=None, dtype=None,
              k: Union[int, str] = "auto", batch_size: int = 1, seed: int = 0, chat_template: bool = True,
              max_len: Optional[int] = None, progress: bool = True, warmup: bool = True,
              allow_download: bool = False, sampling: Optional[dict] = None) -> dict:
    """Decodes `prompts` at every temperature with the target alone and with each draft; returns the results dict
    (see the module docstring; `meta` holds the run's settings, not yet the hardware: see `collect_meta`).

    target: anything SpeculativeEngine accepts (a LoadedModel is loaded once and shared by all engines).
    prompts: text (chat template applied unless chat_template=False) or token-id lists. Prompts that do not fit the
    KV cache (prompt + max_new_tokens + lookahead + 1 > max_len) are skipped and counted in meta.
    sampling: generate()'s filter keywords (top_k, top_p, min_p, lenience, filter_draft) for every run.
    """
    from tempspec_engine.engine import SpeculativeEngine
    from tempspec_engine.models.loading import LoadedModel, load_target, resolve_device, resolve_dtype

    if not drafts:
        raise ValueError("give at least one draft")
    sampling = dict(sampling or {})
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) or torch.bfloat16
    t0 = time.perf_counter()
    if not isinstance(target, (LoadedModel, torch.nn.Module)):
        target = load_target(target, device, dtype, allow_download)
    kw = dict(device=device, dtype=dtype, max_batch_size=batch_size, max_len=max_len, allow_download=allow_download)
    baseline = SpeculativeEngine(target, "none", **kw)
    engines = {d: SpeculativeEngine(baseline.target, d, k=k, **kw) for d in drafts}
    load_s = time.perf_counter() - t0

    lookahead = max(e.lookahead for e in engines.values())
    ids = [baseline.encode(p, chat_template=chat_template and isinstance(p, str)) for p in prompts]  # ids pass as is
    fits = [p for p in ids if p and len(p) + max_new_tokens + lookahead + 1 <= baseline.max_len]
    if not fits:
        raise ValueError(f"no prompt fits the KV cache (max_len {baseline.max_len}, max_new_tokens {max_new_tokens})")
    chunks = [fits[i:i + batch_size] for i in range(0, len(fits), batch_size)]

    if warmup:  # allocations, lazy weight pages, CUDA kernels and graphs; not timed
        for chunk in {len(c): c for c in chunks}.values():  # each batch size once (CUDA graphs are per size)
            baseline.generate(chunk, 0.0, 4, speculative=False, batch_size=len(chunk))
            for eng in engines.values():
                eng.generate(chunk, 0.0, 4, batch_size=len(chunk))

    bar = _progress(len(temperatures) * len(chunks) * (1 + len(engines)), progress)
    baselines, results = [], []
    start = time.perf_counter()
    try:
        for T in temperatures:
            base_sum, sd_sums = {}, {d: {} for d in engines}
            base_parts, sd_parts = [], {d: [] for d in engines}  # (tokens, seconds) per chunk
            for c, chunk in enumerate(chunks):
                chunk_seed = seed + 1000 * c
                part = _run_chunk(baseline, chunk, T, max_new_tokens, False, chunk_seed, sampling)
                add_figures(base_sum, part)
                base_parts.append((part["tokens"], part["seconds"]))
                bar.update()
                for d, eng in engines.items():
                    part = _run_chunk(eng, chunk, T, max_new_tokens, True, chunk_seed, sampling)
                    add_figures(sd_sums[d], part)
                    sd_parts[d].append((part["tokens"], part["seconds"]))
                    bar.update()
            baselines.append({"temperature": T, "tokens": base_sum["tokens"], "wall_time_s": base_sum["seconds"],
                              "tokens_per_s": _ratio(base_sum["tokens"], base_sum["seconds"])})
            for d in engines:
                results.append(_entry(d, T, sd_sums[d], base_sum, sd_parts[d], base_parts))
            best = max(results[-len(engines):], key=lambda r: r["speedup"] or 0.0)
            bar.set_postfix_str(f"T={T:g} best {best['draft']} x{best['speedup'] or 0:.2f}")
    finally:
        bar.close()
    meta = {"target": baseline.target.name, "drafts": list(drafts), "device": str(device), "dtype": str(dtype),
            "k": k, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed,
            "chat_template": chat_template, "n_prompts": len(fits), "n_prompts_skipped": len(ids) - len(fits),
            "prompt_tokens_mean": sum(map(len, fits)) / len(fits), "model_load_s": load_s,
            "sweep_wall_time_s": time.perf_counter() - start, "sampling": sampling}
    return {"meta": meta, "temperatures": list(temperatures), "drafts": list(drafts), "baseline": baselines,
            "results": results}


# ------------------------------------------------------------------------------------------------ plotting
def _error_bars(rows: List[dict], key: str):
    """[[below...], [above...]] of the 95% intervals of `key` (alpha: 1.96 standard errors; speedup: its
    speedup_ci95) for matplotlib's yerr; None when a row lacks one (results of older versions)."""
    lo, hi = [], []
    for r in rows:
        if key == "alpha" and r.get("alpha_se") is not None:
            lo.append(1.96 * r["alpha_se"])
            hi.append(1.96 * r["alpha_se"])
        elif key == "speedup" and r.get("speedup_ci95"):
            lo.append(max(0.0, r["speedup"] - r["speedup_ci95"][0]))
            hi.append(max(0.0, r["speedup_ci95"][1] - r["speedup"]))
        else:
            return None
    return [lo, hi]


def plot_sweep(results: dict, out_stem: Union[str, Path]) -> List[str]:
    """Writes <out_stem>_speedup.png and <out_stem>_alpha.png (one line per draft, with 95% intervals where the
    results have them); returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot's global state
    from matplotlib.figure import Figure

    meta = results.get("meta", {})
    title = f"{meta.get('target', 'target')} on {meta.get('device_name', meta.get('device', '?'))}, " \
            f"{str(meta.get('dtype', '')).replace('torch.', '')}"
    paths = []
    for key, label, baseline_line in (("speedup", "speedup over the target alone", 1.0),
                                      ("alpha", "acceptance rate alpha", None)):
        fig = Figure(figsize=(6.4, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for draft in results["drafts"]:
            rows = [r for r in results["results"] if r["draft"] == draft and r[key] is not None]
            ax.errorbar([r["temperature"] for r in rows], [r[key] for r in rows], yerr=_error_bars(rows, key),
                        marker="o", capsize=2, label=draft)
        if baseline_line is not None:
            ax.axhline(baseline_line, color="grey", linestyle="--", linewidth=1, label="target alone")
        if key == "alpha":
            ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("temperature")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{out_stem}_{key}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def write_results(results: dict, out: Union[str, Path], plots: bool = True) -> List[str]:
    """Writes the JSON (atomically) and, with plots, the PNGs beside it; returns all paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        stem = out.with_suffix("") if out.suffix == ".json" else out
        written = plot_sweep(results, stem)
        results["plots"] = [os.path.basename(p) for p in written]
    write_json(results, out)
    return [str(out)] + written


def format_table(results: dict) -> str:
    """A Markdown table: one row per temperature and draft; alpha with its 95% half-width (1.96 standard errors) and
    speedup with its 95% bootstrap interval where the results hold them."""
    lines = ["| T | draft | alpha ± 95% | accepted/step | SD tok/s | target tok/s | speedup [95% interval] | SD wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(x, digits=2):
        return "n/a" if x is None else f"{x:.{digits}f}"

    for r in results["results"]:
        alpha = f(r["alpha"]) + (f" ± {1.96 * r['alpha_se']:.2f}" if r.get("alpha_se") is not None else "")
        ci = r.get("speedup_ci95")
        speedup = f(r["speedup"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r['temperature']:g} | {r['draft']} | {alpha} | {f(r['mean_accepted'])} | "
                     f"{f(r['sd_tokens_per_s'], 1)} | {f(r['target_tokens_per_s'], 1)} | {speedup} | "
                     f"{f(r['wall_time_s'], 1)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafts", default=";".join(DEFAULT_DRAFTS),
                   help=f"';'-separated draft specs, each {DRAFT_FORMS} (default: %(default)s)")
    p.add_argument("--prompts", default=None,
                   help="JSONL prompt file (Spec-Bench `turns`, Alpaca `instruction`/`input`, GSM8K `question`, or "
                        "`prompt`; default: the 16 built-in prompts)")
    p.add_argument("--n-prompts", type=positive_int, default=None,
                   help=f"prompts to use, evenly spaced over the file (default: {FULL['n_prompts']}; --quick: "
                        f"{QUICK['n_prompts']})")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"new tokens per prompt (default: {FULL['max_new_tokens']}; --quick: "
                        f"{QUICK['max_new_tokens']})")
    p.add_argument("--temperatures", default=None,
                   help=f"comma list or start:stop:step, each in [0, {MAX_TEMPERATURE:g}] (default: 0:1:0.1; "
                        "--quick: 0:1:0.25)")
    p.add_argument("--quick", action="store_true",
                   help="fewer temperatures, prompts and tokens: minutes on a laptop CPU (default: off)")
    add_sampling_arguments(p)
    add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="requests decoded together (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, help="(default: %(default)s)")
    p.add_argument("--no-chat", action="store_true", help="use prompts as raw text (no chat template) (default: off)")
    p.add_argument("--out", default=None,
                   help=f"results JSON (default: a new file {RUNS_DIR}/sweep_<device>_<dtype>[_quick]-<time>.json, "
                        "so that no earlier result is overwritten); PNGs <out>_speedup.png and <out>_alpha.png beside "
                        "it")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `sweep` to a `tempspec` subparsers object (from ArgumentParser.add_subparsers)."""
    p = subparsers.add_parser("sweep", help="measure acceptance and speedup against temperature",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_debug_flag(p)
    return p


def default_out(device: torch.device, dtype: torch.dtype, quick: bool, results_dir: str = RUNS_DIR) -> str:
    """A fresh results path for this sweep (see tempspec_engine/results.py)."""
    stem = f"sweep_{device.type}_{str(dtype).replace('torch.', '')}{'_quick' if quick else ''}"
    return str(fresh_results_path(stem, results_dir))


def sweep_command(args, results_dir: str = RUNS_DIR, out=None) -> int:
    """Runs the sweep for parsed arguments, writes JSON and PNGs, prints the table; returns the exit status."""
    from tempspec_engine.models.loading import resolve_device, resolve_dtype
    from tempspec_engine.threads import set_threads

    out = out or sys.stdout
    set_threads(args.threads)
    preset = QUICK if args.quick else FULL
    temps = parse_temperatures(args.temperatures) if args.temperatures else (
        QUICK_TEMPERATURES if args.quick else FULL_TEMPERATURES)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or torch.bfloat16
    drafts = [d.strip() for d in args.drafts.split(";") if d.strip()]
    if not drafts:
        raise ValueError(f"--drafts {args.drafts!r} names no draft")
    path = args.out or default_out(device, dtype, args.quick, results_dir)
    check_output_path(path)
    prompts = read_prompts(args.prompts, args.n_prompts or preset["n_prompts"])
    results = run_sweep(args.target, drafts, prompts, temps, args.max_new_tokens or preset["max_new_tokens"],
                        device=device, dtype=dtype, k=args.k, batch_size=args.batch_size, seed=args.seed,
                        chat_template=not args.no_chat, progress=not args.no_progress,
                        allow_download=args.allow_download, sampling=sampling_kwargs(args))
    results["meta"].update(collect_meta(device), quick=args.quick,
                           prompts_file=os.path.basename(args.prompts) if args.prompts else "built-in")
    written = write_results(results, path, plots=not args.no_plots)
    out.write(format_table(results) + "\n")
    out.write("wrote " + ", ".join(written) + "\n")
    return 0


def main(argv: Optional[List[str]] = None, results_dir: str = RUNS_DIR) -> int:
    ap = OneLineParser(prog="temperature_sweep", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_command("temperature_sweep", lambda: sweep_command(args, results_dir), getattr(args, "debug", False))
