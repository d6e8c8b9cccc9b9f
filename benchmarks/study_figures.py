"""Figures of the temperature study (docs/temperature_study.md) that the sweep and the KD grid do not draw themselves.

Each reads result JSON files written by the project's benchmarks and writes one PNG (matplotlib, Agg backend):

  positions  acceptance by draft position with a 95% binomial interval, from a sweep JSON (benchmarks/
             temperature_sweep.py): given the earlier positions accepted (position_accepted / position_reached), or,
             for sweeps older than that count, the share of proposals accepted (position_accepted /
             position_proposed); one panel per temperature, one line per draft:
               python benchmarks/study_figures.py positions benchmarks/results/study_f1_sweep_cpu_bfloat16.json \
                   --temperatures 0,0.5,1 --out benchmarks/results/study_f7_positions_cpu.png
  batch      speedup over the target alone against batch size, from bench_engine JSON files (benchmarks/
             bench_engine.py, one batch size or several each), one panel per temperature (--temperatures: which),
             one line per method:
               python benchmarks/study_figures.py batch engine_b1.json engine_b4.json engine_b8.json --out X.png
  lenience   the lossy-acceptance trade-off from a bench_engine JSON run with --lenience: speedup against the text's
             mean negative log-likelihood under the target (target_nll), one series per generation setting, points
             labelled with their lenience:
               python benchmarks/study_figures.py lenience benchmarks/results/engine_cpu_filters_lenience.json \
                   --out benchmarks/results/study_f5_lenience_cpu.png
  recipes    decoding alpha (95% binomial interval) of drafts that differ in one recipe choice (data source, online
             or offline, divergence), from a KD-grid JSON (benchmarks/kd_grid.py, drafts labelled LABEL:TAU): one
             panel per prompt set, one group of bars per decoding temperature, one bar per draft label:
               python benchmarks/study_figures.py recipes benchmarks/results/study_f5_recipes_cpu_bfloat16.json \
                   --out benchmarks/results/study_f5_recipes_cpu_bfloat16.png
  temperatures  speedup over the target alone and alpha (95% interval, 1.96 x alpha_se) against the decoding
             temperature, from one bench_engine JSON at one batch size (--batch), one line per lossless method
             (Hugging Face rows included in the speedup panel):
               python benchmarks/study_figures.py temperatures \
                   benchmarks/results/engine_cpu_feature_heads_jsd_batch1.json \
                   --out benchmarks/results/engine_cpu_feature_heads_jsd_batch1.png
Every figure's title names the device the numbers were measured on (the JSON's meta.device_name).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.sweep import parse_temperatures  # noqa: E402

LENIENT = re.compile(r"@([0-9.]+)$")  # bench_engine's method suffix of a lossy run: tempspec_sd[<draft>]@<eps>
TEMPSPEC = "tempspec_sd["  # bench_engine's tempspec methods: tempspec_sd[<draft>], then any suffix


def lossless_row(r: dict, settings: str) -> bool:
    """Whether a bench_engine result row is a lossless method's (not a lossy @eps run, not a draft left unfiltered
    with /target-only) under generation settings `settings`, with a speedup."""
    return (not LENIENT.search(r["method"]) and not r["method"].endswith("/target-only")
            and r.get("settings", "none") == settings and r.get("speedup_vs_target_only") is not None)


def method_label(method: str) -> str:
    """A tempspec method's draft spec and any variant (tempspec_sd[<draft>]/<variant> -> <draft>/<variant>); other
    methods keep their name."""
    if not method.startswith(TEMPSPEC):
        return method
    draft, _, suffix = method[len(TEMPSPEC):].rpartition("]")
    return draft + suffix


def _load(path):
    """The parsed JSON of `path`; ValueError naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None


def read_json(path) -> dict:
    """A results JSON (an object with a "results" list); ValueError naming the file when it is missing, not JSON or
    not results."""
    data = _load(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a results file of the sweep or bench_engine (no 'results' list)")
    return data


def _figure(panels: int, width: float = 4.4, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig, title: str, out) -> str:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return str(out)


def _device(meta: dict) -> str:
    return str(meta.get("device_name") or meta.get("device") or "unknown device")


# ------------------------------------------------------------------------------------------------ positions
def conditional(sweep: dict) -> bool:
    """Whether a sweep's results count the reached positions (position_reached: newer sweeps), so that acceptance by
    position can be conditional on the earlier positions' acceptance."""
    return all("position_reached" in r for r in sweep["results"])


def position_rows(sweep: dict, temperature: float) -> Dict[str, List[tuple]]:
    """{draft: [(position 1.., acceptance, 95% half-width), ...]} at one temperature of a sweep's results, over the
    positions where something was proposed. Acceptance is position_accepted / position_reached (given every earlier
    position accepted) where the results count reached positions, else position_accepted / position_proposed (the
    share of proposals accepted, which also needs the earlier positions accepted)."""
    denominator = "position_reached" if conditional(sweep) else "position_proposed"
    out = {}
    for r in sweep["results"]:
        if abs(r["temperature"] - temperature) > 1e-9:
            continue
        rows = []
        for i, (a, n) in enumerate(zip(r.get("position_accepted", []), r.get(denominator, []))):
            if n:
                x = a / n
                rows.append((i + 1, x, 1.96 * math.sqrt(x * (1 - x) / n)))
        out[r["draft"]] = rows
    return out


def plot_positions(sweep: dict, temperatures: Sequence[float], out) -> str:
    temps = [t for t in temperatures if any(abs(r["temperature"] - t) < 1e-9 for r in sweep["results"])]
    missing = sorted(set(temperatures) - set(temps))
    if missing:
        raise ValueError(f"the sweep has no results at temperature(s) {missing}; it has {sweep['temperatures']}")
    fig, axes = _figure(len(temps))
    for ax, t in zip(axes, temps):
        for draft, rows in position_rows(sweep, t).items():
            if rows:
                ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], marker="o",
                            capsize=2, label=draft)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"T = {t:g}", fontsize=9)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance given the earlier positions accepted" if conditional(sweep)
                      else "share of proposals accepted")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    meta = sweep.get("meta", {})
    return _save(fig, f"acceptance by draft position, {meta.get('target', 'target')} on {_device(meta)}", out)


# ------------------------------------------------------------------------------------------------ batch
def batch_rows(runs: Sequence[dict], settings: str = "none") -> Dict[float, Dict[str, List[tuple]]]:
    """{temperature: {method: [(batch, speedup), ...] sorted by batch}} from bench_engine results (lossless tempspec
    methods under one generation setting; target_only and Hugging Face rows left out)."""
    out: Dict[float, Dict[str, Dict[int, float]]] = {}
    for run in runs:
        for r in run["results"]:
            method = r["method"]
            if not method.startswith(TEMPSPEC) or not lossless_row(r, settings):
                continue
            name = method_label(method)
            out.setdefault(r["temperature"], {}).setdefault(name, {})[r["batch"]] = r["speedup_vs_target_only"]
    return {t: {m: sorted(b.items()) for m, b in methods.items()} for t, methods in sorted(out.items())}


def plot_batch(runs: Sequence[dict], out, settings: str = "none", temperatures: Optional[Sequence[float]] = None
               ) -> str:
    rows = batch_rows(runs, settings)
    if temperatures is not None:
        missing = sorted(set(temperatures) - set(rows))
        if missing:
            raise ValueError(f"no results at temperature(s) {missing} in these files; they have {sorted(rows)}")
        rows = {t: rows[t] for t in temperatures}
    if not rows:
        raise ValueError(f"no lossless tempspec rows under settings {settings!r} in these files")
    fig, axes = _figure(len(rows))
    for ax, (t, methods) in zip(axes, rows.items()):
        for name, points in methods.items():
            ax.plot([b for b, _ in points], [s for _, s in points], marker="o", label=name)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target alone")
        ax.set_xscale("log", base=2)
        batches = sorted({b for points in methods.values() for b, _ in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"T = {t:g}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over the target alone")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    devices = sorted({_device(r.get("meta", {})) for r in runs})
    return _save(fig, f"speedup against batch size on {', '.join(devices)}", out)


# ------------------------------------------------------------------------------------------------ temperatures
def temperature_rows(run: dict, batch: int = 1, settings: str = "none") -> Dict[str, List[tuple]]:
    """{method: [(temperature, speedup, alpha or None, 95% half-width of alpha or None), ...] sorted by temperature}
    from bench_engine results at one batch size under one generation setting: every lossless method but the target
    alone (tempspec methods named by their draft, Hugging Face ones by their full name)."""
    out: Dict[str, List[tuple]] = {}
    for r in run["results"]:
        method = r["method"]
        if r["batch"] != batch or method == "target_only" or not lossless_row(r, settings):
            continue
        name = method_label(method)
        alpha, se = r.get("alpha"), r.get("alpha_se")
        out.setdefault(name, []).append((r["temperature"], r["speedup_vs_target_only"], alpha,
                                         None if se is None else 1.96 * se))
    return {m: sorted(points) for m, points in out.items()}


def plot_temperatures(run: dict, out, batch: int = 1, settings: str = "none") -> str:
    rows = temperature_rows(run, batch, settings)
    if not rows:
        batches = sorted({r["batch"] for r in run["results"]})
        raise ValueError(f"no lossless rows at batch {batch} under settings {settings!r}; the file has batch "
                         f"size(s) {batches}")
    fig, (speed, accept, key) = _figure(3, width=4.6)
    palette = [f"C{i}" for i in range(10)] + ["black", "olive", "navy", "maroon", "teal"]
    for i, (name, points) in enumerate(rows.items()):
        temps = [p[0] for p in points]
        style = dict(marker="os^D"[i // len(palette) % 4], color=palette[i % len(palette)], label=name,
                     linestyle=":" if name.startswith("hf_") else "-")
        speed.plot(temps, [p[1] for p in points], **style)
        measured = [p for p in points if p[2] is not None]
        if measured:
            accept.errorbar([p[0] for p in measured], [p[2] for p in measured], yerr=[p[3] or 0.0 for p in measured],
                            capsize=2, **style)
    speed.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target alone")
    speed.set_ylabel("speedup over the target alone")
    accept.set_ylabel("alpha, 95% interval\n(accepted / (accepted + rejected))")
    accept.set_ylim(0.0, 1.0)
    for ax in (speed, accept):
        ax.set_xlabel("decoding temperature")
        ax.grid(alpha=0.3)
    key.axis("off")  # the third panel holds the legend, clear of the data
    key.legend(*speed.get_legend_handles_labels(), loc="center left", fontsize=8, frameon=False)
    meta = run.get("meta", {})
    title = (f"{meta.get('target', 'target')}, batch {batch}, {meta.get('n_prompts', '?')} prompts x "
             f"{meta.get('max_new_tokens', '?')} tokens, {meta.get('dtype', '')} on {_device(meta)}")
    return _save(fig, title, out)


# ------------------------------------------------------------------------------------------------ lenience
def lenience_rows(run: dict) -> Dict[str, List[tuple]]:
    """{series: [(label, speedup, target_nll), ...]}: the target alone ('target'), lossless SD ('1') and each lossy
    run ('<eps>'), from a bench_engine JSON with target_nll (run with --lenience). A series is a settings preset, and
    also a temperature, batch size and draft where the run has several (the target alone joins each draft's series);
    rows of variants and of --compare-draft-filter (a '/' suffix) are left out."""
    kept = []
    for r in run["results"]:
        method = r["method"]
        head, _, suffix = method.rpartition("]")  # tempspec_sd[<draft>] then "", "@<eps>" or "/<variant>"
        if r.get("target_nll") is None or not (method == "target_only" or head.startswith(TEMPSPEC)) \
                or suffix.startswith("/"):
            continue
        kept.append((r, None if method == "target_only" else head[len(TEMPSPEC):]))
    if not kept:
        raise ValueError("no target_nll in these results: run bench_engine with --lenience")
    drafts = sorted({d for _, d in kept if d is not None})
    several = {name: len({r.get(name) for r, _ in kept}) > 1 for name in ("temperature", "batch")}
    out: Dict[str, List[tuple]] = {}
    for r, draft in kept:
        key = r.get("settings", "none")
        if several["temperature"]:
            key += f", T={r['temperature']:g}"
        if several["batch"]:
            key += f", batch {r['batch']}"
        m = LENIENT.search(r["method"])
        label = "target" if draft is None else (m.group(1) if m else "1")
        series = [key] if len(drafts) < 2 else [f"{key}, {d}" for d in (drafts if draft is None else [draft])]
        for name in series:
            out.setdefault(name, []).append((label, r["speedup_vs_target_only"], r["target_nll"]))
    return out


def plot_lenience(run: dict, out) -> str:
    fig, (ax,) = _figure(1, width=6.0, height=4.4)
    for settings, points in lenience_rows(run).items():
        line = ax.plot([p[2] for p in points], [p[1] for p in points], marker="o", linestyle=":", label=settings)
        for label, speedup, nll in points:
            ax.annotate(label, (nll, speedup), fontsize=7, textcoords="offset points", xytext=(3, 3),
                        color=line[0].get_color())
    ax.set_xlabel("mean NLL per token under the target (T=1; lower = closer to the target)")
    ax.set_ylabel("speedup over the target alone")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="setting (points: lenience)", title_fontsize=8)
    meta = run.get("meta", {})
    return _save(fig, f"lossy acceptance: speed against quality, {', '.join(meta.get('drafts', []))} on "
                      f"{_device(meta)}", out)


# ------------------------------------------------------------------------------------------------ recipes
def read_grid(path) -> dict:
    """A KD-grid JSON (benchmarks/kd_grid.py: "drafts" and "sets"); ValueError naming the file otherwise."""
    data = _load(path)
    if not isinstance(data, dict) or not isinstance(data.get("sets"), dict) or not isinstance(data.get("drafts"), list):
        raise ValueError(f"{path}: not a results file of benchmarks/kd_grid.py (no 'sets' and 'drafts')")
    return data


def recipe_rows(grid: dict) -> Dict[str, Dict[float, List[tuple]]]:
    """{prompt set: {temperature: [(draft label, alpha, 95% half-width), ...] in the grid's draft order}}. A draft's
    label is its mode, or MODE:TAU where two drafts share a mode."""
    modes = [d["mode"] for d in grid["drafts"]]
    labels = {d["path"]: d["mode"] if modes.count(d["mode"]) == 1 or d.get("tau_kd") is None
              else f"{d['mode']}:{d['tau_kd']:g}" for d in grid["drafts"]}
    out: Dict[str, Dict[float, List[tuple]]] = {}
    for name, entry in grid["sets"].items():
        per_temp: Dict[float, Dict[str, tuple]] = {}
        for r in entry["results"]["results"]:
            if r.get("draft") in labels and r.get("alpha") is not None:
                half = 1.96 * (r.get("alpha_se") or 0.0)
                per_temp.setdefault(r["temperature"], {})[labels[r["draft"]]] = (r["alpha"], half)
        order = [labels[d["path"]] for d in grid["drafts"]]
        out[name] = {t: [(m, *rows[m]) for m in order if m in rows] for t, rows in sorted(per_temp.items())}
    return out


def plot_recipes(grid: dict, out) -> str:
    rows = recipe_rows(grid)
    fig, axes = _figure(len(rows), width=5.2)
    for ax, (name, per_temp) in zip(axes, rows.items()):
        labels = [m for m, _, _ in next(iter(per_temp.values()), [])]
        width = 0.8 / max(len(labels), 1)
        for j, label in enumerate(labels):
            xs, ys, errs = [], [], []
            for i, (t, bars) in enumerate(per_temp.items()):
                found = [b for b in bars if b[0] == label]
                if found:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(found[0][1])
                    errs.append(found[0][2])
            ax.bar(xs, ys, width=width, yerr=errs, capsize=2, label=label)
        ax.set_xticks(range(len(per_temp)), [f"T = {t:g}" for t in per_temp])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("alpha, 95% interval\n(accepted / (accepted + rejected))")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    meta = grid.get("meta", {})
    return _save(fig, f"drafts that differ in one recipe choice, on {_device(meta)}", out)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Optional[List[str]] = None) -> int:
    ap = OneLineParser(prog="study_figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("positions", help="acceptance by draft position from a sweep JSON")
    p.add_argument("sweep", help="a sweep results JSON (benchmarks/temperature_sweep.py)")
    p.add_argument("--temperatures", default="0,0.5,1", help="panels, comma list (default: %(default)s)")
    b = sub.add_parser("batch", help="speedup against batch size from bench_engine JSON files")
    b.add_argument("runs", nargs="+", help="bench_engine results JSON files")
    b.add_argument("--settings", default="none", help="generation-settings preset to plot (default: %(default)s)")
    b.add_argument("--temperatures", default=None, help="panels, comma list (default: every temperature found)")
    le = sub.add_parser("lenience", help="speed against quality of lossy acceptance from a bench_engine JSON")
    le.add_argument("run", help="a bench_engine results JSON run with --lenience")
    rc = sub.add_parser("recipes", help="alpha of drafts differing in one recipe choice, from a kd_grid JSON")
    rc.add_argument("grid", help="a results JSON of benchmarks/kd_grid.py")
    tp = sub.add_parser("temperatures", help="speedup and alpha against temperature from a bench_engine JSON")
    tp.add_argument("run", help="a bench_engine results JSON")
    tp.add_argument("--batch", type=int, default=1, help="batch size to plot (default: %(default)s)")
    tp.add_argument("--settings", default="none", help="generation-settings preset to plot (default: %(default)s)")
    for s in (p, b, le, rc, tp):
        s.add_argument("--out", required=True, help="the PNG to write")
        add_debug_flag(s)
    args = ap.parse_args(argv)

    def run() -> int:
        if args.figure == "positions":
            path = plot_positions(read_json(args.sweep), parse_temperatures(args.temperatures), args.out)
        elif args.figure == "batch":
            temps = parse_temperatures(args.temperatures) if args.temperatures else None
            path = plot_batch([read_json(f) for f in args.runs], args.out, args.settings, temps)
        elif args.figure == "temperatures":
            path = plot_temperatures(read_json(args.run), args.out, args.batch, args.settings)
        elif args.figure == "lenience":
            path = plot_lenience(read_json(args.run), args.out)
        else:
            path = plot_recipes(read_grid(args.grid), args.out)
        print(f"wrote {path}")
        return 0

    return run_command("study_figures", run, getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
