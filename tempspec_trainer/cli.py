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
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from tempspec_trainer.train import DistillConfig


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _gen_data(args) -> int:
    import torch

    from tempspec_engine.engine import SpeculativeEngine
    from tempspec_engine.models.draft import make_draft
    from tempspec_trainer.data import generate_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(device=args.device, dtype=args.dtype, max_len=args.max_len, max_batch_size=args.batch_size)
    engine = SpeculativeEngine(args.target, "none", **kw)
    if args.generator != "target":  # on-policy data: the draft samples, the target's tokenizer encodes
        draft = make_draft(args.generator, engine.target, engine.device, engine.dtype)
        draft.name = args.generator
        engine = SpeculativeEngine(draft, "none", tokenizer=engine.tokenizer, **kw)
    info = generate_dataset(engine, args.prompts, args.out, args.temperature, limit=args.limit, offset=args.offset,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chunk=args.chunk,
                            seed=args.seed, chat_template=not args.no_chat, progress=not args.no_progress)
    print(json.dumps(info))
    return 0


def _mix(args) -> int:
    from tempspec_trainer.data import mix_datasets

    sources = []
    for item in args.source:
        path, sep, share = item.rpartition(":")
        if not sep:
            raise ValueError(f"--source {item!r}: use PATH:PROPORTION")
        sources.append((path, float(share)))
    print(json.dumps(mix_datasets(sources, args.out, args.total, args.seed)))
    return 0


def _distill(args) -> int:
    import torch

    from tempspec_trainer.train import distill

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    cfg = DistillConfig(**values)
    final = distill(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        from tempspec_trainer.model_card import write_card

        write_card(final, command="tempspec-train " + " ".join(shlex.quote(a) for a in args.argv))
        print(f"final draft: {final}")
    return 0


def _eval(args) -> int:
    import torch

    from tempspec_engine.models.loading import best_device, load_target, resolve_dtype
    from tempspec_engine.sweep import format_table, read_prompts, write_results
    from tempspec_trainer.evaluate import expected_acceptance_on_data, measure_drafts

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else best_device()
    target = load_target(args.target, device, resolve_dtype(args.dtype))
    report = {"drafts": args.drafts, "temperatures": list(args.temperatures)}
    if args.data:
        report["expected"] = {d: expected_acceptance_on_data(target, d, args.data, args.temperatures, args.n_rows)
                              for d in args.drafts}
        for d, v in report["expected"].items():
            print(f"expected acceptance of {d} on {args.data}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    if args.prompts:
        results = measure_drafts(target, args.drafts, read_prompts(args.prompts, args.n_prompts), args.temperatures,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                                 dtype=resolve_dtype(args.dtype), seed=args.seed, progress=not args.no_progress)
        results["meta"]["prompts_file"] = Path(args.prompts).name
        if "expected" in report:
            results["expected_on_data"] = {"data": Path(args.data).name, **report["expected"]}
        print(format_table(results))
        report = results
        if args.update_cards:
            from tempspec_engine.models.draft_checkpoint import is_draft_dir
            from tempspec_trainer.model_card import add_measured

            for d in args.drafts:
                if is_draft_dir(d):
                    print(f"updated {add_measured(d, results, args.out or '(not saved)')}")
    if not (args.data or args.prompts):
        raise ValueError("give --data (expected acceptance on generated rows) and/or --prompts (decoding)")
    if args.out:
        written = write_results(report, args.out, plots=bool(args.prompts) and not args.no_plots)
        print("wrote " + ", ".join(written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tempspec-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="default", help="'default' (SmolLM2-135M-Instruct) or a HF path/hub name")
    common.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("gen-data", parents=[common], help="sample responses to a prompt file (resumable JSONL)")
    g.add_argument("--prompts", required=True, help="JSONL: Alpaca instruction/input, Spec-Bench turns, GSM8K question")
    g.add_argument("--out", required=True, help="output JSONL (appended to; prompts already there are skipped)")
    g.add_argument("--temperature", type=float, required=True, help="the KD temperature tau_kd (0 = greedy)")
    g.add_argument("--generator", default="target",
                   help="'target' (sequence-level KD data) or a draft spec/directory (on-policy data)")
    g.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    g.add_argument("--offset", type=int, default=0, help="first prompt row")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--chunk", type=int, default=64, help="prompts per write to disk")
    g.add_argument("--max-len", type=int, default=512, help="KV-cache length (prompt + response)")
    g.add_argument("--dtype", default="bf16")
    g.add_argument("--no-chat", action="store_true", help="raw prompts, no chat template")
    g.set_defaults(func=_gen_data)

    m = sub.add_parser("mix", help="mix generated files by proportions (multi-temperature data)")
    m.add_argument("--source", action="append", required=True, help="PATH:PROPORTION, repeatable")
    m.add_argument("--out", required=True)
    m.add_argument("--total", type=int, default=None, help="rows in the mixture (default: as many as possible)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_mix)

    d = sub.add_parser("distill", parents=[common], help="distill a draft from the target at tau_kd")
    d.add_argument("--data", nargs="+", required=True, help="generated JSONL files (gen-data / mix)")
    d.add_argument("--out-dir", required=True, help="checkpoints/, init/, final/ and train_log.json go here")
    d.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    defaults = DistillConfig(data=[], out_dir="")
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("data", "out_dir", "target", "device", "seed"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        kind = _floats if isinstance(value, tuple) else str if value is None else type(value)
        d.add_argument(flag, type=kind, default=None, help=f"default {value}")
    d.set_defaults(func=_distill)

    e = sub.add_parser("eval", parents=[common], help="expected and measured acceptance of drafts")
    e.add_argument("--drafts", nargs="+", required=True, help="draft specs or directories (e.g. runs/x/init runs/x/final)")
    e.add_argument("--temperatures", type=_floats, default=(0.0, 0.5, 1.0), help="comma list (default 0,0.5,1)")
    e.add_argument("--data", default=None, help="generated JSONL: expected acceptance (1 - TVD) on its responses")
    e.add_argument("--n-rows", type=int, default=64, help="rows of --data to score")
    e.add_argument("--prompts", default=None, help="JSONL prompts: decode and measure alpha, tokens/s, speedup")
    e.add_argument("--n-prompts", type=int, default=20)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--dtype", default="bf16")
    e.add_argument("--out", default=None, help="results JSON (PNGs beside it when decoding)")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument("--update-cards", action="store_true",
                   help="add the measured table to the README.md model card of each draft directory")
    e.set_defaults(func=_eval)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"tempspec-train {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
