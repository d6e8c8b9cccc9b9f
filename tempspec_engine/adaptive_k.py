"""Adaptive lookahead: choose k from the measured acceptance rate and the measured draft/target costs.

With per-token acceptance rate alpha, one step drafting k tokens emits (1 - alpha^(k+1)) / (1 - alpha) tokens on
average (Leviathan et al., 2023). Its cost is k draft forwards plus one verification of k+1 tokens. We pick the k in
[k_min, k_max] that maximizes the batch's expected emitted tokens per second. alpha is estimated per temperature
(rounded to 0.05) from the accepted counts: alpha_hat = accepted / (accepted + rejections), which is the maximum
likelihood estimate under the i.i.d.-acceptance model whatever k was used.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens emitted by one step (accepted drafts plus the corrected/bonus token)."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveK:
    """Running estimates of alpha (per temperature) and of step costs; `choose` returns the best k."""

    def __init__(self, k_min: int = 1, k_max: int = 8, initial_k: int = 4, prior_alpha: float = 0.6,
                 decay: float = 0.98, verify_slope_prior: float = 0.05):
        self.k_min, self.k_max, self.initial_k = k_min, k_max, initial_k
        self.prior_alpha, self.decay, self.verify_slope_prior = prior_alpha, decay, verify_slope_prior
        self.counts: Dict[float, list] = {}  # temperature bucket -> [accepted, rejections] (decayed)
        self.draft_time = None  # seconds per draft forward (EMA)
        self.verify_time: Dict[int, float] = {}  # k -> seconds per verification of k+1 tokens (EMA)

    @staticmethod
    def _bucket(temperature: float) -> float:
        return round(round(float(temperature) / 0.05) * 0.05, 2)

    def alpha(self, temperature: float) -> float:
        acc, rej = self.counts.get(self._bucket(temperature), (0.0, 0.0))
        # Two pseudo-observations of the prior keep early estimates sane.
        return (acc + 2 * self.prior_alpha) / (acc + rej + 2)

    def update(self, k: int, temperatures: Sequence[float], accepted: Iterable[int],
               draft_seconds: float, verify_seconds: float) -> None:
        """Records one step: per-row temperatures and accepted counts; wall seconds of the k drafts and the verify."""
        for t, a in zip(temperatures, accepted):
            c = self.counts.setdefault(self._bucket(t), [0.0, 0.0])
            c[0] = c[0] * self.decay + a
            c[1] = c[1] * self.decay + (1.0 if a < k else 0.0)
        if k > 0:
            per = draft_seconds / k
            self.draft_time = per if self.draft_time is None else 0.9 * self.draft_time + 0.1 * per
        old = self.verify_time.get(k)
        self.verify_time[k] = verify_seconds if old is None else 0.9 * old + 0.1 * verify_seconds

    def verify_cost(self, k: int) -> float:
        """Verification seconds for k: measured, else a line through the measured points (or a prior slope)."""
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
        if self.draft_time is None or not self.verify_time:
            return self.initial_k
        alphas = [self.alpha(t) for t in temperatures]
        best_k, best_rate = self.initial_k, -1.0
        for k in range(self.k_min, self.k_max + 1):
            tokens = sum(expected_tokens(a, k) for a in alphas)
            rate = tokens / (k * self.draft_time + self.verify_cost(k))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
