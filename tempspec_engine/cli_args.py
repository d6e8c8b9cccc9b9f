"""Arguments that several command lines share (`tempspec generate`, `tempspec sweep`, the benchmark scripts), with
one help text each that states the default and the accepted forms."""
from __future__ import annotations

import argparse

from tempspec_engine.checks import LENIENCE, MIN_P, TOP_K, TOP_P, SamplingArg
from tempspec_engine.models.draft import DEFAULT_DRAFT, FALLBACK_DRAFT

DRAFT_FORMS = (f"'default' ({DEFAULT_DRAFT} for the default target, {FALLBACK_DRAFT} for others), 'none' (the "
               "target alone), lookup[:N], lookup+<model spec>, layers:0,14,29 or layers:0-3, distilled:0 / "
               "distilled:0.5 / distilled:1 and feature:T / feature:mix (shipped), random[:N] (tests), with "
               "'/vocab:N' after a layer subset, distilled:T or a draft directory; a tempspec draft directory or a "
               "Hugging Face model directory; a hub id only with --allow-download")


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return x


MAX_SEED = 2**32 - 1  # seeds derived from a seed (gen-data's per chunk) stay within torch's 64-bit range


def seed(text: str) -> int:
    """--seed: an integer in [0, 2**32 - 1] (argparse type)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}")
    return n


def sampling_value(arg: SamplingArg):
    """The argparse type of one sampling flag: its range from tempspec_engine/checks.py, refused at parse time
    (before a model loads)."""
    def parse(text: str):
        try:
            return arg.checked(int(text) if arg.integer else float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {arg.expected}, got {text!r}") from None
    parse.__name__ = arg.name
    return parse


def lookahead(text: str):
    """--k: 'auto' or an integer >= 1."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--target, --device, --dtype, --k, --threads, --allow-download."""
    p.add_argument("--target", default="default",
                   help="'default' (SmolLM2-135M-Instruct, shipped offline) or a Hugging Face model directory; a hub "
                        "id only with --allow-download (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="weights and activations (default: %(default)s)")
    p.add_argument("--k", type=lookahead, default="auto",
                   help="lookahead: 'auto' (adaptive; with a seed it does not depend on timings) or an integer >= 1 "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 picks the cores that other processes leave free "
                        "(tempspec_engine/threads.py; default: %(default)s)")
    p.add_argument("--allow-download", action="store_true",
                   help="let --target/--draft name a Hugging Face hub id, fetched over the network unless "
                        "HF_HUB_OFFLINE=1 (default: off: nothing waits on the network)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--top-k, --top-p, --min-p, --lenience, --filter-target-only (semantics: tempspec_engine/reference.py)."""
    p.add_argument("--top-k", type=sampling_value(TOP_K), default=0,
                   help="keep the k most likely tokens (default: %(default)s = off)")
    p.add_argument("--top-p", type=sampling_value(TOP_P), default=1.0,
                   help="keep the most likely tokens holding this probability mass (default: %(default)s = off)")
    p.add_argument("--min-p", type=sampling_value(MIN_P), default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely (default: %(default)s = off)")
    p.add_argument("--lenience", type=sampling_value(LENIENCE), default=1.0,
                   help="lossy acceptance in (0, 1]: accept x when u * lenience * q(x) <= p(x) (default: %(default)s "
                        "= lossless)")
    p.add_argument("--filter-target-only", action="store_true",
                   help="the serving engines' way: the draft samples unfiltered, only the target is filtered "
                        "(default: both are)")


def sampling_kwargs(args) -> dict:
    """The generate() keyword arguments of add_sampling_arguments' flags."""
    return dict(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, lenience=args.lenience,
                filter_draft=not args.filter_target_only)
