"""Readable PyTorch reference of the fused speculative-sampling ops.

Every backend (C++ CPU, CUDA, Triton) is tested token-for-token against these functions, so they define the exact
semantics. They do no input validation: `tempspec_engine.ops` validates and then calls a backend.

Token-for-token holds up to fp32 rounding, not to the bit: the backends' exp (the C++ polynomial, CUDA's ex2.approx,
Triton's tl.exp) and sums may differ from torch's in the last bit, so a uniform within an ulp of a CDF boundary, or a
min-p / top-p threshold that equals a token's weight exactly, can give the neighbouring token. Random inputs meet such
a boundary rarely (a 2026-12-07 audit: the C++ exp differs from torch.exp by 1 ulp on about 6% of inputs, and a
random search with u near 1 found 3-131 differing draws per 3,000 rows); the tests' inputs avoid them. The draw
itself reads one fp32 uniform, 24 bits: every token's chance of being drawn is a multiple of 2^-24, so tokens below
about 6e-8 are drawn with chance 0 or 2^-24. Over a vocabulary of tens of thousands such tail tokens can hold a few
1e-4 of probability in all; that is the resolution of "exact" here, in every backend alike.

Conventions shared by every backend (all arithmetic in fp32, whatever the logits' dtype):
- Temperature softmax of a logit row l at T > 0: m = max(l), w_t = exp((l_t - m) / T), s = sum_t w_t, prob = w / s.
  -inf logits give w_t = 0 (masked tokens). The largest weight is exactly exp(0) = 1.
- Inverse-CDF draw from non-negative weights w with a uniform u in [0, 1): S = sum(w); return the first token t with
  w_t > 0 and cumsum(w)_t >= u * S. If rounding leaves no such token, return the last token with w_t > 0.
  A token of zero weight is never returned.
- Acceptance at draft position i (T > 0): x = draft_tokens[i], p = softmax(target_i / T), q = softmax(draft_i / T);
  accept iff p(x) > 0 and u_i * q(x) <= p(x)  (that is u_i <= min(1, p(x)/q(x)), with q(x) = 0 accepted and p(x) = 0
  always rejected).
- At the first rejected position j: draw from the residual w = max(0, p_j - q_j) with u_k; if the residual is all zero,
  draw from p_j instead (weights exp((l - m) / T)). If all k are accepted: draw the bonus token from target row k
  (weights exp((l - m) / T)) with u_k.
- Greedy rows (T == 0): accept while x == argmax(target_i) (first index of the maximum); emit argmax(target_j) at the
  first mismatch, or argmax(target_k) as the bonus. Draft logits and uniforms are not used.

Sampling filters (per row; the same settings apply to the row's target and draft distributions):
  top_k (int >= 0, 0 = off), top_p (in (0, 1], 1 = off), min_p (in [0, 1), 0 = off).
  The filtered distribution F(softmax(l / T)) keeps the tokens every filter keeps and renormalizes; in the formulas
  above every weight row w is replaced by w * keep (so p, q, the residual and the draws all use F(p), F(q)).
  They act in Hugging Face transformers' logits-warper order (`_get_logits_processor`: temperature, top-k, top-p,
  min-p), and each one is a threshold on a value, so tokens tied with the boundary value are all kept:
  1. top-k: keep l_t >= l_(k), the k-th largest fp32 logit of the row counting repeats (torch.topk's k-th value, as
     HF's TopKLogitsWarper). On the raw logits, not on l / T: same order for T > 0, and exact in every backend
     (HF ranks l / T, whose rounding can merge two logits that differ in the last bit; we keep them apart).
     top_k >= V keeps everything.
  2. top-p, measured on the distribution after top-k: with K the tokens top-k keeps, mass(v) = sum of w_t over
     t in K with w_t >= v, and goal = top_p * mass(0), keep w_t >= v* where v* is the largest weight value with
     mass(v*) >= goal (the smallest set of most probable tokens holding top_p of the mass, extended to ties).
     Rounding rule: masses are sums of the fp32 weights accumulated in fp64, top_p is widened to fp64 and the
     comparison mass(v) >= goal is made in fp64; the summation order is left to each backend (its effect, ~1e-16
     relative, is far below the ulp differences of the fp32 weights themselves). v* > 0 always (w_max = 1 is in K).
     This is HF's TopPLogitsWarper (which drops a token when the mass strictly above it already reaches top_p),
     except that ties at the boundary are kept together instead of being split by sort order.
  3. min-p: keep prob_t >= min_p * max prob, evaluated as w_t >= min_p on the unnormalized weights (the max weight
     is exactly 1 and the ratio prob_t / max prob does not change when top-k / top-p renormalize), so no division
     rounds. Applying it after top-p (HF's order) therefore only intersects the kept sets.
  The kept set is always {t : l_t >= logit_min and w_t >= weight_min} with weight_min = max(v*, min_p): two
  thresholds per row, which a threshold-search kernel reproduces without sorting. The row's argmax is always kept,
  so greedy rows (T == 0) ignore the filters.

Lossy (lenient) acceptance, per row lenience eps in (0, 1] (1 = lossless): the lenient rejection sampling of
Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", the appendix on lenience:
q(x) is multiplied by the lenience before it is compared with p(x)), the lossy form also used by DistillSpec
(Zhou et al. 2024):
  accept iff p(x) > 0 and u_i * (eps * q(x)) <= p(x)  (u_i <= min(1, p(x) / (eps q(x)))),
  residual max(0, p - eps * q) (fallback p when it is all zero), bonus unchanged; p and q are the filtered F(p), F(q).
  eps * q(x) is formed first and eps = 1 leaves every operand bit-identical, so eps = 1 equals the lossless call.
  The first emitted token is then distributed as `lenient_emitted_distribution(p, q, eps)`:
  min(q, p / eps) + (1 - sum min(q, p / eps)) * normalize(max(0, p - eps * q)).
"""
from __future__ import annotations

import torch


def softmax_weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Unnormalized temperature-softmax weights exp((l - max l) / T).

    logits: [..., V] any float dtype; temperature: [...] fp32 > 0. Returns fp32 [..., V].
    """
    l32 = logits.float()
    m = l32.amax(dim=-1, keepdim=True)
    return torch.exp((l32 - m) / temperature.unsqueeze(-1))


def top_k_logit_threshold(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """logit_min of top-k: the k-th largest fp32 logit, -inf where top_k is 0 (off) or >= V.

    logits [..., V] any float dtype; top_k [...] int64 >= 0. Returns fp32 [...].
    """
    l32 = logits.float()
    V = l32.shape[-1]
    ranked = torch.sort(l32, dim=-1, descending=True).values
    kth = ranked.gather(-1, (top_k.clamp(1, V) - 1).unsqueeze(-1)).squeeze(-1)
    off = (top_k <= 0) | (top_k >= V)
    return torch.where(off, torch.full_like(kth, float("-inf")), kth)


def top_p_weight_threshold(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """v* of top-p: the largest weight value whose mass(v) = sum(w >= v) reaches top_p * sum(w), 0 where top_p >= 1.

    weights [..., V] fp32 >= 0 (already zero outside the top-k set); top_p [...] fp32 in (0, 1]. Masses in fp64
    (module docstring). Returns fp32 [...].
    """
    ranked = torch.sort(weights.double(), dim=-1, descending=True).values
    mass = torch.cumsum(ranked, dim=-1)  # non-decreasing: mass[i] = mass(ranked[i]) up to the rest of a tie group
    goal = top_p.double() * mass[..., -1]
    first = (mass < goal.unsqueeze(-1)).sum(dim=-1).clamp(max=weights.shape[-1] - 1)  # first index with mass >= goal
    v_star = ranked.gather(-1, first.unsqueeze(-1)).squeeze(-1).float()
    return torch.where(top_p >= 1, torch.zeros_like(v_star), v_star)


def filter_thresholds(logits: torch.Tensor, weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit_min, weight_min) of the filters in HF order: token t is kept iff l_t >= logit_min and w_t >= weight_min.

    logits [..., V]; weights = softmax_weights(logits, T) fp32 [..., V]; top_k int64, top_p and min_p fp32, all [...].
    Returns two fp32 [...] tensors (-inf and 0 where every filter is off).
    """
    logit_min = top_k_logit_threshold(logits, top_k)
    after_top_k = torch.where(logits.float() >= logit_min.unsqueeze(-1), weights, torch.zeros_like(weights))
    weight_min = torch.maximum(top_p_weight_threshold(after_top_k, top_p), min_p.float())
    return logit_min, weight_min


def filtered_weights(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor) -> torch.Tensor:
    """Weights of F(softmax(l / T)): exp((l - max l) / T) where the filters keep the token, 0 elsewhere.

    logits [..., V] any float dtype; temperature [...] fp32 > 0; top_k int64, top_p and min_p fp32, all [...].
    Returns fp32 [..., V] (exactly softmax_weights where every filter is off).
    """
    w = softmax_weights(logits, temperature)
    logit_min, weight_min = filter_thresholds(logits, w, top_k, top_p, min_p)
    keep = (logits.float() >= logit_min.unsqueeze(-1)) & (w >= weight_min.unsqueeze(-1))
    return torch.where(keep, w, torch.zeros_like(w))


def lenient_emitted_distribution(p: torch.Tensor, q: torch.Tensor, lenience: float) -> torch.Tensor:
    """Distribution of the first token emitted by lenient speculative sampling of one draft token x ~ q.

    P(x drafted and accepted) = q(x) min(1, p(x) / (eps q(x))) = min(q(x), p(x) / eps); a rejection (probability
    1 - sum of those) emits from normalize(max(0, p - eps q)) (p when that is all zero). p, q: [..., V] probabilities
    (the filtered F(p), F(q) when filters are on), one distribution per row. Returns float64 [..., V]; equals p when
    eps = 1.
    """
    p, q = p.double(), q.double()
    accepted = torch.minimum(q, p / lenience)
    residual = torch.clamp(p - lenience * q, min=0.0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / torch.where(total > 0, total, 1.0), p)
    return accepted + (1.0 - accepted.sum(-1, keepdim=True)) * residual


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Draw one token from non-negative fp32 weights [V] with the uniform u in [0, 1) (see module docstring)."""
    total = weights.sum()
    cdf = torch.cumsum(weights, dim=0)
    hit = torch.nonzero((weights > 0) & (cdf >= u * total))
    if hit.numel() > 0:
        return int(hit[0, 0])
    return int(torch.nonzero(weights > 0)[-1, 0])


class _RowSettings:
    """The sampling settings of batch row b as 0-d tensors (filters off and lenience 1 where not given)."""

    def __init__(self, b: int, top_k, top_p, min_p, lenience=None):
        self.top_k = torch.tensor(0) if top_k is None else top_k[b].cpu().long()
        self.top_p = torch.tensor(1.0) if top_p is None else top_p[b].cpu().float()
        self.min_p = torch.tensor(0.0) if min_p is None else min_p[b].cpu().float()
        self.lenience = 1.0 if lenience is None else float(lenience[b])

    def weights(self, logits: torch.Tensor, t: float) -> torch.Tensor:
        """filtered_weights of one logit row [V] at temperature t > 0."""
        return filtered_weights(logits, torch.tensor(t), self.top_k, self.top_p, self.min_p)


def reference_speculative_sample(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    lenience: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative-sampling verification step, row by row.

    draft_logits [B, k, V], target_logits [B, k+1, V] (same V), draft_tokens [B, k] int64, temperature [B] fp32 >= 0,
    uniforms [B, k+1] fp32 in [0, 1); optional per-row top_k [B] int64, top_p, min_p, lenience [B] fp32 (None: off).
    Returns (accepted [B] int64, tokens [B, k+1] int64, -1 after the emitted token).
    """
    B, k, _ = draft_logits.shape
    accepted = torch.zeros(B, dtype=torch.int64)
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64)
    for b in range(B):
        t = float(temperature[b])
        row = _RowSettings(b, top_k, top_p, min_p, lenience)
        n = 0
        emitted = None
        for i in range(k):
            x = int(draft_tokens[b, i])
            if t == 0.0:
                target_choice = int(torch.argmax(target_logits[b, i].float()))
                if x != target_choice:
                    emitted = target_choice
                    break
            else:
                wp = row.weights(target_logits[b, i], t)
                wq = row.weights(draft_logits[b, i], t)
                p = wp / wp.sum()
                q = wq / wq.sum()
                eps = torch.tensor(row.lenience)
                if not (p[x] > 0 and float(uniforms[b, i]) * (eps * q[x]) <= p[x]):
                    residual = torch.clamp(p - eps * q, min=0.0)
                    weights = residual if residual.sum() > 0 else wp
                    emitted = inverse_cdf(weights, float(uniforms[b, k]))
                    break
            tokens[b, i] = x
            n += 1
        if emitted is None:  # all k accepted: the bonus token from the target's last position
            if t == 0.0:
                emitted = int(torch.argmax(target_logits[b, k].float()))
            else:
                emitted = inverse_cdf(row.weights(target_logits[b, k], t), float(uniforms[b, k]))
        tokens[b, n] = emitted
        accepted[b] = n
    return accepted.to(draft_logits.device), tokens.to(draft_logits.device)


def reference_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature sampling of one token per row from F(softmax(logits / T)).

    logits [B, V], temperature [B] fp32 >= 0 (0: argmax), uniforms [B] fp32 in [0, 1); optional per-row top_k [B]
    int64, top_p, min_p [B] fp32 (None: off). Returns [B] int64.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    for b in range(logits.shape[0]):
        t = float(temperature[b])
        if t == 0.0:
            out[b] = int(torch.argmax(logits[b].float()))
        else:
            weights = _RowSettings(b, top_k, top_p, min_p).weights(logits[b], t)
            out[b] = inverse_cdf(weights, float(uniforms[b]))
    return out.to(logits.device)
