"""Command line: `tempspec generate --prompt "..." --temperature 0.7` (streams the text; stats on stderr) and
`tempspec sweep --quick` (the temperature study, see tempspec_engine/sweep.py).

With one prompt the text streams as it is accepted; with several, each is printed when all are done. Prompts go
through the model's chat template unless --no-chat.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tempspec_engine.sweep import add_sweep_parser, sweep_command


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tempspec", description="Lossless speculative decoding at any temperature.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--target", default="default", help="'default' (SmolLM2-135M-Instruct) or a HF path/hub name")
    g.add_argument("--draft", default="default",
                   help="'default' (lookup), a spec like distilled:1, distilled:1/vocab:8192 or layers:0,14,29, "
                        "lookup+distilled:1 (lookup where it matches, else the model), a draft directory, 'none', "
                        "or a HF model (see tempspec_engine/models/draft.py)")
    g.add_argument("--k", default="auto", help="lookahead: 'auto' or an int")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    g.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16)")
    g.add_argument("--no-chat", action="store_true", help="use the prompt as raw text (no chat template)")
    g.add_argument("--system", default=None, help="system prompt for the chat template")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-speculative", action="store_true", help="target alone (autoregressive baseline)")
    g.add_argument("--quiet", action="store_true", help="no stats on stderr")
    add_sweep_parser(sub)
    return ap


class _Streamer:
    """Prints the decoded text of one request as tokens arrive (decodes the whole prefix: safe for multi-byte)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def __call__(self, index: int, new_ids: List[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.printed):] if text.startswith(self.printed) else "")
        self.out.flush()
        self.printed = text


def generate_command(args, out=None, err=None) -> int:
    from tempspec_engine.engine import SpeculativeEngine

    out, err = out or sys.stdout, err or sys.stderr
    k = args.k if args.k == "auto" else int(args.k)
    engine = SpeculativeEngine(args.target, args.draft, device=args.device, dtype=args.dtype, k=k)
    stream = len(args.prompt) == 1
    streamer = _Streamer(engine.tokenizer, out) if stream else None
    outputs = engine.generate(args.prompt, args.temperature, args.max_new_tokens, stop=args.stop,
                              chat_template=not args.no_chat, system_prompt=args.system,
                              speculative=not args.no_speculative, seed=args.seed, on_tokens=streamer)
    for i, o in enumerate(outputs):
        if stream:
            if o.text != streamer.printed:  # a stop string cut the streamed text: show the final text
                out.write("\n[final] " + o.text)
            out.write("\n")
        else:
            out.write(f"=== {i} ===\n{o.text}\n")
        if not args.quiet:
            s = o.stats
            err.write(f"[{i}] {s.new_tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_s:.1f} tok/s), "
                      f"{s.steps} steps, {s.tokens_per_step:.2f} tokens/step, alpha {s.alpha:.2f}, "
                      f"draft {s.draft_time_s:.2f}s, target {s.target_time_s:.2f}s, finish: {o.finish_reason}\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate_command(args)
        if args.command == "sweep":
            return sweep_command(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"tempspec: error: {exc}\n")
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
