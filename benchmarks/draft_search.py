"""Rank layer-subset drafts of the default target by teacher-forced acceptance and a cost model.

The target generates greedy continuations of a few prompts once; each candidate draft then reads the same
sequences in one forward. Per position, acceptance of a speculative-sampling draft at temperature T is
sum_x min(p(x), q(x)) (T > 0) or [argmax q == argmax p] (T = 0); alpha is its mean. The expected speedup uses
Leviathan et al.'s formula with a draft/target cost ratio c = (weights the draft multiplies a token by) / (the
target's; tempspec_engine.engine.matmul_weights), which is what a batch-1 forward costs on a memory-bound CPU,
and a verification cost of 1 + 0.02 k target forwards.

  python benchmarks/draft_search.py --prompts ../shared/data/spec_bench_question.jsonl --out results/draft_search.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.adaptive_k import expected_tokens  # noqa: E402
from tempspec_engine.cli_args import positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine, matmul_weights  # noqa: E402
from tempspec_engine.models.draft import make_draft  # noqa: E402
from tempspec_engine.models.loading import load_default_target  # noqa: E402
from tempspec_engine.prompts import read_prompts  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402

CANDIDATES = [f"layers:0-{n - 1},29" for n in (1, 2, 3, 4, 6, 8)] + [
    "layers:0,14,29", "layers:0,1,28,29", "layers:0,1,2,28,29", "layers:0,10,20,29", "layers:0-3,28,29"]
VOCABS = [None, 16384, 8192, 4096]


def main(argv=None) -> int:
    ap = OneLineParser(prog="draft_search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="JSONL prompt file")
    ap.add_argument("--n-prompts", type=positive_int, default=8, help="(default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON (default: a new file {RUNS_DIR}/draft_search-<time>.json)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_command("draft_search", lambda: run(args), getattr(args, "debug", False))


def run(args) -> int:
    prompts = read_prompts(args.prompts, args.n_prompts)
    args.out = args.out or str(fresh_results_path("draft_search"))
    check_output_path(args.out)
    target = load_default_target("cpu", torch.float32)
    engine = SpeculativeEngine(target, "none", "cpu", torch.float32, max_len=1024)
    outs = engine.generate(prompts, 0.0, args.max_new_tokens, chat_template=True)
    seqs = [o.prompt_ids + o.token_ids for o in outs]
    full = matmul_weights(target.model)

    def logits_of(model, seq):
        cache = model.new_cache(1, len(seq))
        with torch.inference_mode():
            return model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), cache)[0].float()

    tlogits = [logits_of(target.model, s) for s in seqs]
    results = []
    for spec in CANDIDATES:
        for vocab in VOCABS:
            full_spec = spec + (f"/vocab:{vocab}" if vocab else "")
            draft = make_draft(full_spec, target, "cpu", torch.float32).model
            alphas = {}
            for T in (0.0, 0.5, 1.0):
                acc, n = 0.0, 0
                for s, o, tl in zip(seqs, outs, tlogits):
                    start = len(o.prompt_ids) - 1
                    dl = logits_of(draft, s)[start:-1]
                    p_l = tl[start:-1]
                    if T == 0:
                        acc += float((dl.argmax(-1) == p_l.argmax(-1)).sum())
                    else:
                        acc += float(torch.minimum(torch.softmax(p_l / T, -1), torch.softmax(dl / T, -1)).sum())
                    n += dl.shape[0]
                alphas[T] = acc / n
            c = matmul_weights(draft) / full
            best = {T: max((expected_tokens(a, k) / (k * c + 1 + 0.02 * k), k) for k in range(1, 9))
                    for T, a in alphas.items()}
            row = {"draft": full_spec, "cost_ratio": c, "alpha": alphas,
                   "est_speedup": {T: b[0] for T, b in best.items()}, "best_k": {T: b[1] for T, b in best.items()}}
            results.append(row)
            print(json.dumps(row), flush=True)
    results.sort(key=lambda r: -r["est_speedup"][0.0])
    write_json({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "results": results}, args.out)
    print("best at T=0:", results[0]["draft"], results[0]["est_speedup"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
