"""Adaptive lookahead: choose k from the measured acceptance and the measured draft/target costs.

A step drafting k tokens emits 1 + sum_{j=1..k} alpha_1 * ... * alpha_j tokens on average, where alpha_j is the
chance that draft j is accepted given that drafts 1..j-1 were. With one alpha for every position this is Leviathan
et al.'s (1 - alpha^(k+1)) / (1 - alpha). Model drafts are close to that; n-gram lookup is not: its first token is
a coin flip, but once a copied span is accepted the next tokens almost always are. So alpha_j is estimated per
position and per temperature (rounded to 0.05) from decayed counts (accepted / reached), each shrunk toward the
position before it with two pseudo-observations. The step's cost is k draft forwards plus one verification of k+1
tokens, both measured (with the alternatives a draft names, engine.py, inside the verification; the cost model below
leaves them out: at these sizes a few more verified tokens cost next to nothing), and we pick the k in [k_min, k_max]
that maximizes the batch's expected tokens per second. The engine lets k be 0 (k_min = 0): where no draft length
pays, the step runs the target alone, and after `explore_every` such steps in a row one step drafts anyway, so that the
acceptance estimates keep learning (each exploration that changes nothing doubles that gap, up to EXPLORE_GAP_GROWTH
times; an answer of k >= 1 resets it).

Measured timings carry noise, so two runs with the same seed could pick different k and so sample different text.
With `fixed_costs` the costs come from a model instead: the engine passes the weights each forward multiplies a token
by, draft against target, and a forward over n tokens, all rows of the batch together, costs (1 + slope * (n - 1))
times one token's (slope = verify_slope_prior). So a draft forward of B rows costs (1 + slope (B - 1)) draft weights
and the verification of k+1 tokens per row (1 + slope (B (k+1) - 1)) target weights: the wider the batch, the dearer
each drafted position. The costs depend on the machine (VERIFY_COSTS; benchmarks/bench_shapes.py fits them): on a
2-core Zen 4 EPYC (AVX-512 BF16, bf16, the default target) 4 rows verifying 2 or 5 tokens each cost 1.45 and 2.2
one-row decodes, about 0.06 per token. On a 2-core Zen 1 EPYC (AVX2) the first few more tokens cost little and the
later ones more, as the forward turns from reading weights to doing arithmetic: one row verifying 2 to 5 tokens costs
1.08-1.31 decodes, 4 rows verifying 2 to 5 tokens each 1.66-3.72; so there a forward over n tokens costs
1 + slope min(n - 1, knee) + beyond max(0, n - 1 - knee). The choices then depend on the accepted counts alone, and a
seeded run repeats token for token.

Stopping on confidence (DraftChain, EAGLE-2's observation): a draft model's own probability of its top token says
much about whether that token will be accepted. Teacher-forced on held-out Spec-Bench responses, the shipped
`feature:1` head's greedy token was accepted 2% of the time when its top probability was below 0.1 and 88% when it
was above 0.9. So instead of fixing k before drafting, a model draft may decide after each token: with c_j the top
probability of the draft's (untempered) distribution at draft j, a_T(c) the acceptance of drafts of confidence c at
temperature T (calibrated online per confidence bin, starting from a_T(c) = c), the chance that drafts 1..j are all
accepted is R_j = a(c_1) ... a(c_j) and the step so far expects E_j = 1 + R_1 + ... + R_j tokens. One more draft adds
R_j * alpha_{j+1} expected tokens for one draft forward and one more verified token per row; it is drafted when that
raises the batch's expected tokens per second: sum R_j alpha_{j+1} / (added cost) > sum E_j / (cost so far). The rule
reads only the draft's own distributions and past acceptances, never this step's target, so every row stays
lossless.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

CONFIDENCE_BINS = 10  # the calibration of a draft's confidence: acceptance per tenth of [0, 1]

# The cost model's (slope, (knee, beyond) or None) per more token of a forward (module docstring), by the CPU kernel
# variant that runs a bf16 forward (linear.kernel_isa()); DEFAULT_VERIFY_SLOPE, flat, everywhere else. avx2: fitted by
# `benchmarks/bench_shapes.py --batch-sizes 1,4 --ks 1-4 --context 336` on a 2-core Zen 1 EPYC
# (benchmarks/results/shapes_smollm2-135m_cpu-amd-epyc-avx2_bf16_slope_fit.json: 0.070-0.075 per token up to 4 more,
# 0.167 beyond, in two runs); avx512bf16: the flat slope measured before on a 2-core Zen 4 EPYC (0.02-0.07 per token).
DEFAULT_VERIFY_SLOPE = 0.05
VERIFY_COSTS = {"avx2": (0.075, (4, 0.17)), "avx512bf16": (DEFAULT_VERIFY_SLOPE, None)}
EXPLORE_GAP_GROWTH = 16  # the longest run of plain steps between explorations: this many times explore_every


def expected_tokens(alpha: Union[float, Sequence[float]], k: int) -> float:
    """Expected tokens emitted by one step (accepted drafts plus the corrected/bonus token). alpha: one acceptance
    rate for every position, or alpha_j per position (at least k of them)."""
    alphas = [alpha] * k if isinstance(alpha, (int, float)) else list(alpha)[:k]
    total, reach = 1.0, 1.0
    for a in alphas:
        reach *= min(max(a, 0.0), 1.0)
        total += reach
    return total


class AdaptiveK:
    """Running estimates of alpha_j (per temperature) and of step costs; `choose` returns the best k."""

    def __init__(self, k_min: int = 1, k_max: int = 8, initial_k: int = 4, prior_alpha: float = 0.6,
                 decay: float = 0.98, verify_slope_prior: float = DEFAULT_VERIFY_SLOPE,
                 fixed_costs: Optional[Tuple[float, float]] = None, explore_every: int = 16,
                 verify_beyond: Optional[Tuple[int, float]] = None):
        """fixed_costs: (cost of one draft forward, cost of verifying one token) in any common unit; then the
        timings given to update() are not used (see the module docstring). verify_slope_prior, verify_beyond =
        (knee, beyond): the cost model's price of each more token of a forward, the first knee of them and the others
        (None: verify_slope_prior for all). k_min = 0: choose() may answer 0 (no draft pays), at first never more than
        explore_every times in a row (the module docstring)."""
        self.k_min, self.k_max, self.initial_k = k_min, k_max, initial_k
        self.explore_every = explore_every
        self._plain_run = 0  # choose()'s answers of 0 in a row
        self._explore_gap = explore_every  # answers of 0 in a row before the next exploration
        self.prior_alpha, self.decay, self.verify_slope_prior = prior_alpha, decay, verify_slope_prior
        self.verify_beyond = verify_beyond
        # temperature bucket -> [accepted, reached] per draft position 1..k_max (decayed)
        self.counts: Dict[float, List[List[float]]] = {}
        self.fixed = fixed_costs is not None
        self.draft_time = fixed_costs[0] if self.fixed else None  # seconds per draft forward (EMA)
        self.verify_base = fixed_costs[1] if self.fixed else None
        self.verify_time: Dict[int, float] = {}  # k -> seconds per verification of k+1 tokens (EMA)
        # temperature bucket -> [accepted, reached] per confidence bin (not decayed: it describes the draft, not the
        # text); filled by update() when the proposal carried its confidences (DraftChain)
        self.calibration: Dict[float, List[List[float]]] = {}

    @staticmethod
    def _bucket(temperature: float) -> float:
        return round(round(float(temperature) / 0.05) * 0.05, 2)

    def acceptance(self, temperature: float) -> List[float]:
        """[alpha_1, ..., alpha_k_max] at this temperature (the prior where nothing was measured)."""
        rows = self.counts.get(self._bucket(temperature))
        out, prior = [], self.prior_alpha
        for j in range(self.k_max):
            acc, reached = rows[j] if rows else (0.0, 0.0)
            prior = (acc + 2 * prior) / (reached + 2)
            out.append(prior)
        return out

    def confident_acceptance(self, temperature: float, confidence: float) -> float:
        """The chance that a reached draft token of this `confidence` (the top probability of the draft's untempered
        distribution) is accepted at `temperature`: the counts of its confidence bin, shrunk toward the confidence
        itself with two pseudo-observations."""
        c = min(max(float(confidence), 0.0), 1.0)
        rows = self.calibration.get(self._bucket(temperature))
        acc, reached = rows[min(int(c * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] if rows else (0.0, 0.0)
        return (acc + 2 * c) / (reached + 2)

    def update(self, k: int, temperatures: Sequence[float], accepted: Iterable[int],
               draft_seconds: float, verify_seconds: float,
               confidences: Optional[Sequence[Sequence[float]]] = None) -> None:
        """Records one step: per-row temperatures and accepted counts; wall seconds of the k drafts and the verify;
        confidences: per row, the confidence of each of its k drafts (DraftChain.confidences) or None, or None.
        k = 0, a step of the target alone: only its time counts (nothing was proposed, so the estimates of
        acceptance stay as they are)."""
        for r, (t, a) in enumerate(zip(temperatures, accepted) if k > 0 else ()):
            rows = self.counts.setdefault(self._bucket(t), [[0.0, 0.0] for _ in range(self.k_max)])
            bins = None if confidences is None or confidences[r] is None else self.calibration.setdefault(
                self._bucket(t), [[0.0, 0.0] for _ in range(CONFIDENCE_BINS)])
            for j, c in enumerate(rows):
                c[0] *= self.decay
                c[1] *= self.decay
                if j < k and j <= a:  # draft j+1 was reached (all before it accepted); accepted if j < a
                    c[1] += 1.0
                    c[0] += float(j < a)
                    if bins is not None:
                        b = bins[min(int(min(max(confidences[r][j], 0.0), 1.0) * CONFIDENCE_BINS),
                                     CONFIDENCE_BINS - 1)]
                        b[1] += 1.0
                        b[0] += float(j < a)
        if self.fixed:
            return
        if k > 0:
            per = draft_seconds / k
            self.draft_time = per if self.draft_time is None else 0.9 * self.draft_time + 0.1 * per
        old = self.verify_time.get(k)
        self.verify_time[k] = verify_seconds if old is None else 0.9 * old + 0.1 * verify_seconds

    def _forward_cost(self, weight: float, tokens: int) -> float:
        """The cost model's forward over `tokens` tokens (every row together): weight x (1 + slope (tokens - 1)), or
        with verify_beyond = (knee, beyond) weight x (1 + slope min(tokens - 1, knee) + beyond max(0, tokens - 1 -
        knee))."""
        more = tokens - 1
        if self.verify_beyond is None:
            return weight * (1 + self.verify_slope_prior * more)
        knee, beyond = self.verify_beyond
        return weight * (1 + self.verify_slope_prior * min(more, knee) + beyond * max(0, more - knee))

    def draft_cost(self, rows: int = 1) -> float:
        """One draft forward of `rows` rows: the cost model's, or the measured seconds (of the batch running)."""
        return self._forward_cost(self.draft_time, rows) if self.fixed else self.draft_time

    def verify_cost(self, k: int, rows: int = 1) -> float:
        """One verification of k+1 tokens in each of `rows` rows: the cost model's; or the measured seconds (of the
        batch running, whatever `rows`), else a line through the measured points (or the prior slope)."""
        if self.fixed:
            return self._forward_cost(self.verify_base, rows * (k + 1))
        if k in self.verify_time:
            return self.verify_time[k]
        ks = sorted(self.verify_time)
        if len(ks) >= 2:
            n = len(ks)
            mk = sum(ks) / n
            mv = sum(self.verify_time[x] for x in ks) / n
            var = sum((x - mk) ** 2 for x in ks)
            slope = sum((x - mk) * (self.verify_time[x] - mv) for x in ks) / var
            slope = max(slope, 0.0)
            return max(mv + slope * (k - mk), 1e-9)
        k0 = ks[0]
        base = self.verify_time[k0] / (1 + self.verify_slope_prior * k0)
        return base * (1 + self.verify_slope_prior * k)

    def choose(self, temperatures: Sequence[float], rows: Optional[int] = None) -> int:
        """The k in [k_min, k_max] maximizing the batch's expected tokens divided by the step's expected time (ties:
        the smaller k). temperatures: those of the rows whose proposals come from this estimator's draft; rows: the
        rows the step verifies (default: as many), each of the others expecting one token whatever k (the target's
        own). An answer of 0 (the target alone pays best) after enough of them in a row (the module docstring) is the
        best k >= 1 instead. Call it once per step: it counts its answers."""
        if not self.fixed and (self.draft_time is None or not self.verify_time):
            return self.initial_k
        rows = len(temperatures) if rows is None else rows
        per_bucket = {}
        alphas = [per_bucket.setdefault(self._bucket(t), self.acceptance(t)) for t in temperatures]
        rates = {k: (sum(expected_tokens(a, k) for a in alphas) + rows - len(alphas)) / self.step_cost(k, rows)
                 for k in range(self.k_min, self.k_max + 1)}
        best = max(rates, key=rates.get)  # (the first of equal rates: the smaller k)
        if best == 0:
            self._plain_run += 1
            if self._plain_run <= self._explore_gap:
                return 0
            self._explore_gap = min(2 * self._explore_gap, EXPLORE_GAP_GROWTH * self.explore_every)
            best = max((k for k in rates if k > 0), key=rates.get)
        else:
            self._explore_gap = self.explore_every
        self._plain_run = 0
        return best

    def chain(self, temperatures: Sequence[float], k_max: Optional[int] = None) -> "DraftChain":
        """A DraftChain for one step of rows at `temperatures` (the live rows, in order), at most k_max drafts
        (default self.k_max)."""
        return DraftChain(self, temperatures, k_max or self.k_max)

    def step_cost(self, k: int, rows: int = 1) -> Optional[float]:
        """Expected seconds (or cost units) of a step of `rows` rows drafting k tokens; None before anything was
        measured."""
        if not self.fixed and (self.draft_time is None or not self.verify_time):
            return None
        return k * self.draft_cost(rows) + self.verify_cost(k, rows)


class DraftChain:
    """One step of a model draft stopping on confidence (module docstring): after each draft token, extend() records
    the live rows' confidences and says whether one more draft raises the batch's expected tokens per second.
    confidences[r]: the confidences of live row r's drafts so far (for AdaptiveK.update)."""

    def __init__(self, est: AdaptiveK, temperatures: Sequence[float], k_max: int):
        self.est, self.temperatures, self.k_max = est, list(temperatures), k_max
        self.reach = [1.0] * len(self.temperatures)  # R_j per row: every draft so far accepted
        self.expected = [1.0] * len(self.temperatures)  # E_j per row
        self.confidences: List[List[float]] = [[] for _ in self.temperatures]
        self._next_alpha = [est.acceptance(t) for t in self.temperatures]  # alpha_j per position, per row

    @property
    def k(self) -> int:
        """Drafts so far."""
        return len(self.confidences[0]) if self.confidences else 0

    def extend(self, confidences: Sequence[float]) -> bool:
        """Records one draft's confidence per live row; True when another draft pays (and k < k_max)."""
        for r, (t, c) in enumerate(zip(self.temperatures, confidences)):
            self.confidences[r].append(float(c))
            self.reach[r] *= self.est.confident_acceptance(t, c)
            self.expected[r] += self.reach[r]
        k = self.k
        if k >= self.k_max or not self.temperatures:
            return False
        rows = len(self.temperatures)
        cost, more = self.est.step_cost(k, rows), self.est.step_cost(k + 1, rows)
        if cost is None:  # nothing measured yet: the first steps draft initial_k tokens
            return k < self.est.initial_k
        gain = sum(R * alphas[k] for R, alphas in zip(self.reach, self._next_alpha))
        return gain * cost > sum(self.expected) * (more - cost)
