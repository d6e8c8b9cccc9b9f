"""Command line: `tempspec generate --prompt "..." --temperature 0.7` (streams the text; stats on stderr) and
`tempspec sweep --quick` (the temperature study, see tempspec_engine/sweep.py).

With one prompt the text streams as it is accepted; with several, each is printed when all are done. Prompts go
through the model's chat template unless --no-chat. Errors end in one line (tempspec_engine/cli_errors.py).
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from tempspec_engine import __version__
from tempspec_engine.checks import TEMPERATURE
from tempspec_engine.cli_args import (DRAFT_FORMS, add_model_arguments, add_sampling_arguments, non_negative_float,
                                      positive_int, sampling_kwargs, sampling_value, seed)
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command
from tempspec_engine.device_loop import DEFAULT_SYNC_EVERY
from tempspec_engine.sweep import add_sweep_parser, sweep_command

def _parser() -> OneLineParser:
    ap = OneLineParser(prog="tempspec", description="Lossless speculative decoding at any temperature.")
    ap.add_argument("--version", action="version", version=f"tempspec {__version__}")
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{generate,sweep}")
    g = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate text with lossless speculative decoding (the text streams to stdout, "
                                   "figures go to stderr).")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--temperature", type=sampling_value(TEMPERATURE), default=0.7,
                   help="0 = greedy (default: %(default)s)")
    add_sampling_arguments(g)
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="(default: %(default)s)")
    g.add_argument("--draft", default="default", help=DRAFT_FORMS + " (default: %(default)s)")
    g.add_argument("--max-len", type=positive_int, default=None,
                   help="KV-cache capacity per request, prompt + new tokens, up to the model's limit (default: "
                        "the smaller of 2048 and that limit)")
    add_model_arguments(g)
    g.add_argument("--no-chat", action="store_true",
                   help="use the prompt as raw text (no chat template) (default: off)")
    g.add_argument("--system", default=None, help="system prompt for the chat template (default: none)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop string, not included in the output (repeatable; default: none)")
    g.add_argument("--seed", type=seed, default=None,
                   help="the same seed, prompt and settings give the same text (default: a random seed)")
    g.add_argument("--no-speculative", action="store_true",
                   help="the target alone (the autoregressive baseline) (default: off)")
    g.add_argument("--alternatives", type=int, default=None,
                   help="tokens a model draft names per draft position besides its own for the target to read in "
                        "the same verification, 0 for none (default: 2 with a model draft on a Llama-family target, "
                        "except 0 on a CPU in bf16, where the wider verification costs more than it brings; else 0)")
    g.add_argument("--verify-slope", type=non_negative_float, default=None,
                   help="with --k auto, the cost model's price of each more verified token, in decodes of one token "
                        "the same for every token (benchmarks/bench_shapes.py fits yours; default: the costs measured "
                        "for this CPU's kernel variant, tempspec_engine/adaptive_k.py VERIFY_COSTS)")
    g.add_argument("--k-min", type=int, default=None, choices=[0, 1],
                   help="with --k auto, the least lookahead: 0 lets a step run the target alone where the cost model "
                        "says no draft pays, 1 drafts in every step (to measure acceptance where drafting does not "
                        "pay) (default: 0)")
    g.add_argument("--no-confidence-stop", action="store_true",
                   help="with --k auto, choose k before drafting instead of stopping on the draft's confidence "
                        "(default: stop on confidence, except on CUDA)")
    g.add_argument("--device-loop", action="store_true",
                   help="decode through the device loop: a whole step (draft, verification, acceptance) on device "
                        "tensors, captured as one CUDA graph on CUDA, the host reading its state every --sync-every "
                        "steps; needs --k N (any draft, lookup and hybrids included), no --stop, and prints each text "
                        "when it is done (default: off)")
    g.add_argument("--sync-every", type=positive_int, default=None,
                   help="with --device-loop, steps between the host's reads of the loop state, fewer near the "
                        f"end of a wave (default: {DEFAULT_SYNC_EVERY})")
    g.add_argument("--quiet", action="store_true", help="no figures on stderr (default: off)")
    add_debug_flag(g)
    add_sweep_parser(sub)
    return ap


class StopAwareStreamer:
    """Prints one request's text as tokens arrive, never past a stop string: the text is decoded whole each time
    (safe for multi-byte characters), and the last len(longest stop) - 1 characters are held back until the request
    ends, since they may begin a stop string. `finish(text)` prints what is left of the final text."""

    def __init__(self, tokenizer, out, stops: Sequence[str] = ()):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def __call__(self, index: int, new_ids: List[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        cut = min([text.find(s) for s in self.stops if s in text] + [len(text) - self.hold])
        self._write(text[:cut])

    def finish(self, text: str) -> None:
        self._write(text)

    def _write(self, text: str) -> None:
        if len(text) > len(self.printed) and text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def generate_command(args, out=None, err=None) -> int:
    from tempspec_engine.engine import SpeculativeEngine
    from tempspec_engine.threads import set_threads

    out, err = out or sys.stdout, err or sys.stderr
    auto_only = [flag for flag, given in (("--verify-slope", args.verify_slope is not None),
                                          ("--k-min", args.k_min is not None),
                                          ("--no-confidence-stop", args.no_confidence_stop)) if given]
    if auto_only and args.k != "auto":
        raise ValueError(f"{', '.join(auto_only)} tune the adaptive lookahead (--k auto): with --k {args.k} they "
                         "would do nothing")
    if args.sync_every is not None and not args.device_loop:
        raise ValueError("--sync-every sets how often the device loop syncs: it needs --device-loop")
    if args.system is not None and args.no_chat:
        raise ValueError("--system is the chat template's system turn: it does nothing with --no-chat")
    set_threads(args.threads)
    engine = SpeculativeEngine(args.target, args.draft, device=args.device, dtype=args.dtype, k=args.k,
                               max_len=args.max_len, allow_download=args.allow_download,
                               alternatives=args.alternatives, verify_slope=args.verify_slope,
                               k_min=args.k_min or 0, confidence_stop=False if args.no_confidence_stop else None,
                               device_loop=args.device_loop, sync_every=args.sync_every)
    single = len(args.prompt) == 1
    stream = single and not args.device_loop  # (the device loop hands the tokens over at the end)
    streamer = StopAwareStreamer(engine.tokenizer, out, args.stop or ()) if stream else None
    outputs = engine.generate(args.prompt, args.temperature, args.max_new_tokens, stop=args.stop,
                              chat_template=not args.no_chat, system_prompt=args.system,
                              speculative=not args.no_speculative, seed=args.seed, on_tokens=streamer,
                              **sampling_kwargs(args))
    for i, o in enumerate(outputs):
        if stream:
            streamer.finish(o.text)
            out.write("\n")
        elif single:
            out.write(o.text + "\n")
        else:
            out.write(f"=== {i} ===\n{o.text}\n")
        if not args.quiet:
            s = o.stats
            err.write(f"[{i}] {s.new_tokens} tokens in {s.wall_time_s:.2f}s ({s.tokens_per_s:.1f} tok/s), "
                      f"{s.steps} steps ({s.plain_steps} without a draft), {s.tokens_per_step:.2f} tokens/step, "
                      f"alpha {s.alpha:.2f}, "
                      f"{s.alternative_hits} alternatives taken, prefill {s.prefill_time_s:.2f}s, "
                      f"draft {s.draft_time_s:.2f}s, target {s.target_time_s:.2f}s, finish: {o.finish_reason}\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    prog = f"tempspec {args.command}"
    body = {"generate": generate_command, "sweep": sweep_command}[args.command]
    return run_command(prog, lambda: body(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
