"""Readable PyTorch reference of the fused speculative-sampling ops.

Every backend (C++ CPU, CUDA, Triton) is tested token-for-token against these functions, so they define the exact
semantics. They do no input validation: `tempspec_engine.ops` validates and then calls a backend.

Conventions shared by every backend (all arithmetic in fp32, whatever the logits' dtype):
- Temperature softmax of a logit row l at T > 0: m = max(l), w_t = exp((l_t - m) / T), s = sum_t w_t, prob = w / s.
  -inf logits give w_t = 0 (masked tokens).
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


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Draw one token from non-negative fp32 weights [V] with the uniform u in [0, 1) (see module docstring)."""
    total = weights.sum()
    cdf = torch.cumsum(weights, dim=0)
    hit = torch.nonzero((weights > 0) & (cdf >= u * total))
    if hit.numel() > 0:
        return int(hit[0, 0])
    return int(torch.nonzero(weights > 0)[-1, 0])


def reference_speculative_sample(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative-sampling verification step, row by row.

    draft_logits [B, k, V], target_logits [B, k+1, V] (same V), draft_tokens [B, k] int64, temperature [B] fp32 >= 0,
    uniforms [B, k+1] fp32 in [0, 1). Returns (accepted [B] int64, tokens [B, k+1] int64, -1 after the emitted token).
    """
    B, k, _ = draft_logits.shape
    accepted = torch.zeros(B, dtype=torch.int64)
    tokens = torch.full((B, k + 1), -1, dtype=torch.int64)
    for b in range(B):
        t = float(temperature[b])
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
                temp = torch.tensor(t)
                wp = softmax_weights(target_logits[b, i], temp)
                wq = softmax_weights(draft_logits[b, i], temp)
                p = wp / wp.sum()
                q = wq / wq.sum()
                if not (p[x] > 0 and float(uniforms[b, i]) * q[x] <= p[x]):
                    residual = torch.clamp(p - q, min=0.0)
                    weights = residual if residual.sum() > 0 else wp
                    emitted = inverse_cdf(weights, float(uniforms[b, k]))
                    break
            tokens[b, i] = x
            n += 1
        if emitted is None:  # all k accepted: the bonus token from the target's last position
            if t == 0.0:
                emitted = int(torch.argmax(target_logits[b, k].float()))
            else:
                emitted = inverse_cdf(softmax_weights(target_logits[b, k], torch.tensor(t)), float(uniforms[b, k]))
        tokens[b, n] = emitted
        accepted[b] = n
    return accepted.to(draft_logits.device), tokens.to(draft_logits.device)


def reference_sample(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Temperature sampling of one token per row.

    logits [B, V], temperature [B] fp32 >= 0 (0: argmax), uniforms [B] fp32 in [0, 1). Returns [B] int64.
    """
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    for b in range(logits.shape[0]):
        t = float(temperature[b])
        if t == 0.0:
            out[b] = int(torch.argmax(logits[b].float()))
        else:
            out[b] = inverse_cdf(softmax_weights(logits[b], torch.tensor(t)), float(uniforms[b]))
    return out.to(logits.device)
