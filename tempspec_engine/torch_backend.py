"""Vectorized PyTorch backend of the fused ops: runs on any device, and is the eager / torch.compile baseline.

Same semantics as tempspec_engine/reference.py (which loops row by row for readability); this one materializes
fp32 probabilities of shape [B, k+1, V], so it moves several times the bytes of the fused kernels. The filtered ops
take their keep rule from the reference (`filtered_weights`, which is vectorized), sorting each row.
"""
from __future__ import annotations

from typing import Callable

import torch

from tempspec_engine.reference import filtered_weights


def _weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """exp((l - max l) / T) in fp32. logits [B, n, V]; temperature [B] fp32 > 0. Returns [B, n, V]."""
    l32 = logits.float()
    return torch.exp((l32 - l32.amax(dim=-1, keepdim=True)) / temperature[:, None, None])


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Batched inverse-CDF draw. weights [B, V] fp32 >= 0, u [B] fp32 in [0, 1). Returns [B] int64.

    First t with w_t > 0 and cumsum_t >= u * sum(w); if rounding leaves none, the last t with w_t > 0.
    """
    positive = weights > 0
    hit = positive & (torch.cumsum(weights, dim=-1) >= (u * weights.sum(dim=-1))[:, None])
    first_hit = torch.argmax(hit.to(torch.int8), dim=-1)
    last_positive = weights.shape[-1] - 1 - torch.argmax(positive.flip(-1).to(torch.int8), dim=-1)
    return torch.where(hit.any(dim=-1), first_hit, last_positive)


def _filtered_weights_fn(top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> Callable:
    """A `_weights` replacement giving the filtered weights (reference.filtered_weights) of per-row settings [B]."""

    def weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        shape = logits.shape[:-1]  # [B, n]
        return filtered_weights(logits, temperature[:, None].expand(shape), top_k[:, None].expand(shape),
                                top_p[:, None].expand(shape), min_p[:, None].expand(shape))

    return weights


def speculative_sample_torch(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_logits [B, k, V], target_logits [B, k+1, V], draft_tokens [B, k] int64, temperature [B] fp32,
    uniforms [B, k+1] fp32. Returns (accepted [B] int64, tokens [B, k+1] int64, -1 after the emitted token)."""
    return _speculate(draft_logits, target_logits, draft_tokens, temperature, uniforms, _weights, None)


def speculative_sample_filtered_torch(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    lenience: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As speculative_sample_torch on the filtered distributions, with lenience: top_k int64 [B], top_p, min_p and
    lenience fp32 [B]."""
    weights = _filtered_weights_fn(top_k, top_p, min_p)
    return _speculate(draft_logits, target_logits, draft_tokens, temperature, uniforms, weights, lenience)


def _speculate(draft_logits, target_logits, draft_tokens, temperature, uniforms, weights_fn: Callable,
               lenience: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance step with row weights weights_fn(logits [B, n, V], T [B]) -> fp32 [B, n, V] and lenience [B]
    (None: lossless, without the multiplications by 1)."""
    B, k, _ = draft_logits.shape
    rows = torch.arange(B, device=draft_logits.device)
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)

    wp = weights_fn(target_logits, safe_t)  # [B, k+1, V]
    wq = weights_fn(draft_logits, safe_t)  # [B, k, V]
    p = wp / wp.sum(dim=-1, keepdim=True)
    q = wq / wq.sum(dim=-1, keepdim=True)
    target_argmax = torch.argmax(target_logits, dim=-1)  # [B, k+1]

    x = draft_tokens[..., None]
    px = p[:, :k].gather(-1, x).squeeze(-1)
    qx = q.gather(-1, x).squeeze(-1)
    eps_qx = qx if lenience is None else lenience[:, None] * qx
    accept_sampled = (px > 0) & (uniforms[:, :k] * eps_qx <= px)
    accept_greedy = draft_tokens == target_argmax[:, :k]
    accept = torch.where(greedy[:, None], accept_greedy, accept_sampled)
    accepted = torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)  # leading run of acceptances

    # Emission at position n = accepted: residual max(0, p_n - q_n) after a rejection, target weights as bonus
    # (n == k) or when the residual is all zero.
    all_accepted = accepted == k
    n_draft = torch.clamp(accepted, max=k - 1)
    q_n = q[rows, n_draft] if lenience is None else lenience[:, None] * q[rows, n_draft]
    residual = torch.clamp(p[rows, accepted] - q_n, min=0.0)
    use_target = all_accepted | (residual.sum(dim=-1) == 0)
    weights = torch.where(use_target[:, None], wp[rows, accepted], residual)
    emitted = torch.where(greedy, target_argmax[rows, accepted], _inverse_cdf(weights, uniforms[:, k]))

    positions = torch.arange(k + 1, device=draft_logits.device)[None, :]
    padded_draft = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    tokens = torch.where(positions < accepted[:, None], padded_draft, torch.full_like(padded_draft, -1))
    tokens[rows, accepted] = emitted
    return accepted, tokens


def sample_torch(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [B, V], temperature [B] fp32 (0: argmax), uniforms [B] fp32. Returns [B] int64."""
    return _sample(logits, temperature, uniforms, _weights)


def sample_filtered_torch(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
                          top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """As sample_torch from the filtered distribution: top_k int64 [B], top_p and min_p fp32 [B]."""
    return _sample(logits, temperature, uniforms, _filtered_weights_fn(top_k, top_p, min_p))


def _sample(logits, temperature, uniforms, weights_fn: Callable) -> torch.Tensor:
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    weights = weights_fn(logits[:, None, :], safe_t)[:, 0]
    return torch.where(greedy, torch.argmax(logits, dim=-1), _inverse_cdf(weights, uniforms))
