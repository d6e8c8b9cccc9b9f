"""Adaptive lookahead: choose k from the measured acceptance and the measured draft/target costs.

A step drafting k tokens emits 1 + sum_{j=1..k} alpha_1 * ... * alpha_j tokens on average, where alpha_j is the
chance that draft j is accepted given that drafts 1..j-1 were. With one alpha for every position this is Leviathan
et al.'s (1 - alpha^(k+1)) / (1 - alpha). Model drafts are close to that; n-gram lookup is not: its first token is
a coin flip, but once a copied span is accepted the next tokens almost always are. So alpha_j is estimated per
position and per temperature (rounded to 0.05) from decayed counts (accepted / reached), each shrunk toward the
position before it with two pseudo-observations. The step's cost is k draft forwards plus one verification of k+1
tokens, both measured; we pick the k in [k_min, k_max] that maximizes the batch's expected tokens per second.

Measured timings carry noise, so two runs with the same seed could pick different k and so sample different text.
With `fixed_costs` the costs come from a model instead (the engine passes the weights each forward multiplies a token
by, draft against target, and the verification of k+1 tokens costs (1 + verify_slope_prior * k) times one): the
choices then depend on the accepted counts alone, and a seeded run repeats token for token.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union


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
                 decay: float = 0.98, verify_slope_prior: float = 0.05,
                 fixed_costs: Optional[Tuple[float, float]] = None):
        """fixed_costs: (cost of one draft forward, cost of verifying one token) in any common unit; then the
        timings given to update() are not used (see the module docstring)."""
        self.k_min, self.k_max, self.initial_k = k_min, k_max, initial_k
        self.prior_alpha, self.decay, self.verify_slope_prior = prior_alpha, decay, verify_slope_prior
        # temperature bucket -> [accepted, reached] per draft position 1..k_max (decayed)
        self.counts: Dict[float, List[List[float]]] = {}
        self.fixed = fixed_costs is not None
        self.draft_time = fixed_costs[0] if self.fixed else None  # seconds per draft forward (EMA)
        self.verify_base = fixed_costs[1] if self.fixed else None
        self.verify_time: Dict[int, float] = {}  # k -> seconds per verification of k+1 tokens (EMA)

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

    def update(self, k: int, temperatures: Sequence[float], accepted: Iterable[int],
               draft_seconds: float, verify_seconds: float) -> None:
        """Records one step: per-row temperatures and accepted counts; wall seconds of the k drafts and the verify."""
        for t, a in zip(temperatures, accepted):
            rows = self.counts.setdefault(self._bucket(t), [[0.0, 0.0] for _ in range(self.k_max)])
            for j, c in enumerate(rows):
                c[0] *= self.decay
                c[1] *= self.decay
                if j < k and j <= a:  # draft j+1 was reached (all before it accepted); accepted if j < a
                    c[1] += 1.0
                    c[0] += float(j < a)
        if self.fixed:
            return
        if k > 0:
            per = draft_seconds / k
            self.draft_time = per if self.draft_time is None else 0.9 * self.draft_time + 0.1 * per
        old = self.verify_time.get(k)
        self.verify_time[k] = verify_seconds if old is None else 0.9 * old + 0.1 * verify_seconds

    def verify_cost(self, k: int) -> float:
        """Verification seconds for k: measured, else a line through the measured points (or a prior slope)."""
        if self.fixed:
            return self.verify_base * (1 + self.verify_slope_prior * k)
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

    def choose(self, temperatures: Sequence[float]) -> int:
        """The k maximizing sum over rows of expected tokens, divided by the step's expected time."""
        if not self.fixed and (self.draft_time is None or not self.verify_time):
            return self.initial_k
        per_bucket = {}
        alphas = [per_bucket.setdefault(self._bucket(t), self.acceptance(t)) for t in temperatures]
        best_k, best_rate = self.initial_k, -1.0
        for k in range(self.k_min, self.k_max + 1):
            tokens = sum(expected_tokens(a, k) for a in alphas)
            rate = tokens / (k * self.draft_time + self.verify_cost(k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
