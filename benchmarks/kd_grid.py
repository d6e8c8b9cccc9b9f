"""KD-temperature x decoding-temperature grid (TempSpec's Figure 2): alpha and speedup of drafts distilled at tau_kd,
decoded at tau_dec, for online and offline distillation, on one or more prompt sets (in- and out-of-domain).

Drafts are directories written by `tempspec-train distill` (their final/ or init/), labelled MODE:TAU:
  python benchmarks/kd_grid.py \
      --draft online:0=runs/kd_online_t0/final --draft online:0.5=runs/kd_online_t0.5/final \
      --draft offline:0=runs/kd_offline_t0/final ... --draft mixture:1=runs/kd_mix/final \
      --draft none=runs/kd_online_t0/init \
      --prompts spec_bench=../shared/data/spec_bench_question.jsonl --prompts gsm8k=../shared/data/gsm8k_test.jsonl \
      --temperatures 0,0.5,1 --out benchmarks/results/kd_grid_cpu.json
Per prompt set it decodes with the target alone and with every draft at every temperature (the engine's sweep),
then writes the JSON (raw results + grids) and, per set and metric, a heatmap PNG with one panel per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.cli_args import lookahead, positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.models.loading import load_target, resolve_device, resolve_dtype  # noqa: E402
from tempspec_engine.prompts import read_prompts  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402
from tempspec_engine.sweep import format_table, parse_temperatures, run_sweep  # noqa: E402
from tempspec_engine.threads import set_threads  # noqa: E402


def parse_draft(text: str) -> Tuple[str, Optional[float], str]:
    """'online:0.5=DIR' -> ('online', 0.5, DIR); 'none=DIR' (the undistilled draft) -> ('none', None, DIR)."""
    label, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--draft {text!r}: use MODE:TAU=DIR (e.g. online:0.5=runs/kd/final) or none=DIR")
    mode, _, tau = label.partition(":")
    return mode, float(tau) if tau else None, path


def build_grids(results: dict, drafts: List[Tuple[str, float, str]]) -> Dict[str, dict]:
    """{mode: {"tau_kd": [...], "tau_dec": [...], "alpha": [[...]], "speedup": [[...]]}} from run_sweep results."""
    by_key = {(r["draft"], r["temperature"]): r for r in results["results"]}
    temps = results["temperatures"]
    grids = {}
    for mode in sorted({m for m, _, _ in drafts}):
        rows = sorted(((tau, path) for m, tau, path in drafts if m == mode), key=lambda r: (r[0] is None, r[0] or 0))
        grid = {"tau_kd": [tau for tau, _ in rows], "tau_dec": temps, "drafts": [p for _, p in rows]}
        for metric in ("alpha", "speedup", "mean_accepted"):
            grid[metric] = [[by_key[(p, t)].get(metric) for t in temps] for _, p in rows]
        grids[mode] = grid
    return grids


def format_grids(grids: Dict[str, dict], metric: str) -> str:
    """A Markdown table of `metric`: one row per (mode, tau_kd), one column per decoding temperature."""
    temps = next(iter(grids.values()))["tau_dec"]
    lines = ["| draft | " + " | ".join(f"T={t:g}" for t in temps) + " |", "| --- |" + " --- |" * len(temps)]
    for mode, g in grids.items():
        for tau, row in zip(g["tau_kd"], g[metric]):
            label = "undistilled" if mode == "none" else f"{mode}, tau_kd={tau:g}"
            lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def plot_grids(grids: Dict[str, dict], title: str, out_stem: Path) -> List[str]:
    """One PNG per metric: a heatmap panel per mode (rows tau_kd, columns tau_dec, values annotated)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = [m for m in grids if m != "none" and len(grids[m]["tau_kd"]) > 0]
    paths = []
    for metric in ("alpha", "speedup"):
        fig = Figure(figsize=(4.2 * max(1, len(modes)), 3.6), dpi=110)
        FigureCanvasAgg(fig)
        for i, mode in enumerate(modes):
            g = grids[mode]
            ax = fig.add_subplot(1, len(modes), i + 1)
            values = [[float("nan") if v is None else v for v in row] for row in g[metric]]
            im = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(g["tau_dec"])), [f"{t:g}" for t in g["tau_dec"]])
            ax.set_yticks(range(len(g["tau_kd"])), [f"{t:g}" if t is not None else "-" for t in g["tau_kd"]])
            ax.set_xlabel("decoding temperature")
            ax.set_ylabel("KD temperature")
            ax.set_title(f"{mode}: {metric}")
            for r, row in enumerate(values):
                for c, v in enumerate(row):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = f"{out_stem}_{metric}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = OneLineParser(prog="kd_grid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", action="append", default=[], help="MODE:TAU=DIR or none=DIR, repeatable")
    ap.add_argument("--prompts", action="append", default=[], help="NAME=JSONL prompt file, repeatable")
    ap.add_argument("--n-prompts", type=positive_int, default=12, help="(default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    ap.add_argument("--temperatures", default="0,0.5,1", help="comma list (default: %(default)s)")
    ap.add_argument("--target", default="default", help="(default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best available)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="(default: %(default)s)")
    ap.add_argument("--k", type=lookahead, default="auto", help="(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: 0, the cores other processes leave free)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON; heatmaps <out>_<set>_{{alpha,speedup}}.png beside it (default: a new file "
                         f"{RUNS_DIR}/kd_grid-<time>.json)")
    ap.add_argument("--report", action="store_true",
                    help="decode nothing: print the Markdown grids of an existing --out JSON")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_command("kd_grid", lambda: run(args), getattr(args, "debug", False))


def run(args) -> int:
    if args.out and not args.report:
        check_output_path(args.out)
    if args.report:
        if not args.out:
            raise ValueError("--report reads the JSON that --out names")
        report = json.loads(Path(args.out).read_text())
        for name, entry in report["sets"].items():
            for metric in ("alpha", "speedup"):
                print(f"### {name}: {metric}\n\n{format_grids(entry['grids'], metric)}\n")
        return 0
    if not args.draft or not args.prompts:
        raise ValueError("give at least one --draft and one --prompts")
    drafts = [parse_draft(d) for d in args.draft]
    sets = [p.partition("=")[::2] for p in args.prompts]
    if any(not name or not path for name, path in sets):
        raise ValueError("--prompts takes NAME=PATH")
    for _, _, path in drafts:
        if not (Path(path) / "tempspec_draft.json").is_file():
            raise ValueError(f"{path} is not a draft directory (no tempspec_draft.json)")
    set_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    temps = parse_temperatures(args.temperatures)
    k = args.k
    target = load_target(args.target, device, dtype)
    out = Path(args.out) if args.out else fresh_results_path("kd_grid")
    report = {"meta": {**collect_meta(device), "target": target.name, "dtype": str(dtype), "k": k,
                       "n_prompts": args.n_prompts, "max_new_tokens": args.max_new_tokens},
              "drafts": [{"mode": m, "tau_kd": t, "path": p} for m, t, p in drafts], "sets": {}}
    written = []
    for name, path in sets:
        results = run_sweep(target, [p for _, _, p in drafts], read_prompts(path, args.n_prompts), temps,
                            args.max_new_tokens, device=device, dtype=dtype, k=k, seed=args.seed)
        grids = build_grids(results, drafts)
        report["sets"][name] = {"prompts_file": Path(path).name, "results": results, "grids": grids}
        print(f"## {name}\n" + format_table(results))
        title = f"{target.name}, {name} prompts, {report['meta']['device_name']}"
        written += plot_grids(grids, title, out.with_suffix("").with_name(f"{out.stem}_{name}"))
        write_json(report, out)  # after every set: no lost work
    print("wrote " + ", ".join([str(out)] + written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
