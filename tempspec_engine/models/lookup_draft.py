"""A model-free draft: n-gram lookup in the request's own tokens (prompt lookup decoding).

For each row, the last n tokens (n = max_ngram down to min_ngram) are searched for in the row's earlier tokens (latest
occurrence first); up to k tokens that followed become the proposal. A row without a match proposes nothing: the
engine then runs a plain target step for it (or, with a model draft behind the lookup, drafts with that model)
instead of verifying guesses that are almost never accepted. The draft distribution q is one-hot on the proposed
token, so speculative sampling stays exact: a proposal x is accepted with probability p(x) and a rejection draws from
p with x removed.

LookupDraft.propose_row states the rule by scanning the row (O(length) per step); NgramIndex gives the same proposals
from a table of each n-gram's latest start that grows with the row, so that a step costs O(max_ngram) lookups
whatever the context length (the engine's proposers keep one per request).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch


@dataclasses.dataclass
class _LookupConfig:
    vocab_size: int
    max_position: int = 1 << 30


class LookupDraft:
    """Proposes up to k tokens per row from the row's history; `draft_logits` gives the matching one-hot logits."""

    is_lookup = True

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.config = _LookupConfig(vocab_size)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose_row(self, seq: Sequence[int], k: int) -> List[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail; [] if none."""
        n_tokens = len(seq)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = list(seq[n_tokens - n:])
            for start in range(n_tokens - n - 1, -1, -1):  # latest earlier occurrence first
                if list(seq[start:start + n]) == tail:
                    return list(seq[start + n:start + n + k])  # never empty: start + n < n_tokens
        return []

    def propose(self, seqs: Sequence[Sequence[int]], k: int) -> List[List[int]]:
        """Proposals per row, each of 0 to k python ints."""
        return [self.propose_row(s, k) for s in seqs]

    @staticmethod
    def draft_logits(tokens: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot logits [B, k, vocab] of `dtype`: 0 at the proposed token, -inf elsewhere. tokens [B, k] int64.
        (One `where` between two 0-dim tensors of `dtype`: no in-place write, and a compiler cannot promote it.)"""
        hit = tokens.unsqueeze(-1) == torch.arange(vocab, device=tokens.device)
        zero = torch.zeros((), dtype=dtype, device=tokens.device)
        return torch.where(hit, zero, torch.full((), float("-inf"), dtype=dtype, device=tokens.device))


class NgramIndex:
    """LookupDraft's rule over one growing sequence, incrementally: for each n in [min_ngram, max_ngram], the latest
    start of every n-gram that ends before the sequence's last token. propose(k) == lookup.propose_row(seq, k) while
    `seq` (held by reference, e.g. a request's committed tokens) only grows; a sequence that shrank is re-indexed."""

    def __init__(self, lookup: LookupDraft, seq: List[int]):
        self.lookup, self.seq = lookup, seq
        self._reset()

    def _reset(self) -> None:
        n_range = range(self.lookup.min_ngram, self.lookup.max_ngram + 1)
        self.latest: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in n_range}
        self.indexed: Dict[int, int] = {n: 0 for n in n_range}  # starts below this are in latest[n]
        self.length = 0

    def propose(self, k: int) -> List[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail; [] if none."""
        seq, n_tokens = self.seq, len(self.seq)
        if n_tokens < self.length:
            self._reset()
        self.length = n_tokens
        for n in range(min(self.lookup.max_ngram, n_tokens - 1), self.lookup.min_ngram - 1, -1):
            table, end = self.latest[n], n_tokens - n  # earlier occurrences start before the tail's start, `end`
            for start in range(self.indexed[n], end):
                table[tuple(seq[start:start + n])] = start  # starts ascend: the latest one stays
            self.indexed[n] = max(self.indexed[n], end)
            start = table.get(tuple(seq[end:]))
            if start is not None:
                return list(seq[start + n:start + n + k])
        return []
