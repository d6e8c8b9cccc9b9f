"""Lossy (lenient) acceptance, measured exactly along the target's own texts: how much acceptance each lenience buys,
and how far it moves the output away from the target's distribution.

Sampled text is a noisy judge of a small distortion (benchmarks/bench_engine.py --lenience scores text by its NLL
under the target; lossless SD and the target alone differ there by more than the lenience effect). This script
measures both sides without sampling the verdict. For every temperature T > 0, the target alone samples a
continuation of each prompt at T (seeded). At every response position of those texts, with p the target's
distribution at T and q the draft's (teacher-forced: a feature head reads the target's own features, a draft model
the same tokens), and for each lenience eps in (0, 1]:
  alpha       = sum_x min(q(x), p(x) / eps): the probability that the first draft token is accepted
  distortion  = TV(emitted, p) = 1/2 sum_x |emitted(x) - p(x)|, where emitted is the distribution of the first token
                the lenient rule emits (tempspec_engine.reference.lenient_emitted_distribution)
averaged over positions, each with the standard error over positions (positions of one text are not independent:
take it as an indication). eps = 1 is lossless: distortion 0 and alpha = 1 - TV(p, q).

    python benchmarks/lenience_tradeoff.py --prompts ../shared/data/spec_bench_question.jsonl --n-prompts 16 \
        --drafts "feature:1;distilled:1" --temperatures 0.5,1 --out benchmarks/results/lenience_tradeoff_cpu.json
Writes the JSON and <out>.png (alpha against distortion, one line per draft and temperature, points labelled eps).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.checks import LENIENCE  # noqa: E402
from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.models.feature_draft import FeatureDraft, tap_columns  # noqa: E402
from tempspec_engine.models.llama import Transformer  # noqa: E402
from tempspec_engine.prompts import read_prompts  # noqa: E402
from tempspec_engine.reference import lenient_emitted_distribution  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta  # noqa: E402
from tempspec_engine.sweep import parse_temperatures  # noqa: E402
from tempspec_engine.threads import set_threads  # noqa: E402

DEFAULT_LENIENCE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def parse_lenience(text: str) -> List[float]:
    """'1,0.5,0.3' -> [1.0, 0.5, 0.3] (distinct, largest first), each in the range of checks.LENIENCE; ValueError
    otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lenience {text!r}: use a comma list of numbers in {LENIENCE.expected}") from None
    if not values:
        raise ValueError(f"--lenience {text!r}: give at least one lenience {LENIENCE.expected}")
    return sorted({LENIENCE.checked(v, " (--lenience)") for v in values}, reverse=True)


def draft_logits_along(draft, seq: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Teacher-forced draft logits aligned with the target's: [L-1, V] float32 for seq [1, L], where row t holds the
    draft's logits for token t+1 (the token the target's logits at position t predict). features [1, L, width]: the
    target's features of seq (Transformer.forward(..., return_features=True, feature_taps=the head's taps)). A feature
    head reads them: its
    row t comes from (f_{t-1}, x_t), so row 0 has no input and is left zero (uniform); a draft model reads the same
    tokens."""
    L = seq.shape[1]
    pos = torch.arange(L, device=seq.device)[None]
    if isinstance(draft, FeatureDraft):
        pred = draft(draft.read(features[:, :-1]), seq[:, 1:], pos[:, :-1], None)  # index j predicts token j+2
        out = torch.zeros(L - 1, draft.config.vocab_size)
        out[1:] = draft.logits(pred[0, :-1]).float()
        return out
    if isinstance(draft, Transformer):
        return draft(seq, pos, None)[0, :-1].float()
    raise ValueError(f"teacher-forced draft distributions need a model draft (a feature head or a tempspec "
                     f"Transformer), not {type(draft).__name__}")


def position_figures(p: torch.Tensor, q: torch.Tensor, lenience: Sequence[float]) -> Dict[float, tuple]:
    """{eps: (alpha per position [N], distortion per position [N])} for target and draft probabilities p, q [N, V]
    (renormalized in float64 first, so that eps = 1 gives distortion 0 up to float64 rounding)."""
    p, q = p.double(), q.double()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    out = {}
    for eps in lenience:
        alpha = torch.minimum(q, p / eps).sum(-1)
        emitted = lenient_emitted_distribution(p, q, eps)
        out[eps] = (alpha, 0.5 * (emitted - p).abs().sum(-1))
    return out


def _mean_se(values: torch.Tensor) -> tuple:
    n = values.numel()
    mean = float(values.mean())
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else None
    return mean, se


def run_tradeoff(engine, drafts: Dict[str, object], prompts, temperatures: Sequence[float],
                 lenience: Sequence[float], max_new_tokens: int, seed: int = 0, chat_template: bool = True) -> dict:
    """The results dict (module docstring): engine is a SpeculativeEngine of the target (its target alone samples the
    texts); drafts maps a label to a draft model (FeatureDraft or Transformer) for that target."""
    if any(t <= 0 for t in temperatures):
        raise ValueError("lenience changes nothing at T = 0 (greedy verification compares argmaxes): give "
                         "temperatures > 0")
    target = engine.target.model
    dim = target.config.dim
    # one target forward per text serves every head: the union of their taps
    taps = sorted({i for d in drafts.values() if isinstance(d, FeatureDraft) for i in d.config.taps})
    ids = [engine.encode(p, chat_template=chat_template and isinstance(p, str)) for p in prompts]  # ids pass as is
    rows = []
    with torch.no_grad():
        for T in temperatures:
            outs = engine.generate(ids, T, max_new_tokens, speculative=False, seed=seed)
            acc = {name: {eps: ([], []) for eps in lenience} for name in drafts}
            for prompt, out in zip(ids, outs):
                seq = torch.tensor([prompt + out.token_ids], device=engine.device)
                n0, L = len(prompt), seq.shape[1]
                if L - n0 < 1 or n0 < 2:
                    continue
                t_logits, feats = target(seq, torch.arange(L, device=seq.device)[None], None, return_features=True,
                                         feature_taps=taps)
                span = slice(n0 - 1, L - 1)  # target positions whose next token is a generated one
                p = torch.softmax(t_logits[0, :-1].float()[span] / T, dim=-1)
                for name, draft in drafts.items():
                    own = tap_columns(feats, taps, draft.config.taps, dim) if isinstance(draft, FeatureDraft) else feats
                    q = torch.softmax(draft_logits_along(draft, seq, own)[span] / T, dim=-1)
                    for eps, (alpha, dist) in position_figures(p, q, lenience).items():
                        acc[name][eps][0].append(alpha)
                        acc[name][eps][1].append(dist)
            for name in drafts:
                for eps in lenience:
                    alpha, dist = (torch.cat(x) for x in acc[name][eps])
                    (a, a_se), (d, d_se) = _mean_se(alpha), _mean_se(dist)
                    rows.append({"draft": name, "temperature": T, "lenience": eps, "alpha": a, "alpha_se": a_se,
                                 "distortion": d, "distortion_se": d_se, "positions": alpha.numel()})
    return {"meta": {"target": engine.target.name, "drafts": list(drafts), "temperatures": list(temperatures),
                     "lenience": list(lenience), "n_prompts": len(ids), "max_new_tokens": max_new_tokens,
                     "seed": seed, "chat_template": chat_template, "dtype": str(engine.dtype)},
            "results": rows}


def plot_tradeoff(results: dict, out) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    meta = results["meta"]
    for name in meta["drafts"]:
        for T in meta["temperatures"]:
            pts = [r for r in results["results"] if r["draft"] == name and r["temperature"] == T]
            line = ax.plot([r["distortion"] for r in pts], [r["alpha"] for r in pts], marker="o",
                           label=f"{name}, T={T:g}")
            for r in pts:
                ax.annotate(f"{r['lenience']:g}", (r["distortion"], r["alpha"]), fontsize=6,
                            textcoords="offset points", xytext=(3, -8), color=line[0].get_color())
    ax.set_xlabel("distortion: TV distance of the emitted token from the target's distribution")
    ax.set_ylabel("acceptance of the first draft token")
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"lenient acceptance along the target's texts (points: lenience)\n{meta['target']} on "
                 f"{meta.get('device_name', meta.get('device', '?'))}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return str(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = OneLineParser(prog="lenience_tradeoff", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=None, help="JSONL prompt file (default: the 16 built-in prompts)")
    ap.add_argument("--n-prompts", type=positive_int, default=16, help="(default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    ap.add_argument("--drafts", default="feature:1;distilled:1",
                    help="';'-separated model draft specs (feature heads or draft models; default: %(default)s)")
    ap.add_argument("--temperatures", default="0.5,1", help="comma list, each > 0 (default: %(default)s)")
    ap.add_argument("--lenience", default=",".join(f"{x:g}" for x in DEFAULT_LENIENCE),
                    help="comma list, each in (0, 1] (default: %(default)s)")
    ap.add_argument("--target", default="default", help="(default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="(default: %(default)s)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, the free cores)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON, its PNG beside it (default: a new file {RUNS_DIR}/lenience_tradeoff-<time>.json)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_command("lenience_tradeoff", lambda: _run(args), getattr(args, "debug", False))


def _run(args) -> int:
    from tempspec_engine.engine import SpeculativeEngine
    from tempspec_engine.models.draft import make_draft
    from tempspec_engine.models.loading import resolve_device, resolve_dtype

    if args.out:
        check_output_path(args.out)
    temps = parse_temperatures(args.temperatures)
    lenience = parse_lenience(args.lenience)
    specs = [d.strip() for d in args.drafts.split(";") if d.strip()]
    if not specs:
        raise ValueError(f"--drafts {args.drafts!r} names no draft")
    set_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    engine = SpeculativeEngine(args.target, "none", device=device, dtype=dtype)
    drafts = {s: make_draft(s, engine.target, device, dtype).model for s in specs}
    results = run_tradeoff(engine, drafts, read_prompts(args.prompts, args.n_prompts), temps, lenience,
                           args.max_new_tokens, args.seed)
    results["meta"].update(collect_meta(device),
                           prompts_file=os.path.basename(args.prompts) if args.prompts else "built-in")
    out = Path(args.out) if args.out else fresh_results_path("lenience_tradeoff")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_tradeoff(results, out.with_suffix(".png"))
    results["plot"] = os.path.basename(png)
    write_json(results, out)
    for r in results["results"]:
        print(f"{r['draft']:>16} T={r['temperature']:<4g} eps={r['lenience']:<4g} alpha {r['alpha']:.3f} "
              f"distortion {r['distortion']:.4f}")
    print(f"wrote {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
