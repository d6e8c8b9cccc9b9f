"""A model-free draft: n-gram lookup in the request's own tokens (prompt lookup decoding).

For each row, the last n tokens (n = max_ngram down to 1) are searched for in the row's earlier tokens (latest
occurrence first); the k tokens that followed become the proposal. The draft distribution q is one-hot on the
proposed token, so speculative sampling stays exact: a proposal x is accepted with probability p(x) and a rejection
draws from p with x removed. Rows without a match propose a repetition of their last token (almost free to verify:
a bf16 verification of k+1 tokens costs about one forward on CPU).
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import torch


@dataclasses.dataclass
class _LookupConfig:
    vocab_size: int
    max_position: int = 1 << 30


class LookupDraft:
    """Proposes k tokens per row from the row's history; `draft_logits` gives the matching one-hot logits."""

    is_lookup = True

    def __init__(self, vocab_size: int, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError("max_ngram must be >= 1")
        self.config = _LookupConfig(vocab_size)
        self.max_ngram = max_ngram

    def propose_row(self, seq: Sequence[int], k: int) -> List[int]:
        n_tokens = len(seq)
        for n in range(min(self.max_ngram, n_tokens - 1), 0, -1):
            tail = list(seq[n_tokens - n:])
            for start in range(n_tokens - n - 1, -1, -1):  # latest earlier occurrence first
                if list(seq[start:start + n]) == tail:
                    follow = list(seq[start + n:start + n + k])
                    if follow:
                        return (follow + [follow[-1]] * k)[:k]
        return [seq[-1]] * k

    def propose(self, seqs: Sequence[Sequence[int]], k: int) -> List[List[int]]:
        """Proposals [B][k] (python ints)."""
        return [self.propose_row(s, k) for s in seqs]

    @staticmethod
    def draft_logits(tokens: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot logits [B, k, vocab]: 0 at the proposed token, -inf elsewhere. tokens [B, k] int64."""
        logits = torch.full((*tokens.shape, vocab), float("-inf"), dtype=dtype, device=tokens.device)
        return logits.scatter_(2, tokens.unsqueeze(-1), 0.0)
