"""Timing one `engine.generate(...)` call: the one rule every benchmark and the sweep use.

The rule for the draft and target seconds of a call rests on how the engine schedules and charges steps
(tempspec_engine/engine.py):
  - a step's draft and target seconds are measured once and added to the stats of every request live in that step
    (so per-request times overlap wherever requests shared steps: summing them counts a shared step many times);
  - the first `width = engine.batch_width(len(prompts), batch_size)` requests start together at step 1; a request
    takes part in every step from its start until it finishes, at least one;
  - each later request, in prompt order, takes the row that a finishing request frees and joins in the very next
    step: so each of the `width` rows ("lanes") runs its requests back to back, with no gap and no overlap.
A lane's summed request times are thus exactly the step times of steps 1..(its last step), and the lane that ends
last covers every step of the call once. Hence:

    draft_time_s, target_time_s = the sums over the requests of the lane that ends last (lanes rebuilt from the
    requests' step counts in prompt order), and engine_steps = its summed steps (the batched steps of the call).

With width 1 that is the sum over the requests; with all requests in one batch, the request that ended last (the
max over them), never row 0 (it may end first). Exact up to float rounding. Outside every step's time: prefill,
a lookup that proposed nothing (its step runs the target alone), commits; `seconds` (wall) includes them.

Prefill is charged apart (charge_prefill): each prefill's wall seconds go to the requests it read, shared by their
prompt tokens, so prefill_time_s = the sum over requests counts every prefill once, and seconds - prefill_time_s is
the call's decode time (decode_seconds): what speculative decoding can shorten.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

COUNTS = ("steps", "accepted", "rejections", "lookup_steps", "plain_steps", "alternative_hits")  # summed RequestStats fields
# RequestStats lists, one count per draft position: summed elementwise
POSITION_COUNTS = ("position_proposed", "position_accepted", "position_reached")
BY_REQUEST = "by_request"  # timed_generate's [accepted, rejections] per request: joined across calls, not summed


def add_lists(a: Sequence, b: Sequence) -> list:
    """Elementwise sum of two count lists (the shorter one padded with zeros)."""
    return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]


def add_figures(total: dict, part: dict) -> None:
    """Adds one call's figures to a running total in place: numbers summed, lists (POSITION_COUNTS) elementwise, the
    per-request pairs (BY_REQUEST) joined."""
    for key, value in part.items():
        if key == BY_REQUEST:
            total[key] = list(total.get(key, ())) + [list(pair) for pair in value]
        elif isinstance(value, (list, tuple)):
            total[key] = add_lists(total.get(key, ()), value)
        else:
            total[key] = total.get(key, 0) + value


def clustered_ratio_se(parts: Sequence[Tuple[float, float]]) -> float:
    """Standard error of the ratio sum(a) / sum(n) over clusters parts = [(a_i, n_i), ...] (2 or more, sum(n) > 0),
    for counts that are not independent within a cluster (a prompt's tokens, a row's): the ratio estimator's
    sqrt(m / (m - 1) * sum_i (a_i - ratio n_i)^2) / sum(n) over the m clusters."""
    m, total = len(parts), sum(n for _, n in parts)
    ratio = sum(a for a, _ in parts) / total
    return math.sqrt(m / (m - 1) * sum((a - ratio * n) ** 2 for a, n in parts)) / total


def alpha_se(accepted: int, rejections: int, by_request: Optional[Sequence[Sequence[int]]] = None
             ) -> Optional[float]:
    """Standard error of alpha = accepted / n, n = accepted + rejections; None when n = 0. With by_request, the
    (accepted, rejections) of each request: clustered_ratio_se over the requests with a judged draft (a prompt's
    tokens share its acceptance, so they are not independent draws), when there are 2 or more. Otherwise the binomial
    sqrt(alpha (1 - alpha) / n), which assumes independent tokens."""
    n = accepted + rejections
    if not n:
        return None
    judged = [(a, a + r) for a, r in (by_request or ()) if a + r]
    if len(judged) >= 2:
        return clustered_ratio_se(judged)
    alpha = accepted / n
    return math.sqrt(alpha * (1.0 - alpha) / n)


def speedup_interval(sd_parts: Sequence[Tuple[float, float]], base_parts: Sequence[Tuple[float, float]],
                     level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Optional[List[float]]:
    """Percentile-bootstrap interval [lo, hi] of speedup = (sum SD tokens / sum SD seconds) / (sum baseline tokens /
    sum baseline seconds), resampling the prompt chunks in pairs (chunk i of both: they decoded the same prompts one
    after the other). sd_parts, base_parts: (tokens, seconds) per chunk, the same length. None with fewer than 2
    chunks or a chunk of zero seconds. Deterministic for a seed."""
    if len(sd_parts) != len(base_parts):
        raise ValueError(f"speedup_interval: {len(sd_parts)} SD chunks against {len(base_parts)} baseline chunks")
    n = len(sd_parts)
    if n < 2 or any(s <= 0 for _, s in itertools.chain(sd_parts, base_parts)):
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_boot):
        pick = [rng.randrange(n) for _ in range(n)]
        sd_tok, sd_s = sum(sd_parts[i][0] for i in pick), sum(sd_parts[i][1] for i in pick)
        base_tok, base_s = sum(base_parts[i][0] for i in pick), sum(base_parts[i][1] for i in pick)
        if sd_tok and base_tok:
            ratios.append((sd_tok / sd_s) / (base_tok / base_s))
    if not ratios:
        return None
    ratios.sort()
    tail = (1.0 - level) / 2.0
    return [ratios[int(tail * (len(ratios) - 1))], ratios[int(round((1.0 - tail) * (len(ratios) - 1)))]]


def acceptance_by_position(accepted: Iterable[int], proposed: Iterable[int]) -> List[Optional[float]]:
    """accepted[i] / proposed[i] per draft position; None where nothing was proposed."""
    return [a / p if p else None for a, p in zip(accepted, proposed)]


def sync_device(device) -> None:
    """Waits for queued GPU work so host timers measure it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def charge_prefill(stats: Sequence, prompt_tokens: Sequence[int], seconds: float) -> None:
    """Adds the wall `seconds` of one prefill to the prefill_time_s of the RequestStats it read, in proportion to
    their prompt tokens (equal shares when none has any)."""
    total = sum(prompt_tokens)
    for s, n in zip(stats, prompt_tokens):
        s.prefill_time_s += seconds * (n / total if total else 1.0 / len(stats))


def decode_seconds(figures: dict) -> Optional[float]:
    """seconds - prefill_time_s of timed_generate's figures (summed over calls or not); None without prefill_time_s
    (figures of another generator, e.g. Hugging Face's)."""
    if "prefill_time_s" not in figures:
        return None
    return figures["seconds"] - figures["prefill_time_s"]


def step_times(stats: Sequence, width: int) -> Tuple[int, float, float]:
    """(engine steps, draft seconds, target seconds) of one generate() call from its RequestStats in prompt order
    and its batch width, by the rule of the module docstring."""
    lanes = [(0, lane, 0.0, 0.0) for lane in range(width)]  # (last step, lane, draft s, target s): a heap
    for s in stats:
        end, lane, draft, target = heapq.heappop(lanes)  # the row freed first (ties: same steps, same times)
        heapq.heappush(lanes, (end + s.steps, lane, draft + s.draft_time_s, target + s.target_time_s))
    steps, _, draft, target = max(lanes)
    return steps, draft, target


def timed_generate(engine, prompts, temperature=0.0, max_new_tokens=128, *, batch_size: Optional[int] = None,
                   **kwargs) -> Tuple[List, dict]:
    """Runs engine.generate(prompts, temperature, max_new_tokens, batch_size=batch_size, **kwargs) between device
    syncs; returns (outputs, figures). figures: tokens (generated), seconds (wall, perf_counter), steps / accepted /
    rejections / lookup_steps / plain_steps (summed over requests), position_proposed / _accepted / _reached (lists per
    draft position, summed elementwise over requests), engine_steps (batched steps), draft_time_s and target_time_s
    (seconds, each step once: see the module docstring), prefill_time_s (summed over requests: each prefill once),
    by_request ([accepted, rejections] of each request, for alpha_se);
    with engine.device_loop, loop_steps, loop_wall_s and loop_syncs (its batched steps, their wall seconds, prefill
    excluded, and its host reads)."""
    sync_device(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, temperature, max_new_tokens, batch_size=batch_size, **kwargs)
    sync_device(engine.device)
    seconds = time.perf_counter() - t0
    stats = [o.stats for o in outs]
    steps, draft, target = step_times(stats, engine.batch_width(len(outs), batch_size))
    figures = {"tokens": sum(s.new_tokens for s in stats), "seconds": seconds}
    figures.update({key: sum(getattr(s, key) for s in stats) for key in COUNTS})
    for key in POSITION_COUNTS:
        total = []
        for s in stats:
            total = add_lists(total, getattr(s, key))
        figures[key] = total
    figures.update(engine_steps=steps, draft_time_s=draft, target_time_s=target,
                   prefill_time_s=sum(s.prefill_time_s for s in stats),
                   **{BY_REQUEST: [[s.accepted, s.rejections] for s in stats]})
    if getattr(engine, "device_loop", None) is not None:  # its steps and their wall seconds (prefill excluded): device_loop.py
        timing = engine.device_loop.timing
        figures.update(loop_steps=timing.steps, loop_wall_s=timing.wall_s, loop_syncs=timing.syncs)
    return outs, figures
