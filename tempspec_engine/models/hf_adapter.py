"""Any other Hugging Face causal LM, run through its own cache at batch size 1 (correct, slower).

HFDecoder offers the Transformer's forward signature; its cache state crops the model's cache back to the first
position of each forward, which is how rejected drafts are rolled back.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class _HFConfig:
    vocab_size: int
    max_position: int


class HFCacheState:
    """Batch-1 stand-in for KVCache: the transformers cache object (cropped by the next forward's first position)."""

    def __init__(self, max_len: int):
        self.past = None
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return 1

    def rows(self, start: int, stop: int) -> "HFCacheState":
        if (start, stop) != (0, 1):
            raise ValueError("Hugging Face fallback models run at batch size 1")
        return self

    def compact(self, keep: torch.Tensor) -> None:
        if keep.tolist() != [0]:
            raise ValueError("Hugging Face fallback models run at batch size 1")


class HFDecoder(nn.Module):
    """Wraps a transformers causal LM (any architecture) for the engine, batch size 1."""

    batch_limit = 1

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        vocab = hf_model.get_output_embeddings().weight.shape[0]
        self.config = _HFConfig(vocab, getattr(cfg, "max_position_embeddings", None) or 1 << 20)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> HFCacheState:
        if batch != 1:
            raise ValueError("Hugging Face fallback models run at batch size 1")
        return HFCacheState(max_len)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: HFCacheState,
                kv_len: Optional[int] = None, logits_index: Optional[torch.Tensor] = None,
                compute_logits: bool = True, from_start: bool = False) -> Optional[torch.Tensor]:
        """tokens, positions [1, T] (consecutive positions; the cache is cropped to the first). from_start:
        Transformer's prefill promise, which needs nothing here (the model's own attention is causal)."""
        if tokens.shape[0] != 1:
            raise ValueError("Hugging Face fallback models run at batch size 1")
        start = int(positions[0, 0])
        if cache.past is not None and cache.past.get_seq_length() > start:
            cache.past.crop(start - cache.past.get_seq_length())  # negative: tokens to drop (transformers 4 and 5)
        if start == 0:
            cache.past = None
        out = self.hf(input_ids=tokens, past_key_values=cache.past, use_cache=True)
        cache.past = out.past_key_values
        if not compute_logits:
            return None
        logits = out.logits
        if logits_index is not None:
            logits = logits[torch.arange(logits.shape[0]), logits_index].unsqueeze(1)
        return logits
