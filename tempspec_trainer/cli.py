"""`tempspec-train`: make distillation data, mix it, distill a draft, evaluate drafts.

  tempspec-train gen-data --prompts P.jsonl --temperature 0.5 --out data/t0.5.jsonl   (target samples; resumable)
  tempspec-train gen-data ... --generator runs/kd/final                                 (on-policy: the draft's samples)
  tempspec-train mix --source data/t0.jsonl:0.3 --source data/t1.0.jsonl:0.7 --out data/mix.jsonl
  tempspec-train distill --data data/t0.5.jsonl --tau-kd 0.5 --out-dir runs/kd_t0.5       (--resume to continue)
  torchrun --nproc-per-node 4 -m tempspec_trainer.cli distill ...                         (DDP, same arguments)
  tempspec-train eval --drafts runs/kd_t0.5/init runs/kd_t0.5/final --prompts Q.jsonl --out results.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from tempspec_engine import __version__
from tempspec_engine.cli_args import non_negative_float, positive_int, seed
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command
from tempspec_engine.results import check_output_path
from tempspec_engine.threads import set_threads
from tempspec_trainer.train import PRECISIONS, DistillConfig


def _floats(text: str) -> tuple:
    """'0,0.5,1' -> (0.0, 0.5, 1.0) (argparse type)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple:
    """'2,15' -> (2, 15) (argparse type)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _temperatures(text: str) -> tuple:
    """'0,0.5,1' -> (0.0, 0.5, 1.0): one or more finite temperatures >= 0 (argparse type)."""
    values = _floats(text)
    if not values or any(not 0 <= t < math.inf for t in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite temperatures >= 0, got {text!r}")
    return values


GEN_DATA_MAX_LEN = 512  # the default KV-cache length of gen-data (capped at the model's limit)


def _gen_data(args) -> int:
    from tempspec_engine.engine import SpeculativeEngine
    from tempspec_engine.models.draft import make_draft
    from tempspec_engine.models.feature_draft import FeatureDraft
    from tempspec_engine.models.loading import load_target, resolve_device, resolve_dtype
    from tempspec_trainer.data import dataset_responses, generate_dataset, read_prompt_file
    from tempspec_trainer.feature_sampler import FeatureDraftSampler

    if args.temperature is None and args.generator != "data":
        raise ValueError(f"--temperature is required to sample with --generator {args.generator} (only "
                         "--generator data, the file's own responses, needs none)")
    set_threads(args.threads)
    check_output_path(args.out)
    read_prompt_file(args.prompts, args.limit, args.offset)  # a bad prompt file or range is refused before loading
    target = load_target(args.target, resolve_device(args.device), resolve_dtype(args.dtype), args.allow_download)
    max_len = args.max_len or min(GEN_DATA_MAX_LEN, target.model.config.max_position)
    kw = dict(device=args.device, dtype=args.dtype, max_len=max_len, max_batch_size=args.batch_size)
    engine = SpeculativeEngine(target, "none", **kw)
    if args.generator == "data":  # fixed data: the prompt file's own responses
        print(json.dumps(dataset_responses(engine, args.prompts, args.out, limit=args.limit, offset=args.offset,
                                           max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat)))
        return 0
    name = None
    if args.generator != "target":  # on-policy data: the draft samples, the target's tokenizer encodes
        draft = make_draft(args.generator, engine.target, engine.device, engine.dtype, args.allow_download)
        name = draft.name = args.generator
        if isinstance(draft.model, FeatureDraft):  # a feature head writes on its own features after the prompt
            engine = FeatureDraftSampler(SpeculativeEngine(engine.target, draft, **kw), name)
        else:
            engine = SpeculativeEngine(draft, "none", tokenizer=engine.tokenizer, **kw)
    info = generate_dataset(engine, args.prompts, args.out, args.temperature, limit=args.limit, offset=args.offset,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chunk=args.chunk,
                            seed=args.seed, chat_template=not args.no_chat, progress=not args.no_progress,
                            generator_name=name)
    print(json.dumps(info))
    return 0


def _mix(args) -> int:
    from tempspec_trainer.data import mix_datasets

    check_output_path(args.out)
    sources = []
    for item in args.source:
        path, sep, share = item.rpartition(":")
        if not sep:
            raise ValueError(f"--source {item!r}: use PATH:PROPORTION")
        try:
            sources.append((path, float(share)))
        except ValueError:
            raise ValueError(f"--source {item!r}: PROPORTION must be a number") from None
    print(json.dumps(mix_datasets(sources, args.out, args.total, args.seed)))
    return 0


def _distill(args) -> int:
    from tempspec_trainer.train import distill, resume_config

    set_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:  # the flags left out keep the checkpoint's values, not the defaults
        given = given_options(args.argv)
        values = {k: v for k, v in values.items() if k in given or k in ("data", "out_dir")}
        cfg = resume_config(args.out_dir, values)
    else:
        cfg = DistillConfig(**values)
    final = distill(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        from tempspec_trainer.model_card import write_card

        write_card(final, command="tempspec-train " + " ".join(shlex.quote(a) for a in args.argv))
        print(f"final draft: {final}")
    return 0


def _plus_minus(values: dict, t: float, sign: str = "") -> str:
    """'0.372 ± 0.015': alpha@T of a summarize() dict and its 95% half-width (sign '+': a signed difference)."""
    return f"{values[f'alpha@{t:g}']:{sign}.3f} ± {1.96 * values[f'alpha@{t:g}_se']:.3f}"


def _eval(args) -> int:
    import torch

    from tempspec_engine.models.loading import load_target, resolve_device, resolve_dtype
    from tempspec_engine.prompts import read_prompts
    from tempspec_engine.sweep import format_table, write_results
    from tempspec_trainer.evaluate import measure_drafts, row_acceptance_on_data, summarize, summarize_by_category

    set_threads(args.threads)
    if args.out:
        check_output_path(args.out)
    if not (args.data or args.prompts):
        raise ValueError("give --data (expected acceptance on generated rows) and/or --prompts (decoding)")
    if args.position != 1 and not args.data:
        raise ValueError(f"--position {args.position} picks the draft position scored on --data rows: give --data")
    device = resolve_device(args.device)
    target = load_target(args.target, device, resolve_dtype(args.dtype), args.allow_download)
    report = {"drafts": args.drafts, "temperatures": list(args.temperatures)}
    if args.data:
        temps = args.temperatures
        rows = {d: row_acceptance_on_data(target, d, args.data, temps, args.n_rows, position=args.position)
                for d in args.drafts}
        report["draft_position"] = args.position
        report["expected"] = {d: summarize(sums, counts, temps) for d, (sums, counts, _) in rows.items()}
        # paired with the first draft on the same positions (drafts of one kind: feature heads or draft models)
        first_sums, first_counts, _ = rows[args.drafts[0]]
        report["expected_minus_first"] = {d: summarize(sums - first_sums, counts, temps)
                                          for d, (sums, counts, _) in list(rows.items())[1:]
                                          if torch.equal(counts, first_counts)}
        by_category = {d: summarize_by_category(*rows[d], temps) for d in args.drafts}
        if any(by_category.values()):  # rows generated from prompts with a category (Spec-Bench)
            report["expected_by_category"] = by_category
        for d, v in report["expected"].items():
            diff = report["expected_minus_first"].get(d)
            cells = [f"T={t:g} {_plus_minus(v, t)}" + (f" ({_plus_minus(diff, t, '+')} vs the first)" if diff else "")
                     for t in temps]
            where = f" at draft position {args.position}" if args.position > 1 else ""
            print(f"expected acceptance of {d} on {args.data}{where}: " + ", ".join(cells))
            for t in temps if by_category[d] else ():
                print(f"  by category at T={t:g}: " + ", ".join(f"{c} {s[f'alpha@{t:g}']:.3f} ({s['tokens']} tokens)"
                                                               for c, s in by_category[d].items()))
    if args.prompts:
        results = measure_drafts(target, args.drafts, read_prompts(args.prompts, args.n_prompts), args.temperatures,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                                 dtype=resolve_dtype(args.dtype), seed=args.seed, progress=not args.no_progress)
        results["meta"]["prompts_file"] = Path(args.prompts).name
        if "expected" in report:
            results["expected_on_data"] = {"data": Path(args.data).name, "draft_position": args.position,
                                           **report["expected"]}
            results["expected_minus_first"] = report["expected_minus_first"]
        print(format_table(results))
        report = results
        if args.update_cards:
            from tempspec_engine.models.draft_checkpoint import is_draft_dir
            from tempspec_trainer.model_card import add_measured

            for d in args.drafts:
                if is_draft_dir(d):
                    print(f"updated {add_measured(d, results, args.out or '(not saved)')}")
    if args.out:
        written = write_results(report, args.out, plots=bool(args.prompts) and not args.no_plots)
        print("wrote " + ", ".join(written))
    return 0


# `distill` flags: one per DistillConfig field (tempspec_trainer/train.py)
DISTILL_HELP = {
    "tau_kd": "KD temperature: the decoding temperature the draft is trained for (0 = greedy)",
    "mode": "online: token-level divergence at tau_kd against the target; offline: cross-entropy on the data",
    "divergence": "online divergence between target and draft at tau_kd",
    "jsd_beta": "mixture weight of the JSD",
    "init": "initial draft: layers:<ids>[/mlp:N] (the target's layers, MLPs pruned to N channels), "
            "fresh:dim=D,layers=L[,heads=H,kv_heads=K,mlp=M], or an EAGLE-style feature head "
            "feature[:layers=L,mlp=M][/vocab:N | /vocab:first:N] (N: the draft vocabulary, the data's most frequent "
            "response tokens or the first N ids); or a warm start from a saved feature head: feature:T / "
            "feature:mix (shipped) or its directory",
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-batch (per rank)",
    "grad_accum": "micro-batches per optimizer step",
    "seq_len": "tokens per training sequence (prompt + response)",
    "lr": "peak AdamW learning rate",
    "warmup_steps": "linear warmup steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clip",
    "precision": "bf16 autocast over fp32 weights (and a bf16 teacher), fp32, or auto: bf16 where the device "
                 "multiplies bf16 fast (a GPU with bf16, a CPU with AVX-512 BF16 or AMX), fp32 elsewhere",
    "eval_rows": "rows held out of the data for the expected acceptance (at most a quarter of them; 0: none)",
    "eval_every": "steps between evaluations",
    "eval_temperatures": "comma list of temperatures the evaluation reports",
    "eval_prompts": "JSONL prompts: also measure alpha by decoding them at each evaluation",
    "eval_decode_prompts": "how many of --eval-prompts to decode",
    "eval_decode_tokens": "new tokens per decoded prompt",
    "save_every": "steps between checkpoints (the two newest are kept)",
    "feature_weight": "feature heads: weight of the smooth-L1 regression on the target's next feature (0: off)",
    "unroll": "feature heads: training-time-test steps; step j > 1 feeds the head its own predictions",
    "feature_noise": "feature heads: amplitude a of the uniform noise U(-a, a) added to the target's features the head "
                     "reads in training (EAGLE's augmentation; the features have a standard deviation near 2 on the "
                     "default target; 0: off)",
    "tau_mix": "comma list of KD temperatures: the online divergence is averaged over them instead of --tau-kd "
               "(a temperature mixture)",
    "feature_taps": "feature heads: comma list of target blocks whose outputs the head also reads (EAGLE-3's "
                    "low/middle-level features, e.g. 2,15); none keeps a warm start's own, a warm start without "
                    "taps gains them (fused as the identity at first)",
    "teacher_cache": "feature heads: file of the target's features for the training rows, computed on first use and "
                     "read by every later run on the same data (heads at other temperatures train without a target "
                     "forward)",
}
DISTILL_CHOICES = {"mode": ["online", "offline"], "divergence": ["fkl", "rkl", "jsd", "tvd"],
                   "precision": list(PRECISIONS)}


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="tempspec-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"tempspec-train {__version__}")
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{gen-data,mix,distill,eval}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="default",
                        help="'default' (SmolLM2-135M-Instruct, shipped offline) or a Hugging Face model directory; a "
                             "hub id only with --allow-download (default: %(default)s)")
    common.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    common.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0 picks the cores other processes leave free (default: %(default)s)")
    common.add_argument("--seed", type=seed, default=0, help="(default: %(default)s)")
    common.add_argument("--allow-download", action="store_true",
                        help="let --target or a draft name a Hugging Face hub id (default: off)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")
    add_debug_flag(common)
    dtype = dict(default="bf16", choices=["fp32", "bf16", "fp16"], help="(default: %(default)s)")

    g = sub.add_parser("gen-data", parents=[common], help="sample responses to a prompt file (resumable JSONL)")
    g.add_argument("--prompts", required=True, help="JSONL: Alpaca instruction/input, Spec-Bench turns, GSM8K question")
    g.add_argument("--out", required=True, help="output JSONL (appended to; prompts already there are skipped)")
    g.add_argument("--temperature", type=non_negative_float, default=None,
                   help="the KD temperature tau_kd (0 = greedy); required unless --generator data (default: none)")
    g.add_argument("--generator", default="target",
                   help="'target' (sequence-level KD data), a draft spec/directory (on-policy data; a feature head "
                        "writes on its own features after the target reads the prompt and draws the first token), or "
                        "'data' (the file's own responses, e.g. Alpaca `output`: fixed data; --temperature is then not "
                        "used) "
                        "(default: %(default)s)")
    g.add_argument("--limit", type=positive_int, default=None, help="prompts to use (default: all)")
    g.add_argument("--offset", type=int, default=0, help="first prompt row (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    g.add_argument("--chunk", type=positive_int, default=64, help="prompts per write to disk (default: %(default)s)")
    g.add_argument("--max-len", type=positive_int, default=None,
                   help=f"KV-cache length, prompt + response, up to the model's limit (default: {GEN_DATA_MAX_LEN}, "
                        "or that limit when smaller)")
    g.add_argument("--dtype", **dtype)
    g.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template (default: off)")
    g.set_defaults(func=_gen_data)

    m = sub.add_parser("mix", help="mix generated files by proportions (multi-temperature data)")
    m.add_argument("--source", action="append", required=True, help="PATH:PROPORTION, repeatable")
    m.add_argument("--out", required=True, help="output JSONL")
    m.add_argument("--total", type=positive_int, default=None, help="rows in the mixture (default: as many as possible)")
    m.add_argument("--seed", type=seed, default=0, help="(default: %(default)s)")
    add_debug_flag(m)
    m.set_defaults(func=_mix)

    d = sub.add_parser("distill", parents=[common], help="distill a draft from the target at tau_kd",
                       description="Distill a draft at tau_kd. The defaults are the recipe of the shipped drafts.")
    d.add_argument("--data", nargs="+", required=True, help="generated JSONL files (gen-data / mix)")
    d.add_argument("--out-dir", required=True, help="checkpoints/, init/, final/ and train_log.json go here")
    d.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its last checkpoint, with its settings for the flags left "
                        "out (default: off)")
    defaults = DistillConfig(data=[], out_dir="")
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("data", "out_dir", "target", "device", "seed"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        kind = (_ints if f.name == "feature_taps" else _floats) if isinstance(value, tuple) else \
            str if value is None else type(value)
        shown = (",".join(f"{x:g}" for x in value) or "none") if isinstance(value, tuple) else value
        d.add_argument(flag, type=kind, default=None, choices=DISTILL_CHOICES.get(f.name),
                       help=f"{DISTILL_HELP[f.name]} (default: {shown})")
    d.set_defaults(func=_distill)

    e = sub.add_parser("eval", parents=[common], help="expected and measured acceptance of drafts")
    e.add_argument("--drafts", nargs="+", required=True, help="draft specs or directories (e.g. runs/x/init runs/x/final)")
    e.add_argument("--temperatures", type=_temperatures, default=(0.0, 0.5, 1.0), help="comma list (default: 0,0.5,1)")
    e.add_argument("--data", default=None, help="generated JSONL: expected acceptance (1 - TVD) on its responses, with "
                   "its standard error over rows and each draft's paired difference from the first (default: none)")
    e.add_argument("--n-rows", type=positive_int, default=64, help="rows of --data to score (default: %(default)s)")
    e.add_argument("--position", type=positive_int, default=1,
                   help="with --data, the draft position scored: j > 1 is a feature head's j-th draft, teacher-forced "
                        "(the earlier drafts are the data's tokens) (default: %(default)s)")
    e.add_argument("--prompts", default=None, help="JSONL prompts: decode and measure alpha, tokens/s, speedup (default: none)")
    e.add_argument("--n-prompts", type=positive_int, default=20, help="(default: %(default)s)")
    e.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    e.add_argument("--batch-size", type=positive_int, default=1, help="(default: %(default)s)")
    e.add_argument("--dtype", **dtype)
    e.add_argument("--out", default=None, help="results JSON, PNGs beside it when decoding (default: not saved)")
    e.add_argument("--no-plots", action="store_true", help="write the JSON only (default: off)")
    e.add_argument("--update-cards", action="store_true",
                   help="add the measured table to the README.md model card of each draft directory (default: off)")
    e.set_defaults(func=_eval)
    return ap


def given_options(argv: List[str]) -> set:
    """The destinations of the options that argv sets itself (not through a default): argv parsed again with every
    default suppressed, abbreviations included."""
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices.values()
    for p in [parser, *subparsers]:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(f"tempspec-train {args.command}", lambda: args.func(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
