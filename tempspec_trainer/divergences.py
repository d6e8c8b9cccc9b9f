"""Token-level divergences between the target p = softmax(target_logits / tau) and the draft q = softmax(draft / tau).

Every function takes logits [N, V] (any float dtype; reduced in fp32) and returns per-token values [N] fp32:
  forward_kl  KL(p || q)                                  (mass-covering; the usual KD loss)
  reverse_kl  KL(q || p)                                  (mode-seeking)
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q   (DistillSpec's JSD(beta))
  tvd         0.5 sum |p - q|                             (speculative acceptance: alpha = 1 - TVD)
tau = 0 is greedy decoding: p is one-hot on the target's first argmax and q = softmax(draft) at temperature 1, so
forward KL is the cross-entropy of the target's greedy token and 1 - TVD is q's mass on it; reverse KL is infinite
there and raises. Tokens that a logit of -inf excludes from p contribute 0 log 0 = 0.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def _log_probs(draft_logits: torch.Tensor, target_logits: torch.Tensor, tau: float):
    """(log q, log p) [N, V] fp32 at temperature tau (tau == 0: p one-hot on the target argmax, q at tau 1)."""
    if draft_logits.shape != target_logits.shape:
        raise ValueError(f"draft logits {tuple(draft_logits.shape)} and target logits {tuple(target_logits.shape)} "
                         "must have the same shape [N, V] (pad the smaller vocabulary first)")
    if not (tau >= 0.0):
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    d, t = draft_logits.float(), target_logits.float()
    if tau == 0.0:
        log_p = torch.full_like(t, float("-inf")).scatter_(-1, t.argmax(-1, keepdim=True), 0.0)
        return F.log_softmax(d, dim=-1), log_p
    return F.log_softmax(d / tau, dim=-1), F.log_softmax(t / tau, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, with 0 log 0 = 0."""
    a = log_a.exp()
    gap = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))  # where() first: no 0 * inf, no NaN gradients
    return (a * gap).sum(-1)


def forward_kl(draft_logits, target_logits, tau: float) -> torch.Tensor:
    log_q, log_p = _log_probs(draft_logits, target_logits, tau)
    return _kl(log_p, log_q)


def reverse_kl(draft_logits, target_logits, tau: float) -> torch.Tensor:
    if tau == 0.0:
        raise ValueError("reverse KL against a greedy (tau = 0) target is infinite: use fkl, jsd or tvd at tau 0")
    log_q, log_p = _log_probs(draft_logits, target_logits, tau)
    return _kl(log_q, log_p)


def jsd(draft_logits, target_logits, tau: float, beta: float = 0.5) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"JSD beta must lie in (0, 1), got {beta}")
    log_q, log_p = _log_probs(draft_logits, target_logits, tau)
    both = torch.isinf(log_p) & torch.isinf(log_q)  # excluded by both: logaddexp(-inf, -inf) has a NaN gradient
    zero = torch.zeros_like(log_p)
    log_m = torch.logaddexp(torch.where(both, zero, log_p) + math.log(beta),
                            torch.where(both, zero, log_q) + math.log(1.0 - beta))
    log_m = torch.where(both, torch.full_like(log_m, float("-inf")), log_m)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def tvd(draft_logits, target_logits, tau: float) -> torch.Tensor:
    log_q, log_p = _log_probs(draft_logits, target_logits, tau)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


DIVERGENCES: Dict[str, Callable[..., torch.Tensor]] = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "tvd": tvd}


def get_divergence(name: str) -> Callable[..., torch.Tensor]:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name]


def expected_acceptance(draft_logits, target_logits, tau: float) -> torch.Tensor:
    """Per-token expected acceptance [N]: 1 - TVD at tau; at tau 0, whether the two argmaxes agree (0/1)."""
    if tau == 0.0:
        if draft_logits.shape != target_logits.shape:
            raise ValueError(f"draft logits {tuple(draft_logits.shape)} and target logits "
                             f"{tuple(target_logits.shape)} must have the same shape [N, V]")
        return (draft_logits.float().argmax(-1) == target_logits.float().argmax(-1)).float()
    return 1.0 - tvd(draft_logits, target_logits, tau)
