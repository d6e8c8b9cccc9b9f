"""Preallocated per-layer KV cache with per-row lengths (gpt-fast style).

Each layer owns k and v buffers [B, H_kv, max_len, D]. How many positions of a row are valid is not stored here: the
engine knows it from the request's committed tokens (and a draft's proposer from its own count). A forward writes its
T new keys at per-row positions and attends with a mask built from those positions, so rolling back a rejected draft
needs nothing: the stale entries beyond a row's length are masked out and overwritten later. No copies.
"""
from __future__ import annotations

import torch


class KVCache:
    """k[l], v[l]: [B, H_kv, max_len, D] of `dtype`."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len

    @classmethod
    def _from_parts(cls, k, v, max_len) -> "KVCache":
        obj = cls.__new__(cls)
        obj.k, obj.v, obj.max_len = k, v, max_len
        return obj

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): writes through it land in this cache."""
        return KVCache._from_parts([k[start:stop] for k in self.k], [v[start:stop] for v in self.v], self.max_len)

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the keys and values at slot src[i] to slot dst[i] of row rows[i], in every layer (int64 [n] each):
        a verified tree branch joins the row's positions in order."""
        for buf in self.k + self.v:
            buf[rows, :, dst] = buf[rows, :, src]

    def compact(self, keep: torch.Tensor) -> None:
        """Moves rows `keep` (int64 [n], increasing) to rows [0, n), e.g. after requests finished."""
        n = keep.shape[0]
        for buf in self.k + self.v:
            buf[:n] = buf[keep]
